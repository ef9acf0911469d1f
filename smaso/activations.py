"""Nonlinearities induced by soft and β-VQ inference (Sections 3.4, 3.5 and 4; Table 1).

Three layers of the same idea:

1. the MASO parameters of scalar piecewise-affine activations (:func:`relu_maso`,
   :func:`leaky_relu_maso`, :func:`abs_maso`, :func:`convex_maso`) and their β-VQ
   applied elementwise (:func:`scalar_beta_maso`) — the *derivation*, straight from Eq.
   (9) and Eq. (2);
2. the closed forms that derivation gives (:func:`swish`, :func:`beta_vq_abs`,
   :func:`beta_vq_leaky_relu`, :func:`beta_softmax_pool2d`), and the maths the
   modules run with its derivatives (:func:`two_piece_vq`, :func:`two_piece_vq_grads`,
   :func:`max_affine_vq`, :func:`max_affine_vq_grads`, :func:`softmax_pool_windows`,
   :func:`softmax_pool_grads`): the forward and hand-written backward of their fused
   kernels (:mod:`smaso.fused`; :mod:`smaso.native` on the CPU,
   :mod:`smaso.triton_kernels` on CUDA);
3. drop-in ``nn.Module`` activations with a learnable β per channel or per layer
   (:class:`BetaVQReLU`, :class:`BetaVQLeakyReLU`, :class:`BetaVQAbs`,
   :class:`BetaVQMaxPool2d`, :class:`BetaVQMaxout`, :class:`TsallisVQReLU`), which run
   those fused kernels by default and fall back to autograd where they cannot.

The closed forms take η = β / (1 − β) ≥ 0 (the swish parameter, Proposition 7). The
modules learn ρ = logit(β), so β = sigmoid(ρ) stays in (0, 1) and η = exp(ρ).
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import fused, native, triton_kernels
from .checks import as_beta, as_pair, check_alpha, check_eta
from .tsallis import (
    CLOSED_FORM_ALPHAS,
    entmax,
    tsallis_sigmoid,
    tsallis_sigmoid_slope,
)
from .vq import beta_softmax, window_pool

__all__ = [
    "BetaVQAbs",
    "BetaVQLeakyReLU",
    "BetaVQMaxPool2d",
    "BetaVQMaxout",
    "BetaVQReLU",
    "SoftplusSwish",
    "TsallisVQReLU",
    "abs_maso",
    "beta_softmax_pool2d",
    "beta_vq_abs",
    "beta_vq_leaky_relu",
    "convex_maso",
    "leaky_relu_maso",
    "max_affine_vq",
    "max_affine_vq_grads",
    "relu_maso",
    "scalar_beta_maso",
    "softmax_pool_grads",
    "softmax_pool_windows",
    "swish",
    "swish_fused",
    "two_piece_vq",
    "two_piece_vq_grads",
    "window_pool",
]


# --------------------------------------------------------------------------------------
# 1. MASO parameters of scalar activations, and their β-VQ (the derivation)


def convex_maso(slopes, offsets, dtype=torch.float64):
    """(A (1, R, 1), B (1, R)) of the scalar max-affine function max_r (a_r x + b_r),
    Eq. (1) with D = K = 1."""
    a = torch.as_tensor(slopes, dtype=dtype).flatten()
    b = torch.as_tensor(offsets, dtype=dtype).flatten()
    if a.numel() == 0 or a.shape != b.shape:
        raise ValueError(
            "slopes and offsets must be non-empty and of equal length, got "
            f"{a.numel()} and {b.numel()}"
        )
    return a.view(1, -1, 1), b.view(1, -1)


def relu_maso(dtype=torch.float64):
    """ReLU as a MASO (Theorem 1): pieces x (active, r = 1) and 0 (inactive, r = 2)."""
    return convex_maso([1.0, 0.0], [0.0, 0.0], dtype)


def leaky_relu_maso(negative_slope: float = 0.01, dtype=torch.float64):
    """Leaky-ReLU as a MASO: pieces x and s·x, valid for s ≤ 1 (for s > 1 it is
    min(x, sx), concave)."""
    if not negative_slope <= 1:
        raise ValueError(
            f"leaky-ReLU with negative_slope = {negative_slope} > 1 is concave, not a "
            "MASO"
        )
    return convex_maso([1.0, negative_slope], [0.0, 0.0], dtype)


def abs_maso(dtype=torch.float64):
    """Absolute value as a MASO: pieces x and −x."""
    return convex_maso([1.0, -1.0], [0.0, 0.0], dtype)


def scalar_beta_maso(A, B, x: torch.Tensor, beta) -> torch.Tensor:
    """Apply a scalar MASO unit (A (1, R, 1), B (1, R)) elementwise to ``x`` under β-VQ,
    Eq. (9) then Eq. (2).

    ``beta`` is a number or broadcasts against ``x``. β = 1 gives the hard activation
    itself.
    """
    if A.shape[0] != 1 or A.shape[2] != 1 or B.shape != A.shape[:2]:
        raise ValueError(
            "expected a scalar MASO unit A (1, R, 1), B (1, R); got "
            f"{tuple(A.shape)}, {tuple(B.shape)}"
        )
    s = x.unsqueeze(-1) * A[0, :, 0].to(x) + B[0].to(x)  # (..., R) region scores
    beta = as_beta(beta, x)
    return (beta_softmax(s, beta.unsqueeze(-1) if beta.ndim else beta, dim=-1) * s).sum(
        -1
    )


# --------------------------------------------------------------------------------------
# 2. Closed forms


def swish(x: torch.Tensor, eta=1.0) -> torch.Tensor:
    """swish(x) = x · sigmoid(η x): the β-VQ of the ReLU MASO with η = β/(1−β)
    (Proposition 7).

    η = 1 (β = ½, soft VQ) is the SiLU / sigmoid-weighted linear unit (Proposition 3); η
    → ∞ gives the ReLU, η = 0 the linear x/2.
    """
    eta = check_eta(eta, x)
    return x * torch.sigmoid(eta * x)


def beta_vq_abs(x: torch.Tensor, eta=1.0) -> torch.Tensor:
    """β-VQ of the absolute-value MASO (pieces ±x): x · tanh(η x)."""
    eta = check_eta(eta, x)
    return x * torch.tanh(eta * x)


def beta_vq_leaky_relu(
    x: torch.Tensor, eta=1.0, negative_slope: float = 0.01
) -> torch.Tensor:
    """β-VQ of the leaky-ReLU MASO (pieces x, s x): s x + (1 − s) x · sigmoid(η (1 − s)
    x)."""
    if not negative_slope <= 1:
        raise ValueError(
            f"leaky-ReLU with negative_slope = {negative_slope} > 1 is concave, not a "
            "MASO"
        )
    eta = check_eta(eta, x)
    s = negative_slope
    return s * x + (1 - s) * x * torch.sigmoid(eta * (1 - s) * x)


def beta_softmax_pool2d(
    x: torch.Tensor, eta=1.0, kernel_size=2, stride=None, padding=0
) -> torch.Tensor:
    """β-softmax pooling of (N, C, H, W) ``x``: Σ_i softmax(η u)_i u_i over each window
    (Proposition 4, Table 1).

    The β-VQ of the max-pooling MASO whose pieces are the window's entries. η = 1 is
    softmax pooling (soft VQ), η → ∞ max-pooling, η = 0 average pooling over the
    window's valid entries. ``eta`` is a number or a (C,) tensor (one per channel). Zero
    padding positions are excluded from the window, as max-pooling excludes its padding.
    """
    return window_pool(
        x,
        eta,
        kernel_size,
        stride,
        padding,
        lambda logits: torch.softmax(logits, dim=2),
        "beta_softmax_pool2d",
    )


# --------------------------------------------------------------------------------------
# The maths the learnable modules run, with its derivatives: the hand-written backward
# of their fused kernels (:mod:`smaso.fused`)


def two_piece_vq(x: torch.Tensor, eta, slope: float = 0.0, alpha: float = 1.0):
    """β-VQ of the two-piece MASO with pieces x and s·x (s = ``slope`` ≤ 1), the maths
    of :class:`BetaVQReLU` (s = 0), :class:`BetaVQLeakyReLU` and :class:`BetaVQAbs`
    (s = −1): Theorem 3 (Eq. 9) with R = 2, then Eq. (2).

    The two regions' scores differ by (1 − s) x, so the first gets the weight w(u),
    u = η (1 − s) x, with w = sigmoid (Eq. 9); the output is
    s x + (1 − s) x w(u) = x (s + (1 − s) w(u)): swish at s = 0 (Proposition 7),
    x tanh(η x) at s = −1. ``alpha`` > 1 takes the α-entropy VQ weight
    :func:`smaso.tsallis.tsallis_sigmoid` instead ((8.3); :class:`TsallisVQReLU`).
    ``eta`` broadcasts against ``x``.

    Args:
        x: the input, any shape.
        eta: η = β / (1 − β) > 0, a number or a tensor broadcastable against ``x``.
        slope: the second piece's slope s ≤ 1 (default 0: the ReLU).
        alpha: the entropy's α (default 1: Shannon, the sigmoid of Eq. 9).

    Returns:
        x (s + (1 − s) w(η (1 − s) x)), of the broadcast shape of ``x`` and ``eta``.

    Example::

        >>> import torch
        >>> from smaso.activations import two_piece_vq
        >>> x = torch.linspace(-3, 3, 7)
        >>> torch.allclose(two_piece_vq(x, 1.0), torch.nn.functional.silu(x))
        True
        >>> torch.allclose(two_piece_vq(x, 2.0, slope=-1.0), x * torch.tanh(2 * x))
        True
    """
    c = 1 - slope
    return x * (slope + c * tsallis_sigmoid(eta * (c * x), alpha))


def two_piece_vq_grads(x: torch.Tensor, eta, slope: float = 0.0, alpha: float = 1.0):
    """(∂f/∂x, ∂f/∂η) of :func:`two_piece_vq` f = x (s + (1 − s) w(u)), u = η (1 − s) x.

    ∂f/∂x = s + (1 − s) (w + u w′) and ∂f/∂η = ((1 − s) x)² w′, with w′ = dw/du
    (:func:`smaso.tsallis.tsallis_sigmoid_slope`; σ (1 − σ) for Eq. 9). Both come from
    the weight w and its slope w′, computed once: the dη of a learnable β costs a
    product and a sum on top of the input gradient.
    """
    c = 1 - slope
    v = c * x
    u = eta * v
    w = tsallis_sigmoid(u, alpha)
    dw = tsallis_sigmoid_slope(u, w, alpha)
    return slope + c * (w + u * dw), v * v * dw


@functools.cache  # one set of kernels per configuration
def _two_piece_kernels(slope: float, alpha: float) -> fused.Kernels:
    """Fused kernels of :func:`two_piece_vq` for one (slope, α); ``eta`` (M, 1) per
    row of (M, L) rows, or anything broadcastable (the sum is to ``eta``'s shape)."""
    return _make_two_piece_kernels(slope, alpha)


def _make_two_piece_kernels(slope: float, alpha: float) -> fused.Kernels:

    def value(x, eta):
        return two_piece_vq(x, eta, slope, alpha)

    def forward(x, eta):
        return (two_piece_vq(x, eta, slope, alpha),)

    def backward(g, x, eta):
        dx, deta = two_piece_vq_grads(x, eta, slope, alpha)
        return g * dx, (g * deta).sum_to_size(eta.shape)

    def native_forward(x, eta):  # Triton on CUDA, C++ on the CPU (α = 1)
        tk = triton_kernels
        out = tk.attempt(tk.two_piece_forward, x, eta, slope, alpha)
        if out is None and alpha == 1.0:
            out = native.two_piece_forward(x, eta, slope)
        return out

    def native_backward(g, x, eta):
        tk = triton_kernels
        out = tk.attempt(tk.two_piece_backward, g, x, eta, slope, alpha)
        if out is None and alpha == 1.0:
            out = native.two_piece_backward(g, x, eta, slope)
        return out

    def native_applies(x):
        return triton_kernels.applies(x) or (alpha == 1.0 and native.applies(x))

    if alpha not in CLOSED_FORM_ALPHAS:
        return fused.Kernels(value)  # entmax by bisection: eager only
    return fused.Kernels(
        value, forward, backward, native_forward, native_backward, native_applies
    )


def swish_fused(
    x: torch.Tensor, eta: torch.Tensor, compiled: bool = True
) -> torch.Tensor:
    """:func:`swish` through the fused kernels of :class:`BetaVQReLU`: a compiled
    forward and the hand-written backward :func:`two_piece_vq_grads` (grad w.r.t. x
    and η).

    ``eta`` is a tensor broadcastable to ``x`` (e.g. (1, C, 1, 1)). ``compiled=False``
    runs the same kernels eagerly (used to check the backward with ``gradcheck``).
    Raises where the fused kernels cannot run (e.g. an integer dtype).
    """
    if not isinstance(eta, torch.Tensor):
        raise TypeError("swish_fused needs eta as a tensor broadcastable to x")
    return fused.run(
        _two_piece_kernels(0.0, 1.0),
        x,
        eta.to(x.dtype),
        fused=True,
        compiled=compiled,
    )


def _pieces(x, slopes, offsets):
    """The R region scores s_r = a_r x + b_r of rows ``x`` (M, L), slopes and offsets
    (M, R): a list of R (M, L) tensors (pieces unrolled: R is small)."""
    return [
        x * slopes[:, r : r + 1] + offsets[:, r : r + 1] for r in range(slopes.shape[1])
    ]


def _softmax_weights(s, eta):
    """T = softmax(η s) over the list of scores ``s`` (Eq. 9), stabilised by the max."""
    m = functools.reduce(torch.maximum, s)
    z = [torch.exp(eta * (v - m)) for v in s]
    inv = 1 / functools.reduce(operator.add, z)
    return [zr * inv for zr in z]


def max_affine_vq(x: torch.Tensor, slopes, offsets, eta) -> torch.Tensor:
    """β-VQ of scalar max-affine units max_r (a_r x + b_r), one unit per row:
    Σ_r T_r s_r with s_r = a_r x + b_r and T = softmax(η s) (Theorem 3, Eq. 9; Eq. 2).

    ``x`` (M, L), ``slopes`` and ``offsets`` (M, R), ``eta`` (M, 1): the maths of
    :class:`BetaVQMaxout` (α = 1) on units as rows (:func:`smaso.fused.fold`).
    """
    s = _pieces(x, slopes, offsets)
    T = _softmax_weights(s, eta)
    return functools.reduce(operator.add, [t * v for t, v in zip(T, s, strict=True)])


def max_affine_vq_grads(x: torch.Tensor, slopes, offsets, eta):
    """Derivatives of :func:`max_affine_vq` y = Σ_r T_r s_r: the R tensors ∂y/∂s_r =
    T_r (1 + η (s_r − y)) and ∂y/∂η = Σ_r T_r s_r (s_r − y).

    From Eq. (9), ∂T_r/∂(η s_q) = T_r (δ_rq − T_q); everything follows from the weights
    T the forward computes. The chain rule gives ∂y/∂x = Σ_r a_r ∂y/∂s_r, ∂y/∂a_r = x
    ∂y/∂s_r and ∂y/∂b_r = ∂y/∂s_r.
    """
    s = _pieces(x, slopes, offsets)
    T = _softmax_weights(s, eta)
    pairs = list(zip(T, s, strict=True))
    y = functools.reduce(operator.add, [t * v for t, v in pairs])
    dy_ds = [t * (1 + eta * (v - y)) for t, v in pairs]
    dy_deta = functools.reduce(operator.add, [t * v * (v - y) for t, v in pairs])
    return dy_ds, dy_deta


def _max_affine_value(x, slopes, offsets, eta):
    return max_affine_vq(x, slopes, offsets, eta)


def _max_affine_forward(x, slopes, offsets, eta):
    return (max_affine_vq(x, slopes, offsets, eta),)


def _max_affine_backward(g, x, slopes, offsets, eta):
    dy_ds, dy_deta = max_affine_vq_grads(x, slopes, offsets, eta)
    gs = [g * d for d in dy_ds]
    gx = functools.reduce(
        operator.add, [slopes[:, r : r + 1] * d for r, d in enumerate(gs)]
    )
    g_slopes = torch.cat([(d * x).sum(-1, keepdim=True) for d in gs], 1)
    g_offsets = torch.cat([d.sum(-1, keepdim=True) for d in gs], 1)
    return gx, g_slopes, g_offsets, (g * dy_deta).sum_to_size(eta.shape)


_MAX_AFFINE_KERNELS = fused.Kernels(
    _max_affine_value,
    _max_affine_forward,
    _max_affine_backward,
    functools.partial(triton_kernels.attempt, triton_kernels.max_affine_forward),
    functools.partial(triton_kernels.attempt, triton_kernels.max_affine_backward),
    triton_kernels.applies,  # on CUDA
)


def softmax_pool_windows(x: torch.Tensor, eta, kh: int, kw: int):
    """β-softmax pooling over non-overlapping kh×kw windows (stride = kernel, no
    padding; H, W multiples of kh, kw), and each window's log-partition: (y, lse).

    y = Σ_i w_i u_i with w = softmax(η u) over the window (Proposition 4, Eq. 9) and
    lse = log Σ_i exp(η u_i), so that w_i = exp(η u_i − lse): the backward recomputes
    the weights of any entry from (y, lse) without the window. ``x`` (N, C, H, W),
    ``eta`` (C,) or (1, C, 1, 1).
    """
    N, C, H, W = x.shape
    u = x.view(N, C, H // kh, kh, W // kw, kw)
    e = eta.view(1, C, 1, 1, 1, 1)
    lse = torch.logsumexp(e * u, dim=(3, 5))
    w = torch.exp(e * u - lse[:, :, :, None, :, None])
    return (w * u).sum((3, 5)), lse


def _per_entry(t, kh, kw):
    """A per-window (N, C, Ho, Wo) tensor repeated to each entry of its window."""
    N, C, Ho, Wo = t.shape
    t = t[:, :, :, None, :, None].expand(N, C, Ho, kh, Wo, kw)
    return t.reshape(N, C, Ho * kh, Wo * kw)


def softmax_pool_grads(x: torch.Tensor, eta, y, lse, kh: int, kw: int):
    """Derivatives of :func:`softmax_pool_windows` for every input entry u_i: ∂y/∂u_i =
    w_i (1 + η (u_i − y)), and w_i u_i (u_i − y), the entry's term of ∂y/∂η.

    With w = softmax(η u), ∂w_j/∂(η u_i) = w_j (δ_ij − w_i) (Eq. 9) gives both; w_i =
    exp(η u_i − lse) comes from the forward's (y, lse), entry by entry.
    """
    e = eta.view(1, -1, 1, 1)
    w = torch.exp(e * x - _per_entry(lse, kh, kw))
    d = x - _per_entry(y, kh, kw)
    return w * (1 + e * d), w * x * d


@functools.cache
def _pool_kernels(kh: int, kw: int) -> fused.Kernels:
    """Fused kernels of β-softmax pooling over non-overlapping kh×kw windows; ``x``
    (1, M, H, W) (units as channels), ``eta`` (1, M, 1, 1)."""
    return _make_pool_kernels(kh, kw)


def _make_pool_kernels(kh: int, kw: int) -> fused.Kernels:

    def value(x, eta):
        return beta_softmax_pool2d(x, eta.view(-1), (kh, kw))

    def forward(x, eta):
        y, lse = softmax_pool_windows(x, eta, kh, kw)
        return y, y, lse  # the output, then what the backward needs besides x, eta

    def backward(g, x, eta, y, lse):
        dx, deta = softmax_pool_grads(x, eta, y, lse, kh, kw)
        gu = _per_entry(g, kh, kw)
        return gu * dx, (gu * deta).sum((0, 2, 3), keepdim=True)

    def native_forward(x, eta):  # Triton, on CUDA
        return triton_kernels.attempt(triton_kernels.pool_forward, x, eta, kh, kw)

    def native_backward(g, x, eta, y, lse):
        tk = triton_kernels
        return tk.attempt(tk.pool_backward, g, x, eta, y, lse, kh, kw)

    return fused.Kernels(
        value,
        forward,
        backward,
        native_forward,
        native_backward,
        triton_kernels.applies,
    )


# --------------------------------------------------------------------------------------
# 3. Modules with a learnable β


def _init_rho(num_channels, beta_init, learnable):
    if not 0.0 < beta_init < 1.0:
        raise ValueError(
            "beta_init must lie in (0, 1) (the parametrisation beta = sigmoid(rho)), "
            f"got {beta_init}"
        )
    if num_channels is not None and (
        isinstance(num_channels, bool)
        or not isinstance(num_channels, int)
        or num_channels < 1
    ):
        raise ValueError(
            "num_channels must be a positive int or None (one beta for the layer), "
            f"got {num_channels!r}"
        )
    rho = torch.full((num_channels or 1,), math.log(beta_init / (1 - beta_init)))
    return nn.Parameter(rho, requires_grad=learnable)


def _check_fused(fused):
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    return fused


def _two_piece_module(module, x, slope, alpha):
    """Run :func:`two_piece_vq` with the module's learnable η = exp(ρ) per channel."""
    rows, (eta,), unfold = fused.fold(x, module.rho.exp().to(x.dtype))
    kernels = _two_piece_kernels(float(slope), float(alpha))
    return unfold(fused.run(kernels, rows, eta.unsqueeze(-1), fused=module.fused))


class _LearnableBeta(nn.Module):
    """What the learnable-β modules below share: β's parameter ρ = logit β (one per
    channel, ``num_channels``, or one for the layer, ``None``), starting at
    ``beta_init``, learned unless ``learnable=False``; their ``fused`` choice; and the
    read-outs β and η."""

    def __init__(
        self,
        num_channels: int | None = None,
        beta_init: float = 0.5,
        learnable: bool = True,
        fused: bool | None = None,
    ):
        super().__init__()
        self._init_beta(num_channels, beta_init, learnable, fused)

    def _init_beta(self, num_channels, beta_init, learnable, fused) -> None:
        self.rho = _init_rho(num_channels, beta_init, learnable)
        self.fused = _check_fused(fused)

    @property
    def beta(self) -> torch.Tensor:
        """β = sigmoid(ρ) ∈ (0, 1), one per channel (or one for the layer)."""
        return torch.sigmoid(self.rho)

    @property
    def eta(self) -> torch.Tensor:
        """η = β / (1 − β) = exp(ρ)."""
        return torch.exp(self.rho)

    def extra_repr(self):
        n = self.rho.numel()
        channels = f"num_channels={n}" if n > 1 else "one beta"
        return f"{channels}, learnable={self.rho.requires_grad}, fused={self.fused}"


class BetaVQReLU(_LearnableBeta):
    """β-VQ ReLU = swish x · sigmoid(η x) with learnable β (Proposition 7); a drop-in
    like ``nn.SiLU``.

    ``num_channels`` gives one β per channel (dim 1), ``None`` one β for the layer.
    ``beta_init = ½`` starts at the SiLU. The maths is :func:`two_piece_vq` (slope 0).
    ``fused`` (default ``None``): the compiled kernels with the hand-written backward
    :func:`two_piece_vq_grads` where they can run, else eager autograd (same numbers
    up to rounding); ``True`` requires them, ``False`` never uses them
    (:mod:`smaso.fused`). The first call per dtype compiles (seconds).

    Args:
        num_channels: one β per channel (dim 1) of this many channels, or ``None``
            (default) for one β for the layer.
        beta_init: the starting β ∈ (0, 1) (default ½, the SiLU).
        learnable: whether β is trained (default True).
        fused: ``None`` (default), ``True`` or ``False``, as above.

    Example::

        >>> import torch
        >>> from smaso.activations import BetaVQReLU
        >>> act = BetaVQReLU(num_channels=3, fused=False)
        >>> act.beta.detach().tolist(), act.rho.requires_grad
        ([0.5, 0.5, 0.5], True)
        >>> x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(act(x), torch.nn.functional.silu(x))
        True
    """

    def forward(self, x):
        return _two_piece_module(self, x, 0.0, 1.0)


class BetaVQLeakyReLU(_LearnableBeta):
    """β-VQ leaky-ReLU s x + (1 − s) x · sigmoid(η (1 − s) x) with learnable β; slope
    s ≤ 1 (:func:`two_piece_vq`). ``fused`` as in :class:`BetaVQReLU`."""

    def __init__(
        self,
        negative_slope: float = 0.01,
        num_channels: int | None = None,
        beta_init: float = 0.5,
        learnable: bool = True,
        fused: bool | None = None,
    ):
        if not negative_slope <= 1:
            raise ValueError(
                f"leaky-ReLU with negative_slope = {negative_slope} > 1 is concave, "
                "not a MASO"
            )
        super().__init__(num_channels, beta_init, learnable, fused)
        self.negative_slope = negative_slope

    def forward(self, x):
        return _two_piece_module(self, x, self.negative_slope, 1.0)


class BetaVQAbs(_LearnableBeta):
    """β-VQ absolute value x · tanh(η x) with learnable β: :func:`two_piece_vq` with
    pieces x and −x. ``fused`` as in :class:`BetaVQReLU`."""

    def forward(self, x):
        return _two_piece_module(self, x, -1.0, 1.0)


class BetaVQMaxPool2d(_LearnableBeta):
    """β-softmax pooling with learnable β (Proposition 4, Table 1); ``beta_init = ½``
    is softmax pooling.

    Non-overlapping windows (``stride`` None or equal to ``kernel_size``, no padding;
    like max-pooling, rows and columns that do not fill a window are dropped) run the
    fused kernels :func:`softmax_pool_windows` / :func:`softmax_pool_grads`
    (``fused`` as in :class:`BetaVQReLU`); other windows run
    :func:`beta_softmax_pool2d` eagerly.
    """

    def __init__(
        self,
        kernel_size=2,
        stride=None,
        padding=0,
        num_channels: int | None = None,
        beta_init: float = 0.5,
        learnable: bool = True,
        fused: bool | None = None,
    ):
        super().__init__(num_channels, beta_init, learnable, fused)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        eta = self.rho.exp().to(x.dtype)
        k = as_pair(self.kernel_size)
        s = as_pair(self.stride if self.stride is not None else self.kernel_size)
        windows = x.ndim == 4 and x.shape[2] >= k[0] and x.shape[3] >= k[1]
        if not (windows and s == k and as_pair(self.padding) == (0, 0)):
            eta = eta if eta.numel() > 1 else eta.reshape(())
            kernels = fused.Kernels(
                lambda x, eta: beta_softmax_pool2d(
                    x, eta, self.kernel_size, self.stride, self.padding
                )
            )
            return fused.run(kernels, x, eta, fused=self.fused)
        Ho, Wo = x.shape[2] // k[0], x.shape[3] // k[1]
        if (Ho * k[0], Wo * k[1]) != x.shape[2:]:
            x = x[:, :, : Ho * k[0], : Wo * k[1]].contiguous()
        rows, (eta,), unfold = fused.fold(x, eta, spatial=True)
        eta = eta.view(1, -1, 1, 1)
        y = fused.run(_pool_kernels(*k), rows, eta, fused=self.fused, unit_dim=1)
        return unfold(y)


# --------------------------------------------------------------------------------------
# 4. Beyond the paper (Section 6, future work 1 and 2): a learned convex max-affine
#    activation under β-VQ, and activations from the Tsallis α-entropy VQ
#    (:mod:`smaso.tsallis`)


class BetaVQMaxout(_LearnableBeta):
    """A learned convex max-affine activation max_r (a_cr x + b_cr) with R pieces per
    channel, under β-VQ.

    Each channel c has its own slopes a_c (R,), offsets b_c (R,) and β_c, all learned.
    The output is Σ_r T_r (a_cr x + b_cr) with T = softmax(η s) (Eq. 9, Theorem 3), or
    the α-entropy VQ α-entmax(η s) of :mod:`smaso.tsallis` ((8.3) of the book) when
    ``alpha`` > 1.
    The hard VQ (β = 1, :meth:`hard`) is the convex max-affine function itself (Eq. 1).
    Initialisation: slopes evenly spaced in [0, 1], offsets 0, so the hard version
    starts as the ReLU. At α = 1 the maths is :func:`max_affine_vq`, with fused kernels
    (``fused`` as in :class:`BetaVQReLU`); α > 1 runs eagerly.
    """

    def __init__(
        self,
        num_channels: int,
        pieces: int = 3,
        alpha: float = 1.0,
        beta_init: float = 0.5,
        learnable: bool = True,
        fused: bool | None = None,
    ):
        # nn.Module's own set-up, and ρ after the pieces: the parameters keep the
        # order (slopes, offsets, rho) that stored optimiser states were saved in
        nn.Module.__init__(self)
        if (
            isinstance(num_channels, bool)
            or not isinstance(num_channels, int)
            or num_channels < 1
        ):
            raise ValueError(
                "num_channels must be a positive int (pieces are per channel), got "
                f"{num_channels!r}"
            )
        if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 2:
            raise ValueError(
                "pieces must be an int >= 2 (R affine pieces per channel), got "
                f"{pieces!r}"
            )
        self.alpha = check_alpha(alpha)
        self.slopes = nn.Parameter(
            torch.linspace(0.0, 1.0, pieces).repeat(num_channels, 1)
        )
        self.offsets = nn.Parameter(torch.zeros(num_channels, pieces))
        self._init_beta(num_channels, beta_init, learnable, fused)

    def scores(self, x):
        """Region scores s_r = a_cr x + b_cr of ``x`` (N, C, ...), shape (N, C, R, ...):
        pieces in dim 2.

        (Pieces next to the channels, not last, keep the spatial planes contiguous:
        several times faster on CPU than a trailing dimension of size R.)
        """
        C, R = self.slopes.shape
        if x.ndim < 2 or x.shape[1] != C:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not have {C} channels in dim 1"
            )
        shape = (1, C, R) + (1,) * (x.ndim - 2)
        return x.unsqueeze(2) * self.slopes.to(x.dtype).view(shape) + self.offsets.to(
            x.dtype
        ).view(shape)

    def hard(self, x):
        """The hard-VQ (β = 1) output: the convex max-affine function max_r s_r (Eq.
        1)."""
        return self.scores(x).amax(2)

    def forward(self, x):
        if self.alpha != 1.0:
            if self.fused:
                raise RuntimeError(
                    f"fused=True, but alpha = {self.alpha} has no fused kernels"
                )
            s = self.scores(x)
            eta = self.rho.exp().to(x.dtype).view((1, -1) + (1,) * (x.ndim - 1))
            return (entmax(eta * s, self.alpha, dim=2) * s).sum(2)
        C = self.slopes.shape[0]
        if x.ndim < 2 or x.shape[1] != C:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not have {C} channels in dim 1"
            )
        dt = x.dtype
        params = self.slopes.to(dt), self.offsets.to(dt), self.rho.exp().to(dt)
        rows, (a, b, eta), unfold = fused.fold(x, *params)
        y = fused.run(
            _MAX_AFFINE_KERNELS, rows, a, b, eta.unsqueeze(-1), fused=self.fused
        )
        return unfold(y)

    def extra_repr(self):
        C, R = self.slopes.shape
        return (
            f"num_channels={C}, pieces={R}, alpha={self.alpha}, "
            f"learnable={self.rho.requires_grad}, fused={self.fused}"
        )


