"""The Triton kernels of the β-VQ activations (smaso.triton_kernels) against the eager
maths: on the CPU in Triton's interpreter, and on a CUDA GPU (tests marked ``cuda``).

Triton's interpreter runs ``@triton.jit`` kernels on CPU tensors when
``TRITON_INTERPRET=1`` is set before triton is imported, so the tests marked
``interpreted`` run in a subprocess of their own (:func:`test_under_the_interpreter`,
which ``make unit`` runs), with ``SMASO_TRITON=interpret`` sending CPU tensors to the
kernels. The references are the eager maths of :mod:`smaso.activations` in float64:
the kernels in float64 equal them to rounding, in float32 to float32 rounding, in
bfloat16 (computed in float32) to the rounding of the bfloat16 output.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_activations import MODULES, _as_function, _module, _ran_fused

from smaso import fused
from smaso import triton_kernels as tk
from smaso.activations import (
    BetaVQMaxPool2d,
    BetaVQReLU,
    TsallisVQReLU,
    _max_affine_backward,
    beta_softmax_pool2d,
    max_affine_vq,
    max_affine_vq_grads,
    softmax_pool_grads,
    softmax_pool_windows,
    two_piece_vq,
    two_piece_vq_grads,
)

INTERPRETED = os.environ.get("SMASO_TRITON") == "interpret"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="in Triton's interpreter: test_under_the_interpreter"
)

DT = torch.float64
LOW = [torch.float32, torch.bfloat16]
# Relative error allowed against the float64 maths: float32 rounding (a few ulps of
# the largest term), and the rounding of a bfloat16 output: 2^-7, as the interpreter
# casts float32 to bfloat16 by truncation (a GPU rounds to nearest: 2^-8).
REL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 2**-7}
COMPUTE = {DT: DT, torch.float32: torch.float32}
COMPUTE |= {torch.bfloat16: torch.float32, torch.float16: torch.float32}

# (slope, α) of the two-piece family: β-VQ ReLU, leaky-ReLU, absolute value (α = 1,
# Eq. 9), the α-entropy VQ ReLU ((8.3) of the book) and a leaky one at α = 1.5
TWO_PIECE = [(0.0, 1.0), (0.01, 1.0), (-1.0, 1.0), (0.0, 2.0), (0.0, 1.5), (0.3, 1.5)]
# (M, L): one position, one row, odd lengths, and rows longer than a tile
ROWS = [(1, 1), (6, 1), (5, 133), (3, 1500)]
# (N, C, H, W) and a window that tiles it
POOLS = [((2, 3, 4, 6), (2, 2)), ((1, 5, 9, 4), (3, 2)), ((3, 1, 2, 6), (1, 3))]


def test_under_the_interpreter(monkeypatch):
    """Run this file's ``interpreted`` tests in Triton's interpreter (a subprocess:
    the environment must be set before triton is imported). A triton older than
    ``TRITON_MIN`` (the oldest torch's) runs none of the kernels: checked instead."""
    if INTERPRETED:
        pytest.skip("this is the interpreter run")
    triton = pytest.importorskip("triton")
    too_old = tk._too_old(triton.__version__)
    if too_old:  # this triton's interpreter cannot run the kernels: none are used
        monkeypatch.setattr(tk, "_STATE", {})
        monkeypatch.setenv("SMASO_TRITON", "interpret")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not tk.applies(torch.ones(2, 3))
        assert tk.errors()["import"] == too_old
        return
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "SMASO_TRITON": "interpret", "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p"]
    cmd += ["no:cacheprovider", "-m", "not cuda", str(Path(__file__).resolve())]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) > 100, out[-2000:]


@pytest.fixture
def triton_only(monkeypatch):
    """The fast path with no other kernels: no C++ ones, and a torch.compile that
    fails, so ``fused=True`` raises unless the Triton kernels ran. Afterwards, no
    Triton kernel failed."""

    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("torch.compile ran: the Triton kernels did not")

        return fail

    monkeypatch.setenv("SMASO_NATIVE", "0")
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "_FAILED", {})
    monkeypatch.setattr(fused.torch, "compile", no_compiler)
    monkeypatch.setattr(tk, "_FAILED", {})
    yield
    assert tk.errors() == {} and fused.compile_errors() == {}


