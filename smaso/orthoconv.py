"""Orthogonal convolution operators (Eq. 11 and Theorem 4 for a convolution; Appendix B;
Section 6, future work 4).

Theorem 4 needs the slopes of *all* units of a layer to be orthogonal, Eq. (11). For a
convolution the units are every output channel at every position, and their slopes are
the rows of the whole convolution matrix (:func:`smaso.layers.layer_maso` builds it).
Orthonormal flattened filters (:mod:`smaso.orthogonal`) make the rows orthogonal at one
position only. This module has the three ways of going further:

* **apodisation** (Appendix B, and what the authors' code does before Gram-Schmidt):
  filters multiplied by a normalised Hamming window, :func:`hamming_window`,
  :func:`apodize`; and the patch decomposition of Eq. (17), :func:`apodized_patches`,
  :func:`assemble_patches`;
* the **Cayley transform in the Fourier domain** (Trockman & Kolter, ICLR 2021): a
  circular convolution is diagonalised by the 2-D DFT into one ``c_out x c_in`` matrix
  per frequency; the Cayley transform of the skew-Hermitian part of each is unitary
  (semi-unitary when ``c_out != c_in``), :func:`cayley`, :func:`cayley_kernel`. The
  operator is dense (its kernel covers the whole ``n x n`` image), and it is exactly
  orthogonal for one input size ``n``;
* **block convolutional orthogonal parametrisation, BCOP** (Li et al., NeurIPS 2019):
  an orthogonal ``1 x 1`` convolution composed with ``2 x (k-1)`` two-tap convolutions
  ``P + (I - P) z`` (``P`` a symmetric projector), each paraunitary, giving a ``k x k``
  kernel that is orthogonal as a circular convolution at every input size,
  :func:`bcop_kernel`.

Both are ``torch.nn.utils.parametrize`` parametrizations of ``nn.Conv2d`` weights
(:class:`CayleyConv`, :class:`BCOPConv`; :func:`register_cayley`,
:func:`register_bcop`), for stride 1, no dilation, one group and circular 'same'
padding; anything else raises ``ValueError``. :class:`CircularConv2d` is an
``nn.Conv2d`` with circular 'same' padding computed by FFT, the fast way to apply the
dense Cayley kernel. Conventions: an ``n``-periodic *offset kernel* ``h`` (c_out, c_in,
n, n) acts as ``y[o, i] = sum_c sum_m h[o, c, m] x[c, i + m]`` (indices mod ``n``),
which is what ``nn.Conv2d`` computes with circular padding ``p`` from a ``K x K`` weight
whose tap ``q`` sits at offset ``q - p``. Its operator at frequency ``f`` is the
``c_out x c_in`` matrix ``conj(fft2(h))[..., f]``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .orthogonal import orthogonalize

__all__ = [
    "BCOPConv",
    "CayleyConv",
    "CircularConv2d",
    "apodize",
    "apodized_patches",
    "assemble_patches",
    "bcop_conv2d",
    "bcop_kernel",
    "cayley",
    "cayley_conv2d",
    "cayley_kernel",
    "check_circular_conv",
    "frequency_operator",
    "full_kernel_size",
    "hamming_window",
    "inverse_cayley",
    "kernel_from_offsets",
    "offset_kernel",
    "register_bcop",
    "register_cayley",
    "semi_unitary_error",
]


def _check_float(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must be floating point or complex, got {t.dtype}")


def _check_kernel(weight, name="weight"):
    _check_float(weight, name)
    if weight.ndim != 4:
        raise ValueError(
            f"{name} must be a conv weight (c_out, c_in, kh, kw), got shape "
            f"{tuple(weight.shape)}"
        )


def _size(n, name="n"):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int (the input size), got {n!r}")
    return n


# --------------------------------------------------------------------------- Appendix B


def hamming_window(k, dtype=torch.float64):
    """The 2-D apodisation window ``h`` of Appendix B, Eq. (17): the outer product of
    two symmetric Hamming windows of length ``k``, normalised to sum to 1 (as the
    authors' code does before Gram-Schmidt). Shape (k, k)."""
    _size(k, "k")
    w = torch.hamming_window(k, periodic=False, dtype=dtype)
    h = w[:, None] * w[None, :]
    return h / h.sum()


def _check_square(weight):
    """The side of ``weight``'s square kernel (argument checks of :func:`apodize`)."""
    _check_kernel(weight)
    kh, kw = weight.shape[-2:]
    if kh != kw:
        raise ValueError(f"apodize needs square kernels, got {kh}x{kw}")
    return kh


def apodize(weight, centred=True):
    """Apodised filters of Appendix B: each filter times :func:`hamming_window`, then
    (``centred``) minus its mean over ``(c_in, kh, kw)``, so that it sums to zero.

    The authors' code subtracts the filter's *sum* instead of its mean, which does
    not centre it; the mean is what "centred" means here. Square kernels only.
    """
    kh = _check_square(weight)
    V = weight * hamming_window(kh, weight.dtype).to(weight.device)
    if centred:
        V = V - V.mean(dim=(1, 2, 3), keepdim=True)
    return V


def _check_patches(z, h):
    """Argument checks of :func:`apodized_patches`."""
    _check_float(z, "z")
    if z.ndim != 4:
        raise ValueError(f"z must have shape (N, C, H, W), got {tuple(z.shape)}")
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"h must be a square (k, k) window, got {tuple(h.shape)}")