class TsallisVQReLU(_LearnableBeta):
    """α-entropy VQ of the ReLU, x · tsallis_sigmoid(η x, α), with learnable β ((8.3)
    of the book, :mod:`smaso.tsallis`).

    α = 1 is swish (:class:`BetaVQReLU`); α = 2 the Gini-VQ x · clip((η x + 1)/2, 0, 1),
    which at β = 1/4 (η = 1/3) is hard-swish; α = 1.5 lies between (smooth, exactly 0
    for η x ≤ −2 and x for η x ≥ 2). ``num_channels`` gives one β per channel (dim 1),
    ``None`` one for the layer. The maths is :func:`two_piece_vq` (slope 0, weight
    :func:`smaso.tsallis.tsallis_sigmoid`); α ∈ {1, 1.5, 2} have fused kernels
    (``fused`` as in :class:`BetaVQReLU`), other α run eagerly.
    """

    def __init__(
        self,
        num_channels: int | None = None,
        alpha: float = 2.0,
        beta_init: float = 0.25,
        learnable: bool = True,
        fused: bool | None = None,
    ):
        super().__init__(num_channels, beta_init, learnable, fused)
        self.alpha = check_alpha(alpha)

    def forward(self, x):
        return _two_piece_module(self, x, 0.0, self.alpha)

    def extra_repr(self):
        return f"alpha={self.alpha}, " + super().extra_repr()