@pytest.fixture(params=["one tile", "small tiles"])
def tiles(request, monkeypatch):
    """The default plan, and tiles of 64 elements aiming at 8 programs: rows split
    into several chunks (partial sums added), odd lengths not a multiple of a tile."""
    if request.param == "small tiles":
        monkeypatch.setattr(tk, "TILE", 64)
        monkeypatch.setattr(tk, "PROGRAMS", 8)
    return request.param


def _assert_close(actual, expected, rel, scale=None):
    """|actual − expected| ≤ rel · scale elementwise, with expected in float64 and
    scale max(1, largest |expected|) (or a given per-entry scale)."""
    expected = expected.to(DT)
    if scale is None:
        scale = expected.abs().max().clamp(min=1.0)
    err = (actual.to(DT) - expected).abs()
    assert (err <= rel * scale).all(), f"max error {err.max():.3g}"


def _data(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=DT)).to(dtype)


# --------------------------------------------------------------------------------------
# The kernels, called directly, against the maths of smaso.activations in float64


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _check_two_piece(slope, alpha, rows, dtype, device, rels):
    """y, grad_x and the per-row dη of two_piece_vq (Theorem 3 with R = 2, Eq. 9 /
    (8.3)) and two_piece_vq_grads, the kernels run on ``device``."""
    M = rows[0]
    x, g = _data(rows, dtype), _data(rows, dtype, 1, 1.0)
    eta = (torch.rand(M, 1, generator=torch.Generator().manual_seed(2)) + 0.1).to(dtype)
    (y,) = tk.two_piece_forward(*_on(device, x, eta), slope, alpha)
    gx, geta = tk.two_piece_backward(*_on(device, g, x, eta), slope, alpha)
    assert y.dtype == gx.dtype == geta.dtype == dtype and geta.shape == eta.shape
    y, gx, geta = _on("cpu", y, gx, geta)
    x64, g64, eta64 = x.to(DT), g.to(DT), eta.to(DT)
    dx, deta = two_piece_vq_grads(x64, eta64, slope, alpha)
    rel = rels[dtype]
    _assert_close(y, two_piece_vq(x64, eta64, slope, alpha), rel)
    _assert_close(gx, g64 * dx, rel)
    terms = g64 * deta  # dη: a sum, so its error scales with the sum of |terms|
    _assert_close(geta, terms.sum(1, keepdim=True), rel, terms.abs().sum(1, True) + 1)


@interpreted
def test_interp_two_piece_layer_eta_and_empty_rows():
    """One η repeated for every row (stride 0, as a layer's β after fold) and empty
    inputs."""
    x, g = _data((4, 9), DT), _data((4, 9), DT, 1)
    eta = torch.tensor([[0.7]], dtype=DT).expand(4, 1)
    (y,) = tk.two_piece_forward(x, eta)
    gx, geta = tk.two_piece_backward(g, x, eta)
    dx, deta = two_piece_vq_grads(x, eta)
    _assert_close(y, two_piece_vq(x, eta), 1e-13)
    _assert_close(gx, g * dx, 1e-13)
    _assert_close(geta, (g * deta).sum(1, keepdim=True), 1e-13)
    e = torch.empty(0, 5, dtype=DT)
    assert tk.two_piece_forward(e, torch.empty(0, 1, dtype=DT))[0].shape == (0, 5)
    gx, geta = tk.two_piece_backward(
        torch.empty(3, 0), torch.empty(3, 0), torch.ones(3, 1)
    )
    assert gx.shape == (3, 0) and torch.equal(geta, torch.zeros(3, 1))


