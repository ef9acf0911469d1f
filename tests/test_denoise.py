"""Tests for smaso.denoise: shrinkage as a MASO nonlinearity, synthesis by the adjoint,
transform-domain denoising and reconstruction from the active units (Section 6, future
work 3)."""

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from torch import nn

from smaso.denoise import (
    TransformDenoiser,
    active_reconstruction,
    beta_shrink,
    block_dct,
    conv_adjoint,
    psnr,
    soft_threshold,
)
from smaso.layers import layer_maso
from smaso.maso import maso
from smaso.orthoconv import CircularConv2d, bcop_conv2d, cayley_conv2d

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_soft_threshold_is_softshrink():
    u = torch.linspace(-3, 3, 601, dtype=F64)
    for t in (0.0, 0.3, 1.0, 2.5):
        assert torch.equal(soft_threshold(u, t), F.softshrink(u, t))


def test_the_pair_is_a_maso_layer():
    """Two ReLU units with slopes (w, -w) and bias -t, summed with signs (+1, -1): the
    layer's MASO output (Theorem 1) equals soft thresholding of <w, x>."""
    w = torch.randn(1, 5, dtype=F64, generator=gen(0))
    t = 0.4
    lin = nn.Linear(5, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.cat([w, -w]))
        lin.bias.fill_(-t)
    A, B = layer_maso([lin, nn.ReLU()], (5,))
    x = torch.randn(100, 5, dtype=F64, generator=gen(1))
    z = maso(A, B, x)
    assert torch.allclose(z[:, 0] - z[:, 1], F.softshrink(x @ w[0], t), atol=1e-14)


def test_beta_shrink():
    u = torch.linspace(-4, 4, 801, dtype=F64)
    t = 0.7
    s = beta_shrink(u, t, 3.0)
    assert torch.allclose(s, -beta_shrink(-u, t, 3.0), atol=1e-15)  # odd
    assert (s.abs() <= u.abs()).all()  # shrinks
    assert (beta_shrink(u, t, 1.0).diff() > 0).all()  # increasing at eta = 1 ...
    # ... but not for larger eta: swish dips below zero, so small coefficients get a
    # small negative gain (the nonconvexity of the beta-VQ, the paper's Figure 1)
    small = u[(u > 0) & (u < 0.3)]
    assert (beta_shrink(small, t, 3.0) < 0).all()
    # -> soft thresholding as eta -> inf; at eta = 0 it is linear, (u - t + u + t) / 2
    assert (beta_shrink(u, t, 1e4) - F.softshrink(u, t)).abs().max() < 1e-4
    assert torch.allclose(beta_shrink(u, t, 0.0), u, atol=1e-15)


@pytest.mark.parametrize("kind", ["conv", "circular", "cayley", "bcop"])
def test_conv_adjoint_is_the_transpose(kind):
    torch.manual_seed(0)
    conv = {
        "conv": lambda: nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"),
        "circular": lambda: CircularConv2d(3, 2, 5),
        "cayley": lambda: cayley_conv2d(3, 2, 3, 5),
        "bcop": lambda: bcop_conv2d(3, 2, 3),
    }[kind]().double()
    x = torch.randn(2, 3, 5, 5, dtype=F64, generator=gen(2), requires_grad=True)
    y = torch.randn(2, 2, 5, 5, dtype=F64, generator=gen(3))
    out = conv(x) - (conv.bias[:, None, None] if conv.bias is not None else 0)
    (vjp,) = torch.autograd.grad(out, x, y)  # W^T y by autograd: the reference
    assert (conv_adjoint(conv, y) - vjp).abs().max() < 1e-12


def test_conv_adjoint_errors():
    with pytest.raises(ValueError, match="circular"):
        conv_adjoint(nn.Conv2d(2, 2, 3, padding=1), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="stride 1"):
        conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular", stride=2)
        conv_adjoint(conv, torch.zeros(1, 2, 4, 4))