def apodized_patches(z, h):
    """Every apodised patch ``P[z](p) * h`` of Eq. (17): (N, C*k*k, L) for ``z`` (N, C,
    H, W) and a (k, k) window ``h``, one column per patch position ``p``, including the
    patches that stick out of the image (zero outside), so that every pixel lies in
    exactly ``k*k`` patches."""
    _check_patches(z, h)
    k = h.shape[0]
    cols = F.unfold(z, k, padding=k - 1)  # (N, C*k*k, L)
    C = z.shape[1]
    return cols * h.reshape(1, 1, k * k).expand(1, C, k * k).reshape(1, C * k * k, 1)


def assemble_patches(patches, shape, k):
    """Sum of patches placed at their positions, the right side of Eq. (17): the
    inverse of :func:`apodized_patches` when the window sums to 1. ``shape`` is (C, H,
    W)."""
    _, H, W = shape
    return F.fold(patches, (H, W), k, padding=k - 1)


# -------------------------------------------------------------- circulant bookkeeping


def full_kernel_size(n):
    """Kernel size ``K`` of a dense circular 'same' convolution on ``n x n`` inputs:
    ``n`` if odd, else ``n + 1`` (circular padding ``(K-1)/2``; for even ``n`` the
    first and last tap hit the same offset ``n/2``, and the last one is kept zero)."""
    _size(n)
    return n if n % 2 else n + 1


def _scatter(K, n, dtype, device):
    """(n, K) 0/1 matrix: tap q of a K-tap circular 'same' kernel -> offset q - p
    (mod n)."""
    p = (K - 1) // 2
    S = torch.zeros(n, K, dtype=dtype, device=device)
    S[(torch.arange(K, device=device) - p) % n, torch.arange(K, device=device)] = 1
    return S


def offset_kernel(weight, n):
    """The ``n``-periodic offset kernel (c_out, c_in, n1, n2) of the circular 'same'
    convolution with ``weight`` (c_out, c_in, K1, K2), odd ``K``: tap ``q`` adds to
    offset ``(q - (K-1)/2) mod n`` (taps alias when ``K > n``). ``n`` is an int or a
    pair. Linear and differentiable."""
    _check_kernel(weight)
    n1, n2 = (n, n) if isinstance(n, int) else tuple(n)
    K1, K2 = weight.shape[-2:]
    if K1 % 2 == 0 or K2 % 2 == 0:
        raise ValueError(
            f"circular 'same' convolution needs odd kernel sizes, got {K1}x{K2}"
        )
    S1 = _scatter(K1, n1, weight.dtype, weight.device)
    S2 = _scatter(K2, n2, weight.dtype, weight.device)
    return torch.einsum("ak,oikl,bl->oiab", S1, weight, S2)


def kernel_from_offsets(h, K=None):
    """The ``K x K`` weight (default :func:`full_kernel_size`) of a circular 'same'
    convolution with offset kernel ``h`` (c_out, c_in, n, n): inverse of
    :func:`offset_kernel` for ``n <= K <= n + 1``."""
    _check_kernel(h, "h")
    n = h.shape[-1]
    if h.shape[-2] != n:
        raise ValueError(f"h must be square in space, got {tuple(h.shape)}")
    K = full_kernel_size(n) if K is None else K
    if not n <= K <= n + 1 or K % 2 == 0:
        raise ValueError(f"K must be odd and n <= K <= n + 1 = {n + 1}, got {K}")
    T = _scatter(K, n, h.dtype, h.device).T.clone()
    T[n:] = 0  # an aliased last tap (even n) stays zero
    return torch.einsum("ka,oiab,lb->oikl", T, h, T)