def _check_pool(shape, window, dtype, device, rels):
    """β-softmax pooling (Proposition 4) and its derivatives: softmax_pool_windows,
    beta_softmax_pool2d (an independent reference) and softmax_pool_grads."""
    kh, kw = window
    x = _data(shape, dtype)
    C = shape[1]
    eta = (torch.rand(C, generator=torch.Generator().manual_seed(3)) + 0.2).to(dtype)
    y, y_acc, lse = tk.pool_forward(*_on(device, x, eta), kh, kw)
    assert y.dtype == dtype and lse.dtype == y_acc.dtype == COMPUTE[dtype]
    assert (y_acc is y) == (dtype == COMPUTE[dtype])
    g = _data(y.shape, dtype, 1, 1.0)
    gx, geta = tk.pool_backward(*_on(device, g, x, eta), y_acc, lse, kh, kw)
    assert gx.dtype == geta.dtype == dtype and geta.shape == eta.shape
    y, y_acc, lse, gx, geta = _on("cpu", y, y_acc, lse, gx, geta)
    x64, eta64 = x.to(DT), eta.to(DT)
    y64, lse64 = softmax_pool_windows(x64, eta64, kh, kw)
    rel = rels[dtype]
    _assert_close(y, beta_softmax_pool2d(x64, eta64, window), rel)
    _assert_close(y, y64, rel)
    _assert_close(y_acc, y64, rels[COMPUTE[dtype]])
    _assert_close(lse, lse64, rels[COMPUTE[dtype]])
    dx, deta = softmax_pool_grads(x64, eta64, y64, lse64, kh, kw)
    gu = g.to(DT).repeat_interleave(kh, 2).repeat_interleave(kw, 3)
    _assert_close(gx, gu * dx, rel)
    terms = gu * deta
    _assert_close(geta, terms.sum((0, 2, 3)), rel, terms.abs().sum((0, 2, 3)) + 1)


def _check_max_affine(rows, pieces, dtype, device, rels):
    """The β-VQ of max-affine units (Theorem 3, Eq. 9): max_affine_vq and the
    derivatives of _max_affine_backward (max_affine_vq_grads) for x, the slopes, the
    offsets and η."""
    M = rows[0]
    x, g = _data(rows, dtype), _data(rows, dtype, 1, 1.0)
    a, b = _data((M, pieces), dtype, 2, 1.0), _data((M, pieces), dtype, 3, 1.0)
    eta = (torch.rand(M, 1, generator=torch.Generator().manual_seed(4)) + 0.2).to(dtype)
    (y,) = tk.max_affine_forward(*_on(device, x, a, b, eta))
    grads = _on("cpu", *tk.max_affine_backward(*_on(device, g, x, a, b, eta)))
    y = y.cpu()
    rel = rels[dtype]
    x64, g64, a64, b64, eta64 = (t.to(DT) for t in (x, g, a, b, eta))
    _assert_close(y, max_affine_vq(x64, a64, b64, eta64), rel)
    expected = _max_affine_backward(g64, x64, a64, b64, eta64)
    _assert_close(grads[0], expected[0], rel)
    # the parameters' gradients are sums over the row: error relative to the sum of
    # the terms' sizes
    dy_ds, dy_deta = max_affine_vq_grads(x64, a64, b64, eta64)
    gs = torch.stack([g64 * d for d in dy_ds], 1)  # (M, R, L)
    sizes = [
        (gs * x64[:, None]).abs().sum(-1),
        gs.abs().sum(-1),
        (g64 * dy_deta).abs().sum(-1, keepdim=True),
    ]
    params = (a, b, eta)
    for got, want, p, size in zip(grads[1:], expected[1:], params, sizes, strict=True):
        assert got.shape == p.shape and got.dtype == dtype
        _assert_close(got, want, rel, size + 1)


@interpreted
@pytest.mark.parametrize("dtype", [DT, *LOW])
@pytest.mark.parametrize("rows", ROWS, ids=str)
@pytest.mark.parametrize(("slope", "alpha"), TWO_PIECE, ids=str)
def test_interp_two_piece_kernels(slope, alpha, rows, dtype, tiles):
    _check_two_piece(slope, alpha, rows, dtype, "cpu", REL)