def test_block_dct_is_scipys_orthonormal_dct():
    for f in (1, 2, 4):
        D = block_dct(f, F64)
        assert (D @ D.T - torch.eye(f * f, dtype=F64)).abs().max() < 1e-14
        assert (D.diagonal() >= 0).all()
        x = np.random.default_rng(0).standard_normal((f, f))
        ref = scipy.fft.dctn(x, norm="ortho").reshape(-1)
        ours = (D @ torch.from_numpy(x).reshape(-1)).numpy()
        assert np.allclose(np.abs(ours), np.abs(ref), atol=1e-12)
    with pytest.raises(ValueError, match="positive int"):
        block_dct(0)


def test_psnr():
    x = torch.zeros(2, 1, 4, 4)
    y = x + 0.1
    assert torch.allclose(psnr(y, x), torch.tensor([20.0, 20.0]))


def test_orthogonal_denoiser_without_shrinkage_is_the_identity():
    torch.manual_seed(0)
    y = torch.rand(3, 1, 8, 8, dtype=F64, generator=gen(4))
    for conv in (cayley_conv2d(4, 4, 3, 4, bias=False), bcop_conv2d(4, 4, 3, False)):
        model = TransformDenoiser(conv.double(), factor=2).double()
        assert (model.reconstruct(y) - y).abs().max() < 1e-12
        with torch.no_grad():
            model.tau_raw.fill_(-60.0)  # tau = softplus(-60) ~ 1e-26
        assert (model(y, 0.1) - y).abs().max() < 1e-12
    free = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", bias=False).double()
    model = TransformDenoiser(free, factor=2).double()
    assert (model.reconstruct(y) - y).abs().max() > 0.1  # W^T is not the inverse


def test_denoiser_shrinks_in_noise_units():
    conv = cayley_conv2d(4, 4, 3, 4, bias=False).double()
    model = TransformDenoiser(conv, factor=2, tau=1.5).double()
    y = torch.rand(2, 1, 8, 8, dtype=F64, generator=gen(5))
    tau = model.thresholds()[0].detach()
    assert torch.allclose(tau, torch.full((4,), 1.5, dtype=F64), atol=1e-6)
    u = model.coefficients(y)
    t = tau[0].item() * 0.2
    ref = F.pixel_shuffle(conv_adjoint(conv, F.softshrink(u, t)), 2)
    assert (model(y, 0.2) - ref).abs().max() < 1e-12


def test_denoiser_errors():
    with pytest.raises(ValueError, match="shrink"):
        TransformDenoiser(nn.Conv2d(4, 4, 1, bias=False), shrink="hard")
    with pytest.raises(ValueError, match="C channels to C channels"):
        TransformDenoiser(nn.Conv2d(4, 4, 1))


def test_active_reconstruction_is_the_least_squares_projection():
    """For orthonormal rows, W_S^T (z_S - b_S) is the minimum-norm least-squares
    solution (LAPACK gelsd, an independent reference) and a projection."""
    Q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=F64, generator=gen(6)))
    W = Q[:9].T.contiguous().T  # 9 orthonormal rows in R^12
    b = 0.3 * torch.randn(9, dtype=F64, generator=gen(7))
    x = torch.randn(5, 12, dtype=F64, generator=gen(8))
    x_hat, mask = active_reconstruction(W, b, x)
    z = torch.relu(x @ W.T + b)
    for i in range(5):
        S = mask[i]
        sol = torch.linalg.lstsq(W[S], z[i, S] - b[S], driver="gelsd").solution
        assert (x_hat[i] - sol).abs().max() < 1e-12
        P = W[S].T @ W[S]  # the orthogonal projector onto the active slopes' span
        assert (x_hat[i] - P @ x[i]).abs().max() < 1e-12
    assert ((x_hat * x_hat).sum(1) <= (x * x).sum(1) + 1e-12).all()
