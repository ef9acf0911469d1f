"""Tests for smaso.orthoconv: exactly orthogonal convolution operators (Cayley in the
Fourier domain, BCOP), the FFT circular convolution, apodisation and the patches of
Appendix B, and Theorem 4 for a convolutional layer (Eq. 11, Theorem 4)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from smaso.factorial import (
    factorised_map,
    joint_map,
    mutual_coherence,
    sample_factorial,
)
from smaso.layers import affine_params, layer_maso
from smaso.orthoconv import (
    BCOPConv,
    CayleyConv,
    CircularConv2d,
    apodize,
    apodized_patches,
    assemble_patches,
    bcop_conv2d,
    bcop_kernel,
    cayley,
    cayley_conv2d,
    cayley_kernel,
    check_circular_conv,
    frequency_operator,
    full_kernel_size,
    hamming_window,
    inverse_cayley,
    kernel_from_offsets,
    offset_kernel,
    register_bcop,
    register_cayley,
    semi_unitary_error,
)
from smaso.orthogonal import OrthogonalFilters

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# (c_in, c_out, k, n): square, fewer and more output channels, 1x1, even and odd n,
# a generator as large as the dense kernel (k = n + 1 for even n)
SIZES = [
    (2, 2, 3, 4),
    (3, 5, 3, 5),
    (5, 2, 3, 4),
    (1, 1, 1, 3),
    (2, 3, 5, 6),
    (2, 2, 3, 2),
    (2, 3, 5, 4),
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def operator_matrix(conv, shape, dtype=F64):
    """The layer's matrix (M, D) from its response to the identity basis, minus the
    bias: independent of how the weight was built."""
    D = int(np.prod(shape))
    E = torch.eye(D, dtype=dtype).reshape(D, *shape)
    with torch.no_grad():
        out = conv(E) - conv(torch.zeros(1, *shape, dtype=dtype))
    return out.reshape(D, -1).T


def orthonormality_error(M):
    """Largest deviation of the rows (M wide) or columns (M tall) from orthonormal."""
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return (G - torch.eye(G.shape[0], dtype=G.dtype)).abs().max().item()


def make(kind, ci, co, k, n, dtype=F64, seed=0):
    torch.manual_seed(seed)
    if kind == "cayley":
        conv = cayley_conv2d(ci, co, k, n)
    elif kind == "cayley-spatial":  # a plain nn.Conv2d with the dense kernel
        K = full_kernel_size(n)
        conv = nn.Conv2d(ci, co, k, padding=(K - 1) // 2, padding_mode="circular")
        register_cayley(conv, n)
    else:
        conv = bcop_conv2d(ci, co, k)
    return conv.to(dtype)


# ------------------------------------------------------------- orthonormal operators


@pytest.mark.parametrize("kind", ["cayley", "cayley-spatial", "bcop"])
@pytest.mark.parametrize(("ci", "co", "k", "n"), SIZES)
def test_operator_is_orthonormal_float64(kind, ci, co, k, n):
    conv = make(kind, ci, co, k, n)
    M = operator_matrix(conv, (ci, n, n))
    assert M.shape == (co * n * n, ci * n * n)
    assert orthonormality_error(M) < 1e-12
    # smaso.layers' conv-matrix builder (the Jacobian) gives the same matrix
    W, _ = affine_params(conv, (ci, n, n))
    assert (W - M).abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["cayley", "bcop"])
@pytest.mark.parametrize(("ci", "co", "k", "n"), [(4, 4, 3, 6), (3, 8, 3, 5)])
def test_operator_is_orthonormal_float32(kind, ci, co, k, n):
    conv = make(kind, ci, co, k, n, dtype=torch.float32)
    M = operator_matrix(conv, (ci, n, n), dtype=torch.float32).double()
    assert orthonormality_error(M) < 1e-6


def test_bcop_is_orthogonal_at_every_input_size():
    conv = make("bcop", 3, 3, 3, 4)
    for n in (2, 3, 5, 8):
        assert orthonormality_error(operator_matrix(conv, (3, n, n))) < 1e-12


def test_orthogonal_rows_satisfy_eq11_for_all_units():
    """c_out <= c_in: every unit at every position has slopes orthogonal to every
    other unit's (Eq. 11), so the ReLU layer's mutual coherence is zero."""
    for kind in ("cayley", "bcop"):
        conv = make(kind, 3, 2, 3, 4)
        A, _ = layer_maso([conv, nn.ReLU()], (3, 4, 4))
        assert mutual_coherence(A) < 1e-12
    qr = nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular").double()
    parametrize.register_parametrization(qr, "weight", OrthogonalFilters())
    A, _ = layer_maso([qr, nn.ReLU()], (3, 4, 4))
    assert mutual_coherence(A) > 0.1  # orthonormal filters, not an orthogonal operator


# ---------------------------------------------------------------- Cayley pieces


@pytest.mark.parametrize(("m", "k"), [(3, 3), (5, 2), (2, 5)])
def test_cayley_matches_the_square_cayley_transform(m, k):
    W = torch.randn(4, m, k, dtype=torch.complex128, generator=gen(1))
    Q = cayley(W)
    assert semi_unitary_error(Q) < 1e-12
    # independent reference: (I - S)(I + S)^-1 of the m x m (or k x k) skew matrix
    tall = W if m >= k else W.mH
    p, q = tall.shape[-2:]
    U, V = tall[..., :q, :], tall[..., q:, :]
    S = torch.zeros(4, p, p, dtype=W.dtype)
    S[..., :q, :q] = U - U.mH
    S[..., q:, :q] = V
    S[..., :q, q:] = -V.mH
    eye = torch.eye(p, dtype=W.dtype)
    full = (eye - S) @ torch.linalg.inv(eye + S)
    assert (full.mH @ full - eye).abs().max() < 1e-12
    ref = full[..., :, :q] if m >= k else full[..., :, :q].mH
    assert (Q - ref).abs().max() < 1e-12


@pytest.mark.parametrize(("m", "k"), [(3, 3), (5, 2), (2, 5)])
def test_inverse_cayley_round_trip(m, k):
    W = torch.randn(6, m, k, dtype=torch.complex128, generator=gen(2))
    Q = cayley(W)
    G = inverse_cayley(Q)
    assert (cayley(G) - Q).abs().max() < 1e-12


def test_inverse_cayley_refuses_what_it_cannot_invert():
    with pytest.raises(ValueError, match="not semi-unitary"):
        inverse_cayley(torch.randn(3, 3, dtype=F64, generator=gen(3)))
    with pytest.raises(ValueError, match="eigenvalue -1"):
        inverse_cayley(-torch.eye(3, dtype=F64))


def test_offset_kernel_round_trip_and_alias():
    w = torch.randn(2, 3, 5, 5, dtype=F64, generator=gen(4))
    for n in (5, 6):
        K = full_kernel_size(n)
        h = offset_kernel(w, n)
        back = kernel_from_offsets(h, K)
        assert torch.allclose(offset_kernel(back, n), h, rtol=0, atol=1e-15)
    # a 5x5 kernel on 3x3 inputs wraps: taps 2 apart alias onto one offset
    h3 = offset_kernel(w, 3)
    assert torch.allclose(h3.sum((-1, -2)), w.sum((-1, -2)), atol=1e-12)


@pytest.mark.parametrize(("K", "n"), [(3, 5), (5, 4), (7, 8), (9, 9), (5, 3)])
def test_circular_conv2d_is_the_circular_nn_conv2d(K, n):
    torch.manual_seed(0)
    conv = CircularConv2d(3, 4, K).double()
    x = torch.randn(2, 3, n, n, dtype=F64, generator=gen(5))
    p = (K - 1) // 2
    ref = F.conv2d(F.pad(x, [p] * 4, mode="circular"), conv.weight, conv.bias)
    assert (conv(x) - ref).abs().max() < 1e-12


def test_frequency_operator_diagonalises_the_convolution():
    conv = CircularConv2d(3, 2, 3, bias=False).double()
    x = torch.randn(1, 3, 5, 5, dtype=F64, generator=gen(6))
    M = frequency_operator(offset_kernel(conv.weight.detach(), 5))  # (5, 3, 2, 3)
    X = torch.fft.rfft2(x)[0].permute(1, 2, 0)  # (5, 3, 3)
    Y = torch.fft.rfft2(conv(x).detach())[0].permute(1, 2, 0)
    assert (Y - (M @ X[..., None])[..., 0]).abs().max() < 1e-12


# ----------------------------------------------------------------- right inverse


@pytest.mark.parametrize(
    ("ci", "co", "k", "n"), [(2, 2, 3, 4), (3, 5, 3, 5), (5, 2, 3, 5), (2, 2, 5, 4)]
)
def test_cayley_right_inverse_is_exact_on_the_image(ci, co, k, n):
    a, b = make("cayley", ci, co, k, n, seed=0), make("cayley", ci, co, k, n, seed=1)
    Q = a.weight.detach().clone()
    b.weight = Q
    assert (b.weight - Q).abs().max() < 1e-12
    # the generator is recovered up to its irrelevant (Hermitian) part: the forward
    # map of the recovered raw weight is the same operator
    raw = b.parametrizations.weight.original.detach()
    assert (cayley_kernel(raw, n) - Q).abs().max() < 1e-12


def test_cayley_right_inverse_errors():
    a = make("cayley", 2, 2, 3, 5)
    dense = make("cayley", 2, 2, 5, 5, seed=3).weight.detach()
    with pytest.raises(ValueError, match="not supported on the 3x3 window"):
        a.weight = dense
    with pytest.raises(NotImplementedError, match="not an orthogonal convolution"):
        a.weight = torch.randn(2, 2, 5, 5, dtype=F64, generator=gen(7))
    with pytest.raises(NotImplementedError, match="is not a 5x5 Cayley"):
        a.weight = torch.randn(2, 2, 3, 3, dtype=F64, generator=gen(8))
    # the full-size generator takes any operator of the Cayley image
    full = make("cayley", 2, 2, 5, 5, seed=4)
    full.weight = dense
    assert (full.weight - dense).abs().max() < 1e-12
    # an orthogonal operator with an eigenvalue -1 at some frequency: -identity
    K = full_kernel_size(5)
    minus_id = torch.zeros(2, 2, K, K, dtype=F64)
    minus_id[:, :, 2, 2] = -torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match="eigenvalue -1"):
        full.weight = minus_id


def test_registration_keeps_the_raw_weight():
    torch.manual_seed(0)
    conv = CircularConv2d(2, 3, 3).double()
    raw = conv.weight.detach().clone()
    register_cayley(conv, 4)
    assert torch.equal(conv.parametrizations.weight.original.detach(), raw)
    assert isinstance(conv.parametrizations.weight[0], CayleyConv)
    conv2 = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular").double()
    raw2 = conv2.weight.detach().clone()
    register_bcop(conv2)
    assert torch.equal(conv2.parametrizations.weight.original.detach(), raw2)
    assert isinstance(conv2.parametrizations.weight[0], BCOPConv)
    with pytest.raises(NotImplementedError, match="no right inverse"):
        conv2.weight = bcop_kernel(raw2)


# ------------------------------------------------------------------------ gradients


def test_gradcheck():
    for shape, n in [((3, 2, 3, 3), 4), ((2, 3, 3, 3), 5)]:
        w = torch.randn(shape, dtype=F64, generator=gen(9), requires_grad=True)
        assert torch.autograd.gradcheck(lambda w, n=n: cayley_kernel(w, n), (w,))
        assert torch.autograd.gradcheck(bcop_kernel, (w,))
    conv = CircularConv2d(2, 3, 3).double()
    x = torch.randn(2, 2, 5, 5, dtype=F64, generator=gen(10), requires_grad=True)
    w = torch.randn(3, 2, 7, 7, dtype=F64, generator=gen(11), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: conv._conv_forward(x, w, None), (x, w))


def test_training_step_keeps_the_operator_orthogonal():
    for kind in ("cayley", "bcop"):
        conv = make(kind, 3, 3, 3, 4)
        opt = torch.optim.SGD(conv.parameters(), lr=0.5)
        x = torch.randn(8, 3, 4, 4, dtype=F64, generator=gen(12))
        before = conv.weight.detach().clone()
        conv(x).pow(3).sum().backward()
        opt.step()
        assert (conv.weight.detach() - before).abs().max() > 1e-3
        assert orthonormality_error(operator_matrix(conv, (3, 4, 4))) < 1e-12


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("conv", "match"),
    [
        (nn.Conv2d(2, 2, 3, padding=1), "padding_mode='zeros'"),
        (
            nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular", stride=2),
            "only stride 1",
        ),
        (
            nn.Conv2d(2, 2, 3, padding=2, padding_mode="circular", dilation=2),
            "dilation",
        ),
        (
            nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=2),
            "groups=2",
        ),
        (nn.Conv2d(2, 2, 4, padding=1, padding_mode="circular"), "odd square kernel"),
        (nn.Conv2d(2, 2, 3, padding=0, padding_mode="circular"), r"needs \(1, 1\)"),
    ],
)
def test_unsupported_convolutions_are_refused(conv, match):
    with pytest.raises(ValueError, match=match):
        register_bcop(conv)
    assert not parametrize.is_parametrized(conv)


def test_cayley_registration_errors():
    # a plain nn.Conv2d needs the padding of the dense kernel
    with pytest.raises(ValueError, match=r"needs \(3, 3\)"):
        register_cayley(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), 6)
    with pytest.raises(ValueError, match="exceeds the dense kernel size"):
        register_cayley(CircularConv2d(2, 2, 5), 3)
    with pytest.raises(ValueError, match="positive int"):
        register_cayley(CircularConv2d(2, 2, 3), 0)
    conv = cayley_conv2d(2, 2, 3, 4)
    with pytest.raises(ValueError, match="on 4x4 inputs only"):
        conv(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="already parametrized"):
        register_bcop(conv)
    with pytest.raises(TypeError, match=r"nn\.Conv2d"):
        check_circular_conv(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="odd"):
        CircularConv2d(2, 2, 2)
    with pytest.raises(ValueError, match="odd square kernel no larger"):
        cayley_kernel(torch.randn(2, 2, 3, 3), 1)
    with pytest.raises(ValueError, match="odd square kernel"):
        bcop_kernel(torch.randn(2, 2, 2, 2))


# ------------------------------------------------------------------- Appendix B


def test_hamming_window_is_numpys_normalised():
    for k in (1, 3, 5):
        ref = np.outer(np.hamming(k), np.hamming(k))
        ref /= ref.sum()
        assert np.allclose(hamming_window(k).numpy(), ref, rtol=0, atol=1e-15)


def test_apodize():
    V = torch.randn(4, 3, 5, 5, dtype=F64, generator=gen(13))
    h = hamming_window(5)
    assert torch.allclose(apodize(V, centred=False), V * h, rtol=0, atol=0)
    C = apodize(V)
    assert C.sum((1, 2, 3)).abs().max() < 1e-14
    assert torch.allclose(C, V * h - (V * h).mean((1, 2, 3), keepdim=True))
    with pytest.raises(ValueError, match="square"):
        apodize(torch.randn(2, 2, 3, 5))


def test_eq17_the_apodised_patches_sum_to_the_input():
    z = torch.randn(2, 3, 6, 7, dtype=F64, generator=gen(14))
    for k in (1, 3, 4):
        h = hamming_window(k)
        P = apodized_patches(z, h)
        assert P.shape == (2, 3 * k * k, (6 + k - 1) * (7 + k - 1))
        assert (assemble_patches(P, (3, 6, 7), k) - z).abs().max() < 1e-14
        # without the window, every pixel is counted once per patch covering it
        ones = torch.ones(k, k, dtype=F64)
        assert torch.allclose(
            assemble_patches(apodized_patches(z, ones), (3, 6, 7), k), k * k * z
        )


# ---------------------------------------------------- Theorem 4 for a convolution


def test_theorem4_for_an_orthogonal_convolution_and_not_for_qr_filters():
    ci, co, n = 2, 1, 3  # K = 9 units, D = 18
    g = gen(15)
    conv = make("cayley", ci, co, 3, n, seed=5)
    with torch.no_grad():
        conv.bias.normal_(generator=g)
    A, B = layer_maso([conv, nn.ReLU()], (ci, n, n))
    assert mutual_coherence(A) < 1e-12
    z, _ = sample_factorial(A, B, 400, generator=g)
    assert torch.equal(joint_map(A, B, z), factorised_map(A, B, z))

    torch.manual_seed(5)
    qr = nn.Conv2d(ci, co, 3, padding=1, padding_mode="circular").double()
    parametrize.register_parametrization(qr, "weight", OrthogonalFilters())
    with torch.no_grad():
        qr.bias.copy_(conv.bias)
    A, B = layer_maso([qr, nn.ReLU()], (ci, n, n))
    z, _ = sample_factorial(A, B, 400, generator=g)
    mismatch = (joint_map(A, B, z) != factorised_map(A, B, z)).any(1)
    assert mismatch.double().mean() > 0.05


def _coherence(c_in, c_out, k, stride, n, variant, seed):
    from smaso.orthogonal import orthogonalize

    V = torch.randn(c_out, c_in, k, k, generator=gen(seed), dtype=F64)
    W = {
        "qr": lambda: orthogonalize(V),
        "hamming": lambda: orthogonalize(apodize(V, centred=False)),
        "centred": lambda: orthogonalize(apodize(V)),
    }[variant]()
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(W)
    A, _ = layer_maso([conv, nn.ReLU()], (c_in, n, n))
    return mutual_coherence(A).item()


@pytest.mark.parametrize("variant", ["qr", "hamming", "centred"])
def test_orthonormal_filters_give_an_orthogonal_operator_iff_no_overlap(variant):
    for k, s, n in [(3, 1, 3), (3, 3, 9), (5, 5, 10)]:  # one position / disjoint
        assert _coherence(4, 4, k, s, n, variant, 0) < 1e-12
    for k, s, n in [(3, 1, 4), (3, 2, 7), (5, 3, 11)]:  # overlapping patches
        assert _coherence(4, 4, k, s, n, variant, 0) > 1e-3


def test_apodisation_helps_at_stride_2_and_hurts_at_stride_1():
    def mean(k, s, n, v):
        return np.mean([_coherence(4, 4, k, s, n, v, seed) for seed in range(5)])

    for v in ("hamming", "centred"):
        assert mean(3, 2, 7, v) < 0.5 * mean(3, 2, 7, "qr")
        assert mean(3, 1, 4, v) > mean(3, 1, 4, "qr")
        assert mean(5, 1, 8, v) > mean(5, 1, 8, "qr")


def test_eq18_is_false_and_the_constant_kk_fixes_it():
    z = torch.randn(3, 2, 10, 9, dtype=F64, generator=gen(16))
    z_hat = torch.randn(3, 2, 10, 9, dtype=F64, generator=gen(17))
    for k in (2, 3, 5):
        h = hamming_window(k)
        v = apodized_patches(z - z_hat, h)  # the residuals of Eq. (18), per patch
        lhs = (assemble_patches(v, (2, 10, 9), k) ** 2).sum((1, 2, 3))
        rhs = (v**2).sum((1, 2))
        assert torch.allclose(rhs, (h**2).sum() * lhs, rtol=1e-12)
        assert (lhs > rhs).all()  # the paper's inequality fails ...
        # ... Cauchy-Schwarz with k*k holds (with equality for a flat window, k = 2)
        assert (lhs <= k * k * rhs * (1 + 1e-12)).all()
    # two equal vectors: ||2v||^2 = 4 ||v||^2 > 2 ||v||^2
    v = torch.randn(7, dtype=F64, generator=gen(18))
    assert ((v + v) ** 2).sum() > 2 * (v**2).sum()


def test_theorem4_joint_map_is_the_relu_pattern():
    """At sigma^2 = 1 with the Theorem-2 prior, the joint MAP of an orthogonal conv
    layer is the layer's ReLU on/off pattern, read from the module's output."""
    for kind, (ci, co, n) in [("cayley", (2, 2, 2)), ("bcop", (3, 2, 2))]:
        conv = make(kind, ci, co, 3, n, seed=6)
        with torch.no_grad():
            conv.bias.normal_(generator=gen(19))
        A, B = layer_maso([conv, nn.ReLU()], (ci, n, n))
        z = torch.randn(300, ci * n * n, dtype=F64, generator=gen(20))
        relu_on = conv(z.reshape(-1, ci, n, n)).flatten(1) > 0
        assert torch.equal(joint_map(A, B, z) == 0, relu_on)