@interpreted
@pytest.mark.parametrize("dtype", [DT, *LOW])
@pytest.mark.parametrize(("shape", "window"), POOLS, ids=str)
def test_interp_pool_kernels(shape, window, dtype, tiles):
    _check_pool(shape, window, dtype, "cpu", REL)


@interpreted
@pytest.mark.parametrize("dtype", [DT, *LOW])
@pytest.mark.parametrize("pieces", [2, 3, 5])
@pytest.mark.parametrize("rows", [(1, 1), (6, 1), (5, 133), (3, 300)], ids=str)
def test_interp_max_affine_kernels(rows, pieces, dtype, tiles):
    _check_max_affine(rows, pieces, dtype, "cpu", REL)


@interpreted
def test_interp_max_affine_repeated_parameters():
    """Slopes, offsets and η of one channel repeated for every row (stride 0)."""
    x, g = _data((4, 11), DT), _data((4, 11), DT, 1)
    a = torch.tensor([[0.0, 0.5, 1.0]], dtype=DT).expand(4, 3)
    b = torch.tensor([[0.1, -0.2, 0.3]], dtype=DT).expand(4, 3)
    eta = torch.tensor([[1.3]], dtype=DT).expand(4, 1)
    (y,) = tk.max_affine_forward(x, a, b, eta)
    _assert_close(y, max_affine_vq(x, a, b, eta), 1e-13)
    got = tk.max_affine_backward(g, x, a, b, eta)
    want = _max_affine_backward(g, x, a, b, eta)
    for u, v in zip(got, want, strict=True):
        _assert_close(u, v, 1e-13)


@interpreted
def test_interp_bad_inputs_are_refused():
    x = torch.ones(3, 4)
    with pytest.raises(ValueError, match="expected rows"):
        tk.two_piece_forward(torch.ones(2, 3, 4), torch.ones(2, 1))
    with pytest.raises(ValueError, match="expected 3 values of eta"):
        tk.two_piece_forward(x, torch.ones(2, 1))
    with pytest.raises(ValueError, match="alpha in"):
        tk.two_piece_forward(x, torch.ones(3, 1), 0.0, 1.25)
    with pytest.raises(ValueError, match=r"dtype torch\.int64"):
        tk.two_piece_forward(x.long(), torch.ones(3, 1))
    with pytest.raises(ValueError, match="gradient of shape"):
        tk.two_piece_backward(torch.ones(3, 5), x, torch.ones(3, 1))
    with pytest.raises(ValueError, match="not multiples of the window"):
        tk.pool_forward(torch.ones(1, 2, 5, 4), torch.ones(2), 2, 2)
    with pytest.raises(ValueError, match=r"expected \(N, C, H, W\)"):
        tk.pool_forward(torch.ones(2, 4, 4), torch.ones(2), 2, 2)
    with pytest.raises(ValueError, match=r"slopes and offsets \(3, R\)"):
        tk.max_affine_forward(x, torch.ones(3, 2), torch.ones(3, 3), torch.ones(3))


@interpreted
def test_interp_a_failing_kernel_is_recorded_and_skipped(monkeypatch):
    """attempt: None where a kernel raises, the reason in errors(), and the kernel not
    tried again."""
    monkeypatch.setattr(tk, "_FAILED", {})
    calls = []

    def two_piece_forward(x, eta, slope, alpha):
        calls.append(1)
        raise RuntimeError("out of resources")

    x = torch.ones(2, 3)
    assert tk.attempt(two_piece_forward, x, torch.ones(2, 1), 0.0, 1.0) is None
    assert tk.attempt(two_piece_forward, x, torch.ones(2, 1), 0.0, 1.0) is None
    assert calls == [1]
    assert tk.errors() == {"two_piece_forward": "RuntimeError: out of resources"}
    assert tk.attempt(tk.two_piece_forward, x.int(), x, 0.0, 1.0) is None  # dtype
    # inputs the kernels do not take (not rows: swish_fused's 4-D x): None, and the
    # kernel stays in use
    tk._FAILED.clear()
    eta4 = torch.ones(1, 3, 1, 1)
    assert tk.attempt(tk.two_piece_forward, torch.ones(2, 3, 4, 4), eta4, 0, 1) is None
    assert tk.errors() == {}
    assert tk.attempt(tk.two_piece_forward, x, torch.ones(2, 1), 0, 1) is not None