def frequency_operator(h):
    """The per-frequency matrices ``M[f] = conj(rfft2(h))[..., f]``, shape (n1, n2 // 2
    + 1, c_out, c_in), of the circular convolution with offset kernel ``h``: the DFT of
    the output at ``f`` is ``M[f]`` times the DFT of the input at ``f``. The operator is
    orthogonal (orthonormal rows / columns) iff every ``M[f]`` is unitary (semi-)."""
    return torch.fft.rfft2(h).conj().permute(2, 3, 0, 1)


# ------------------------------------------------------------------------- Cayley


def cayley(W):
    """Semi-unitary Cayley transform of ``W`` (..., m, k) (Trockman & Kolter 2021).

    For ``m >= k`` write ``W = [U; V]`` with ``U`` (k, k), and let ``X = U - U^H``
    (skew-Hermitian). The Cayley transform ``Q = (I - S)(I + S)^{-1} = 2 (I + S)^{-1} -
    I`` of the skew-Hermitian ``S = [[X, -V^H], [V, 0]]`` (m, m) is unitary; its first
    ``k`` columns are, by block elimination,

        Q[:, :k] = [2 a - I;  -2 V a],   a = (I + X + V^H V)^{-1},

    which has orthonormal columns. For ``m < k``, ``cayley(W^H)^H`` (orthonormal rows).
    Only the skew-Hermitian part of ``U`` matters.
    """
    _check_float(W, "W")
    m, k = W.shape[-2:]
    if m < k:
        return cayley(W.mH).mH
    eye = torch.eye(k, dtype=W.dtype, device=W.device)
    U, V = W[..., :k, :], W[..., k:, :]
    a = torch.linalg.solve(eye + U - U.mH + V.mH @ V, eye.expand_as(U))
    return torch.cat([2 * a - eye, -2 * V @ a], dim=-2)


def semi_unitary_error(Q):
    """``max |Q^H Q - I|`` (``m >= k``) or ``max |Q Q^H - I|`` (``m < k``) of ``Q``
    (..., m, k): zero iff ``Q`` has orthonormal columns (rows)."""
    _check_float(Q, "Q")
    m, k = Q.shape[-2:]
    G = Q.mH @ Q if m >= k else Q @ Q.mH
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return (G - eye).abs().max().item() if G.numel() else 0.0


def inverse_cayley(Q, tol=None):
    """A generator ``W = [X / 2; V]`` with ``cayley(W) == Q`` for a semi-unitary ``Q``
    (..., m, k): from ``Q[:k] = 2 a - I`` and ``Q[k:] = -2 V a``, ``a^{-1} = I + X +
    V^H V`` (and the transpose for ``m < k``). Raises ``ValueError`` when ``Q`` is not
    semi-unitary to ``tol`` (default ``sqrt(eps)``) or when ``Q[:k] + I`` is singular
    (an eigenvalue -1: outside the Cayley image; flipping the sign of some rows of
    ``Q`` moves it inside)."""
    _check_float(Q, "Q")
    m, k = Q.shape[-2:]
    if m < k:
        return inverse_cayley(Q.mH, tol).mH
    real = Q.real if Q.is_complex() else Q
    tol = math.sqrt(torch.finfo(real.dtype).eps) if tol is None else tol
    err = semi_unitary_error(Q)
    if err > tol:
        raise ValueError(
            f"Q is not semi-unitary: max |Q^H Q - I| = {err:.1e} > {tol:.1e}"
        )
    eye = torch.eye(k, dtype=Q.dtype, device=Q.device)
    a = (Q[..., :k, :] + eye) / 2
    if (torch.linalg.svdvals(a)[..., -1] < tol).any():
        raise ValueError(
            "Q[:k] + I is singular (Q has an eigenvalue -1): Q is not a Cayley "
            "transform; flip the sign of some of its rows"
        )
    G = torch.linalg.solve(a, eye.expand_as(a))
    V = -Q[..., k:, :] @ G / 2
    X = G - eye - V.mH @ V
    X = (X - X.mH) / 2  # skew-Hermitian (exactly, in exact arithmetic)
    return torch.cat([X / 2, V], dim=-2)