class SoftplusSwish(nn.Module):
    """swish x · sigmoid(η x) with η = softplus(ρ), one learnable ρ per channel (dim 1),
    starting at ``rho_init = 0.5`` (η ≈ 0.974): the parametrisation of the authors'
    released code for the swish runs of Section 5 (Proposition 7's β-VQ ReLU, with
    β = η / (1 + η); :class:`BetaVQReLU` learns ρ = log η instead).
    """

    def __init__(self, num_channels: int, rho_init: float = 0.5):
        super().__init__()
        if (
            isinstance(num_channels, bool)
            or not isinstance(num_channels, int)
            or num_channels < 1
        ):
            raise ValueError(
                f"num_channels must be a positive int, got {num_channels!r}"
            )
        self.rho = nn.Parameter(torch.full((num_channels,), float(rho_init)))

    @property
    def eta(self) -> torch.Tensor:
        """η = softplus(ρ) > 0, one per channel."""
        return F.softplus(self.rho)

    @property
    def beta(self) -> torch.Tensor:
        """β = η / (1 + η) ∈ (0, 1), one per channel."""
        return self.eta / (1 + self.eta)

    def forward(self, x):
        C = self.rho.numel()
        if x.ndim < 2 or x.shape[1] != C:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not have {C} channels in dim 1"
            )
        eta = F.softplus(self.rho).to(x.dtype).view((1, C) + (1,) * (x.ndim - 2))
        return x * torch.sigmoid(eta * x)

    def extra_repr(self):
        return f"num_channels={self.rho.numel()}, eta=softplus(rho)"