# --------------------------------------------------------------------------------------
# The modules: the Triton kernels as their fast path (the default on CUDA, here on CPU
# tensors under the interpreter), against the eager path


@interpreted
@pytest.mark.parametrize("name", ["relu, one beta", "entmax15", "maxout", "pool"])
def test_interp_modules_gradcheck_on_the_triton_path(name, triton_only):
    """Finite differences (float64) of modules on the Triton kernels, for the input
    and every parameter (one of each kind of kernel; every module is compared with
    autograd's gradients of the eager path below)."""
    m, x = _module(name, fused=True)
    f, params = _as_function(m)
    assert torch.autograd.gradcheck(f, (x, *params))


def _outputs_and_grads(m, x, seed=7):
    y = m(x)
    g = _data(y.shape, y.dtype, seed, 1.0)
    return y, torch.autograd.grad(y, (x, *m.parameters()), g), _ran_fused(y)


@interpreted
@pytest.mark.parametrize("dtype", [DT, *LOW])
@pytest.mark.parametrize("name", MODULES)
def test_interp_modules_on_the_triton_path_equal_eager(name, dtype, triton_only):
    """Output and gradients (input, β, slopes, offsets) of the default path, which
    runs the Triton kernels, against the eager path in float64."""
    m64, x64 = _module(name)
    m64.fused = False
    y64, grads64, fast = _outputs_and_grads(m64, x64)
    assert not fast
    m = m64.to(dtype)
    m.fused = None
    x = x64.detach().to(dtype).requires_grad_(True)
    y, grads, fast = _outputs_and_grads(m, x)
    assert fast and y.dtype == dtype
    # low precision: parameters and input rounded too, so a looser bound
    rel = {DT: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    _assert_close(y, y64, rel)
    for a, b in zip(grads, grads64, strict=True):
        _assert_close(a, b, rel, b.abs().max().clamp(min=1) * 4)


@interpreted
def test_interp_triton_is_the_fast_path_where_it_applies(triton_only):
    """Under the interpreter, CPU tensors take the Triton kernels with no compiler;
    configurations without fused kernels (entmax by bisection, overlapping windows)
    stay eager."""
    x = torch.randn(2, 3, 4, 4)
    assert tk.applies(x) and not tk.applies(x.int())
    y = BetaVQReLU(3, fused=True)(x.requires_grad_(True))
    assert _ran_fused(y)
    assert not _ran_fused(TsallisVQReLU(3, alpha=1.25)(x))
    assert not _ran_fused(BetaVQMaxPool2d(3, 1, 1)(x))


# --------------------------------------------------------------------------------------
# Without the interpreter


def test_cpu_tensors_never_use_triton(monkeypatch):
    """On the CPU the C++ and compiled kernels stay as they are: the Triton kernels
    apply to CUDA tensors only (CPU ones only under SMASO_TRITON=interpret)."""
    if INTERPRETED:
        pytest.skip("CPU tensors go to the interpreter here")
    assert not tk.applies(torch.ones(2, 3))
    monkeypatch.setenv("SMASO_TRITON", "0")
    assert tk.errors()["import"] == "switched off (SMASO_TRITON=0)"
    assert not tk.applies(torch.ones(2, 3, device="meta"))


def test_an_older_triton_leaves_the_other_kernels(monkeypatch):
    """A triton older than TRITON_MIN (triton 3.1 and older reject the kernels) is not
    used: the fast path takes its other kernels, and errors() says why."""
    if INTERPRETED:
        pytest.skip("triton is imported here")
    monkeypatch.setattr(tk, "_STATE", {})
    monkeypatch.setitem(sys.modules, "triton", type(sys)("triton"))
    sys.modules["triton"].__version__ = "3.1.0"
    assert tk._jit() is None
    assert tk.errors()["import"] == (
        "triton 3.1.0 is older than 3.2, the oldest these kernels run on"
    )
    assert not tk._too_old("3.2.0") and not tk._too_old("3.10.0+git4f1c")
    assert tk._too_old("2.1.0") and tk._too_old("3.1.0") and tk._too_old("nightly")


def test_interpret_mode_without_triton_interpret_is_refused(monkeypatch):
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set here")
    monkeypatch.setattr(tk, "_STATE", {})
    monkeypatch.setenv("SMASO_TRITON", "interpret")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not tk.applies(torch.ones(2, 3))
    assert "needs TRITON_INTERPRET=1" in tk.errors()["import"]


# --------------------------------------------------------------------------------------
# On a CUDA GPU (pytest -o addopts="" -m cuda tests/test_triton.py)


def _cuda_module(name, dtype):
    m, x = _module(name)
    m = m.to(device="cuda", dtype=dtype)
    return m, x.detach().to(device="cuda", dtype=dtype).requires_grad_(True)


# float32 on a GPU: tl.exp is exp2.approx (about 2 ulps, on an argument rounded to
# float32 first); bfloat16 outputs rounded to nearest
REL_CUDA = {DT: 1e-13, torch.float32: 1e-5, torch.bfloat16: 2**-8 + 1e-5}
REL_CUDA[torch.float16] = 2**-11 + 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [*LOW, torch.float16])
def test_cuda_kernels_equal_the_maths(dtype):
    """The kernels called directly on CUDA tensors, every configuration, against the
    float64 maths on the CPU (float64 on CUDA: the modules' test below). Two row
    shapes, as each builds its own kernels (seconds each); the second splits its
    rows (3 rows: 2 programs per row in the backward)."""
    for slope, alpha in TWO_PIECE:
        for rows in [(5, 133), (3, 1500)]:
            _check_two_piece(slope, alpha, rows, dtype, "cuda", REL_CUDA)
    for shape, window in POOLS:
        _check_pool(shape, window, dtype, "cuda", REL_CUDA)
    for pieces in (2, 3, 5):
        for rows in [(6, 1), (3, 3000)]:
            _check_max_affine(rows, pieces, dtype, "cuda", REL_CUDA)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", MODULES)