def _check_generator(weight, n):
    """Argument checks of :func:`cayley_kernel`."""
    _check_kernel(weight)
    _size(n)
    k = weight.shape[-1]
    if weight.shape[-2] != k or k % 2 == 0 or k > full_kernel_size(n):
        raise ValueError(
            "the Cayley generator needs an odd square kernel no larger than the input "
            f"(k <= {full_kernel_size(n)} for n = {n}), got {tuple(weight.shape[-2:])}"
        )


def cayley_kernel(weight, n):
    """The exactly orthogonal circular convolution on ``n x n`` inputs generated by
    ``weight`` (c_out, c_in, k, k), odd ``k`` at most :func:`full_kernel_size` ``(n)``
    (Trockman & Kolter 2021): per
    frequency, :func:`cayley` of the generator's operator. Returns the dense ``K x K``
    weight (``K =`` :func:`full_kernel_size`) of a circular 'same' ``nn.Conv2d``, with
    orthonormal rows (``c_out <= c_in``) or columns (``c_out >= c_in``) of its ``c_out
    n^2 x c_in n^2`` matrix: Eq. (11) for all units at all positions when ``c_out <=
    c_in``."""
    _check_generator(weight, n)
    # cayley commutes with conjugation, so conj(rfft2) on both sides cancels
    M = torch.fft.rfft2(offset_kernel(weight, n)).permute(2, 3, 0, 1)
    h = torch.fft.irfft2(cayley(M).permute(2, 3, 0, 1), s=(n, n))
    return kernel_from_offsets(h)


class CayleyConv(nn.Module):
    """Parametrization ``weight = cayley_kernel(original, n)`` of a circular 'same'
    ``nn.Conv2d`` (use :func:`register_cayley` / :func:`cayley_conv2d`): an exactly
    orthogonal (semi-orthogonal when ``c_out != c_in``) convolution operator on ``n x
    n`` inputs, Eq. (11) (Trockman & Kolter 2021).

    ``right_inverse`` (``layer.weight = Q``): for a dense kernel ``Q`` whose operator
    is semi-orthogonal, the generator of :func:`inverse_cayley`, cropped to the raw
    ``k x k`` support (``ValueError`` if it does not fit there, or if ``Q`` has the
    eigenvalue -1 at some frequency and so no Cayley generator). Any other tensor, e.g.
    the layer's own weight when the parametrization is registered, raises
    ``NotImplementedError``, which ``register_parametrization`` reads as "keep it as
    the raw generator".
    """

    def __init__(self, n, kernel_size):
        super().__init__()
        self.n, self.kernel_size = _size(n), _size(kernel_size, "kernel_size")

    def forward(self, weight):
        return cayley_kernel(weight, self.n)

    def right_inverse(self, Q):
        n, k, K = self.n, self.kernel_size, full_kernel_size(self.n)
        if Q.ndim != 4 or tuple(Q.shape[-2:]) != (K, K):
            raise NotImplementedError(
                f"a tensor of shape {tuple(Q.shape)} is not a {K}x{K} Cayley operator "
                "kernel; set parametrizations.weight.original to change the generator"
            )
        M = frequency_operator(offset_kernel(Q, n))
        err = semi_unitary_error(M)
        if err > math.sqrt(torch.finfo(Q.dtype).eps):
            raise NotImplementedError(
                f"not an orthogonal convolution on {n}x{n} inputs (largest deviation "
                f"from orthonormality {err:.1e}): it has no Cayley generator"
            )
        G = inverse_cayley(M)
        g = torch.fft.irfft2(G.conj().permute(2, 3, 0, 1), s=(n, n))
        raw = kernel_from_offsets(g, n if n % 2 else n + 1)
        c = (raw.shape[-1] - 1) // 2
        r = (k - 1) // 2
        inside = raw[..., c - r : c + r + 1, c - r : c + r + 1]
        outside = raw.abs().sum() - inside.abs().sum()
        if outside > math.sqrt(torch.finfo(raw.dtype).eps) * raw.abs().sum():
            raise ValueError(
                f"this orthogonal operator's Cayley generator is not supported on the "
                f"{k}x{k} window of the raw weight; register with kernel_size = {K}"
            )
        return inside.contiguous()

    def extra_repr(self):
        return f"n={self.n}, kernel_size={self.kernel_size}"


# --------------------------------------------------------------------------- BCOP


def _projector(raw, rank):
    """Symmetric orthogonal projector ``P = U^T U`` (c, c) of rank ``rank``, ``U`` the
    QR-orthonormalised first ``rank`` rows of ``raw`` (c, c)."""
    if rank == 0:
        return torch.zeros_like(raw)
    U = orthogonalize(raw[:rank], "qr")
    return U.T @ U


