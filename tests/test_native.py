"""The hand-written C++ kernels of smaso.native on several threads: they run on
torch's intra-op threads, and give the same numbers, bit for bit, with 1, 2 or 4 of
them (the work is split into chunks fixed by the row length alone, and a row's η
gradient sums its chunks in order). Their maths against the reference is in
tests/test_activations.py (test_native_kernels_compute_the_maths)."""

import pytest
import torch

from smaso import native
from smaso.activations import BetaVQAbs, BetaVQLeakyReLU, BetaVQReLU, two_piece_vq_grads

THREADS = (1, 2, 4)
CHUNK = 8192  # elements per task in smaso/csrc/two_piece.cpp

pytestmark = pytest.mark.skipif(
    native.build_error() is not None or not native.applies(torch.ones(1)),
    reason=f"no C++ kernels here: {native.build_error()}",
)


def test_the_kernels_run_on_torchs_threads(restore_threads):
    """at::parallel_for spreads the tasks over torch.get_num_threads() threads (one
    thread only if the extension were compiled without OpenMP)."""
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        assert native.parallel_threads() == n


@pytest.mark.parametrize("slope", [0.0, 0.1])
@pytest.mark.parametrize(
    "shape",
    [(300, 45), (3, 2 * CHUNK + 37)],  # many short rows; a few rows of 3 chunks
)
def test_the_kernels_give_the_same_bits_on_any_number_of_threads(
    shape, slope, restore_threads
):
    g = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(shape, generator=g)
    eta = torch.rand(shape[0], 1, generator=g) + 0.1
    gy = torch.randn(shape, generator=g)
    out = {}
    for n in THREADS:
        torch.set_num_threads(n)
        (y,) = native.two_piece_forward(x, eta, slope)
        out[n] = (y, *native.two_piece_backward(gy, x, eta, slope))
    for n in THREADS[1:]:
        for a, b in zip(out[n], out[1], strict=True):
            assert torch.equal(a, b), (n, shape)


def test_rows_of_several_chunks_sum_their_eta_gradient_right():
    """A row longer than a chunk: the chunks' partial sums against float64."""
    g = torch.Generator().manual_seed(1)
    x = 4 * torch.randn(2, 3 * CHUNK + 5, generator=g, dtype=torch.float64)
    eta = torch.rand(2, 1, generator=g, dtype=torch.float64) + 0.1
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    gx, geta = native.two_piece_backward(gy, x, eta, -1.0)
    fx, fe = two_piece_vq_grads(x, eta, -1.0)
    torch.testing.assert_close(gx, gy * fx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        geta, (gy * fe).sum(-1, keepdim=True), rtol=1e-12, atol=1e-10
    )


@pytest.mark.parametrize("module", [BetaVQReLU, BetaVQLeakyReLU, BetaVQAbs])
@pytest.mark.parametrize("shape", [(8, 6, 9, 11), (512, 96, 1, 2)])
def test_modules_give_the_same_bits_on_any_number_of_threads(
    module, shape, restore_threads
):
    """Output, input gradient and per-channel β gradient of the modules (the C++ kernels
    and the sum over the batch of the per-unit η gradients), also where that sum has
    enough terms for PyTorch to split it (512·96 units)."""
    m = module(shape[1]) if module is not BetaVQLeakyReLU else module(0.1, shape[1])
    assert m.fused is None  # the default: the C++ kernels here
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    gy = torch.randn(shape, generator=g)
    out = {}
    for n in THREADS:
        torch.set_num_threads(n)
        xn = x.clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        y = m(xn)
        y.backward(gy)
        out[n] = (y.detach(), xn.grad, *(p.grad for p in m.parameters()))
    for n in THREADS[1:]:
        for a, b in zip(out[n], out[1], strict=True):
            assert torch.equal(a, b), (n, module.__name__, shape)