def test_cuda_triton_is_the_default_and_equals_eager(name, dtype, triton_only):
    """On CUDA the default path runs the Triton kernels (no torch.compile: the
    fixture makes it fail), with the eager path's numbers (float64 eager on the CPU
    as reference)."""
    m64, x64 = _module(name)
    m64.fused = False
    y64, grads64, _ = _outputs_and_grads(m64, x64)
    m, x = _cuda_module(name, dtype)
    assert tk.applies(x)
    y, grads, fast = _outputs_and_grads(m, x)
    assert fast and fused.compile_errors() == {}
    rel = {DT: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    _assert_close(y.cpu(), y64, rel)
    for a, b in zip(grads, grads64, strict=True):
        _assert_close(a.cpu(), b, rel, b.abs().max().clamp(min=1) * 4)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["relu", "relu, one beta", "gini", "maxout", "pool"])
def test_cuda_graph_captures_forward_and_backward(name, triton_only):
    """Forward and backward (input and parameter gradients) captured once in a CUDA
    graph and replayed on new inputs give the eager numbers."""
    m, x = _cuda_module(name, torch.float32)
    params = list(m.parameters())
    g = torch.randn(m(x).shape, device="cuda")

    def step():
        y = m(x)
        return (y, *torch.autograd.grad(y, (x, *params), g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the kernels built before capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            x.copy_(3 * torch.randn(x.shape, device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        m.fused = False
        expected = step()
        m.fused = None
        for a, b in zip(captured, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