def _compose(after, before):
    """Kernel of the composition ``after o before`` of two circular convolutions
    (matrix products of taps, full 2-D convolution of the tap grids)."""
    ah, aw = after.shape[-2:]
    out = 0
    for u in range(ah):
        for v in range(aw):
            t = torch.einsum("om,mikl->oikl", after[:, :, u, v], before)
            out = out + F.pad(t, (v, aw - 1 - v, u, ah - 1 - u))
    return out


def _check_bcop(weight):
    """Argument checks of :func:`bcop_kernel`."""
    _check_kernel(weight)
    k, k2 = weight.shape[-2:]
    if k != k2 or k % 2 == 0:
        raise ValueError(f"BCOP needs an odd square kernel, got {k}x{k2}")


def bcop_kernel(weight):
    """The exactly orthogonal ``k x k`` kernel BCOP builds from ``weight`` (c_out, c_in,
    k, k), odd ``k`` (Li et al. 2019): with ``c = min(c_out, c_in)``,

        H(z1, z2) = prod_{j<k} (R_j + (I - R_j) z2) prod_{i<k} (P_i + (I - P_i) z1) H0

    (the product acting on the output channels when ``c_out <= c_in``, on the input
    channels before ``H0`` otherwise). ``H0 = orthogonalize(weight[:, :, 0, 0])``
    (c_out, c_in) has orthonormal rows or columns; ``P_i``, ``R_j`` are rank ``c // 2``
    symmetric projectors from ``weight[:c, :c, i, 0]`` and ``weight[:c, :c, 0, j]``.
    Each factor ``P + (I - P) z`` is paraunitary, ``(P + (I - P) z)^H (P + (I - P) z)
    = I`` on ``|z| = 1``, so the circular convolution is (semi-)orthogonal at every
    input size: Eq. (11). The other raw entries are unused.
    """
    _check_bcop(weight)
    co, ci, k, _ = weight.shape
    c = min(co, ci)
    eye = torch.eye(c, dtype=weight.dtype, device=weight.device)
    H = orthogonalize(weight[:, :, 0, 0], "qr")[:, :, None, None]
    factors = []
    for i in range(1, k):
        P = _projector(weight[:c, :c, i, 0], c // 2)
        factors.append(torch.stack([P, eye - P], dim=-1)[:, :, None, :])  # 1x2 taps
    for j in range(1, k):
        R = _projector(weight[:c, :c, 0, j], c // 2)
        factors.append(torch.stack([R, eye - R], dim=-1)[:, :, :, None])  # 2x1 taps
    for B in factors:
        H = _compose(B, H) if co <= ci else _compose(H, B)
    return H


class BCOPConv(nn.Module):
    """Parametrization ``weight = bcop_kernel(original)`` of a circular 'same'
    ``nn.Conv2d`` (use :func:`register_bcop`): an exactly orthogonal ``k x k``
    convolution at every input size, Eq. (11) (Li et al. 2019).

    No right inverse: not every orthogonal convolution is a BCOP product, and those
    that are have many factorisations. ``right_inverse`` raises
    ``NotImplementedError`` (so registering keeps the layer's weight as the raw one,
    and assigning to ``weight`` is refused).
    """

    def forward(self, weight):
        return bcop_kernel(weight)

    def right_inverse(self, weight):
        raise NotImplementedError(
            "BCOP has no right inverse (orthogonal convolutions have no unique BCOP "
            "factorisation); set parametrizations.weight.original instead"
        )


# ----------------------------------------------------------------------- modules


class CircularConv2d(nn.Conv2d):
    """``nn.Conv2d`` with circular 'same' padding (stride 1), computed by FFT.

    The same function as ``nn.Conv2d(c_in, c_out, K, padding=(K - 1) // 2,
    padding_mode="circular")`` for the odd ``K x K`` weight it is given, at any input
    size (taps wrap around when ``K`` exceeds it), at a cost that does not grow with
    ``K``: the way to apply the dense kernel of :func:`cayley_kernel`. The padding is
    read from the weight's shape at each call, so a parametrization may change it.
    """

    def __init__(self, in_channels, out_channels, kernel_size, bias=True):
        _size(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            padding=(kernel_size - 1) // 2,
            padding_mode="circular",
            bias=bias,
        )

    def _conv_forward(self, input, weight, bias):
        if input.ndim != 4:
            raise ValueError(
                f"expected input of shape (N, C, H, W), got {tuple(input.shape)}"
            )
        n1, n2 = input.shape[-2:]
        M = torch.fft.rfft2(offset_kernel(weight, (n1, n2))).conj()
        Y = torch.einsum("oiab,niab->noab", M, torch.fft.rfft2(input))
        y = torch.fft.irfft2(Y, s=(n1, n2))
        return y if bias is None else y + bias[:, None, None]


def check_circular_conv(conv, padding=None):
    """``ValueError`` unless ``conv`` is an ``nn.Conv2d`` an orthogonal circular
    operator can parametrize: stride 1, dilation 1, one group, odd square kernel,
    circular padding of ``(k - 1) // 2`` (or ``padding``), not already parametrized.
    (A strided or zero-padded convolution matrix is not the circulant these
    constructions diagonalise.)"""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    k1, k2 = conv.kernel_size
    problems = []
    if tuple(conv.stride) != (1, 1):
        problems.append(f"stride {conv.stride} (only stride 1 is supported)")
    if tuple(conv.dilation) != (1, 1):
        problems.append(f"dilation {conv.dilation} (only 1 is supported)")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (only 1 is supported)")
    if k1 != k2 or k1 % 2 == 0:
        problems.append(f"kernel {k1}x{k2} (needs an odd square kernel)")
    want = (k1 - 1) // 2 if padding is None else padding
    if not isinstance(conv, CircularConv2d):
        if conv.padding_mode != "circular":
            problems.append(
                f"padding_mode={conv.padding_mode!r} (needs 'circular': with zero "
                "padding the operator is not orthogonal)"
            )
        if tuple(conv.padding) != (want, want):
            problems.append(f"padding {conv.padding} (needs ({want}, {want}))")
    if parametrize.is_parametrized(conv, "weight"):
        problems.append("its weight is already parametrized")
    if problems:
        raise ValueError(
            f"{conv} cannot be made an orthogonal circular convolution: "
            + "; ".join(problems)
        )


def _input_size_hook(n):
    def hook(module, args):
        x = args[0]
        if tuple(x.shape[-2:]) != (n, n):
            raise ValueError(
                f"this Cayley convolution is orthogonal on {n}x{n} inputs only, got "
                f"{tuple(x.shape[-2:])}"
            )

    return hook


def register_cayley(conv, n):
    """Make ``conv`` an exactly orthogonal circular convolution on ``n x n`` inputs by
    registering :class:`CayleyConv` (its current weight becomes the generator).

    ``conv`` is a :class:`CircularConv2d` (FFT), or an ``nn.Conv2d`` with circular
    padding ``(K - 1) // 2`` for the dense kernel size ``K =`` :func:`full_kernel_size`
    ``(n)`` (spatial, slow). A forward pre-hook refuses other input sizes. Returns
    ``conv``.
    """
    _size(n)
    k = conv.kernel_size[0] if isinstance(conv, nn.Conv2d) else None
    K = full_kernel_size(n)
    check_circular_conv(conv, padding=(K - 1) // 2)
    if k > K:
        raise ValueError(
            f"kernel size {k} exceeds the dense kernel size {K} of {n}x{n} inputs"
        )
    parametrize.register_parametrization(conv, "weight", CayleyConv(n, k), unsafe=True)
    conv.register_forward_pre_hook(_input_size_hook(n))
    return conv


def register_bcop(conv):
    """Make ``conv`` (circular 'same' ``nn.Conv2d``, stride 1) an exactly orthogonal
    convolution at every input size by registering :class:`BCOPConv`. Returns
    ``conv``."""
    check_circular_conv(conv)
    parametrize.register_parametrization(conv, "weight", BCOPConv())
    return conv


def cayley_conv2d(in_channels, out_channels, kernel_size, n, bias=True):
    """A :class:`CircularConv2d` made exactly orthogonal on ``n x n`` inputs by
    :func:`register_cayley`, with a ``kernel_size`` generator (Trockman & Kolter
    2021)."""
    return register_cayley(
        CircularConv2d(in_channels, out_channels, kernel_size, bias=bias), n
    )


def bcop_conv2d(in_channels, out_channels, kernel_size, bias=True):
    """A circular 'same' ``nn.Conv2d`` made exactly orthogonal by :func:`register_bcop`
    (Li et al. 2019)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise ValueError(f"kernel_size must be an odd int, got {kernel_size!r}")
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        padding=(kernel_size - 1) // 2,
        padding_mode="circular",
        bias=bias,
    )
    return register_bcop(conv)
