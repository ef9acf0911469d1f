"""Nonlinearities induced by soft and β-VQ inference (Sections 3.4, 3.5 and 4; Table 1).

Three layers of the same idea:

1. the MASO parameters of scalar piecewise-affine activations (:func:`relu_maso`,
   :func:`leaky_relu_maso`, :func:`abs_maso`, :func:`convex_maso`) and their β-VQ
   applied elementwise (:func:`scalar_beta_maso`) — the *derivation*, straight from Eq.
   (9) and Eq. (2);
2. the closed forms that derivation gives (:func:`swish`, :func:`beta_vq_abs`,
   :func:`beta_vq_leaky_relu`, :func:`beta_softmax_pool2d`) — what a network runs;
3. drop-in ``nn.Module`` activations with a learnable β per channel or per layer
   (:class:`BetaVQReLU`, :class:`BetaVQLeakyReLU`, :class:`BetaVQAbs`,
   :class:`BetaVQMaxPool2d`).

The closed forms take η = β / (1 − β) ≥ 0 (the swish parameter, Proposition 7). The
modules learn ρ = logit(β), so β = sigmoid(ρ) stays in (0, 1) and η = exp(ρ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checks import as_beta as _as_beta
from .checks import check_alpha as _check_alpha
from .checks import check_eta as _check_eta
from .tsallis import entmax, tsallis_sigmoid
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
    "relu_maso",
    "scalar_beta_maso",
    "swish",
    "swish_fused",
    "window_pool",
]


# ----------------------------------------------------------------------------------------------
# 1. MASO parameters of scalar activations, and their β-VQ (the derivation)


def convex_maso(slopes, offsets, dtype=torch.float64):
    """(A (1, R, 1), B (1, R)) of the scalar max-affine function max_r (a_r x + b_r), Eq. (1) with D = K = 1."""
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
    """Leaky-ReLU as a MASO: pieces x and s·x, valid for s ≤ 1 (for s > 1 it is min(x, sx), concave)."""
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
    beta = _as_beta(beta, x)
    return (beta_softmax(s, beta.unsqueeze(-1) if beta.ndim else beta, dim=-1) * s).sum(
        -1
    )


# ----------------------------------------------------------------------------------------------
# 2. Closed forms


def swish(x: torch.Tensor, eta=1.0) -> torch.Tensor:
    """swish(x) = x · sigmoid(η x): the β-VQ of the ReLU MASO with η = β/(1−β)
    (Proposition 7).

    η = 1 (β = ½, soft VQ) is the SiLU / sigmoid-weighted linear unit (Proposition 3); η
    → ∞ gives the ReLU, η = 0 the linear x/2.
    """
    eta = _check_eta(eta, x)
    return x * torch.sigmoid(eta * x)


def beta_vq_abs(x: torch.Tensor, eta=1.0) -> torch.Tensor:
    """β-VQ of the absolute-value MASO (pieces ±x): x · tanh(η x)."""
    eta = _check_eta(eta, x)
    return x * torch.tanh(eta * x)


def beta_vq_leaky_relu(
    x: torch.Tensor, eta=1.0, negative_slope: float = 0.01
) -> torch.Tensor:
    """β-VQ of the leaky-ReLU MASO (pieces x, s x): s x + (1 − s) x · sigmoid(η (1 − s) x)."""
    if not negative_slope <= 1:
        raise ValueError(
            f"leaky-ReLU with negative_slope = {negative_slope} > 1 is concave, not a "
            "MASO"
        )
    eta = _check_eta(eta, x)
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


# ----------------------------------------------------------------------------------------------
# A fused swish for training speed: one pass forward, one pass backward (custom autograd
# with kernels compiled by torch.compile), same function as :func:`swish`.


def _swish_forward(x, eta):
    return x * torch.sigmoid(eta * x)


def _swish_backward(g, x, eta):
    s = torch.sigmoid(eta * x)
    ds = s * (1 - s)
    grad_x = g * (s + eta * x * ds)
    grad_eta = (g * x * x * ds).sum_to_size(eta.shape)
    return grad_x, grad_eta


def _swish_backward_x(g, x, eta):
    s = torch.sigmoid(eta * x)
    return g * (s + eta * x * s * (1 - s))


_KERNELS = {"fwd": _swish_forward, "bwd": _swish_backward, "bwd_x": _swish_backward_x}
_COMPILED: dict[str, object] = {}


def _kernel(name: str, compiled: bool):
    if not compiled:
        return _KERNELS[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_KERNELS[name], dynamic=False)
    return _COMPILED[name]


class _Swish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eta, compiled):
        ctx.save_for_backward(x, eta)
        ctx.compiled = compiled
        return _kernel("fwd", compiled)(x, eta)

    @staticmethod
    def backward(ctx, g):
        x, eta = ctx.saved_tensors
        if ctx.needs_input_grad[
            1
        ]:  # learnable β: the per-channel reduction for dη as well
            grad_x, grad_eta = _kernel("bwd", ctx.compiled)(g.contiguous(), x, eta)
            return grad_x, grad_eta, None
        return _kernel("bwd_x", ctx.compiled)(g.contiguous(), x, eta), None, None


def swish_fused(
    x: torch.Tensor, eta: torch.Tensor, compiled: bool = True
) -> torch.Tensor:
    """:func:`swish` with a hand-written backward (grad w.r.t. x and η), fused by
    ``torch.compile``.

    ``eta`` is a tensor broadcastable to ``x`` (e.g. (1, C, 1, 1)). ``compiled=False``
    runs the same kernels eagerly (used to check the backward with ``gradcheck``). The
    first compiled call per shape and dtype takes seconds (code generation); later calls
    are fast.
    """
    if not isinstance(eta, torch.Tensor):
        raise TypeError("swish_fused needs eta as a tensor broadcastable to x")
    return _Swish.apply(x, eta.to(x.dtype), compiled)


# ----------------------------------------------------------------------------------------------
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


def _channel_eta(rho, x, channel_dim=1):
    """η = exp(ρ) shaped to broadcast along ``x``'s channel dimension (or a scalar for one β)."""
    if rho.numel() == 1:
        return rho.exp().to(x.dtype).reshape(())
    if x.ndim <= channel_dim or x.shape[channel_dim] != rho.numel():
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not have {rho.numel()} channels in "
            f"dim {channel_dim}"
        )
    shape = [1] * x.ndim
    shape[channel_dim] = -1
    return rho.exp().to(x.dtype).view(shape)


class _LearnableBeta:
    """Shared read-outs of the learnable β (mixin of the modules below)."""

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
        return f"{'num_channels=' + str(n) if n > 1 else 'one beta'}, learnable={self.rho.requires_grad}"


class BetaVQReLU(_LearnableBeta, nn.Module):
    """β-VQ ReLU = swish x · sigmoid(η x) with learnable β (Proposition 7); a drop-in
    like ``nn.SiLU``.

    ``num_channels`` gives one β per channel (dim 1), ``None`` one β for the layer.
    ``beta_init = ½`` starts at the SiLU. ``fused=True`` uses :func:`swish_fused`
    (compiled kernels) for speed.
    """

    def __init__(
        self,
        num_channels: int | None = None,
        beta_init: float = 0.5,
        learnable: bool = True,
        fused: bool = False,
    ):
        super().__init__()
        self.rho = _init_rho(num_channels, beta_init, learnable)
        self.fused = fused

    def forward(self, x):
        eta = _channel_eta(self.rho, x)
        if self.fused:
            return swish_fused(x, eta if eta.ndim else eta.view([1] * x.ndim))
        return x * torch.sigmoid(eta * x)


class BetaVQLeakyReLU(_LearnableBeta, nn.Module):
    """β-VQ leaky-ReLU s x + (1 − s) x · sigmoid(η (1 − s) x) with learnable β; slope s ≤ 1."""

    def __init__(
        self,
        negative_slope: float = 0.01,
        num_channels: int | None = None,
        beta_init: float = 0.5,
        learnable: bool = True,
    ):
        super().__init__()
        if not negative_slope <= 1:
            raise ValueError(
                f"leaky-ReLU with negative_slope = {negative_slope} > 1 is concave, "
                "not a MASO"
            )
        self.negative_slope = negative_slope
        self.rho = _init_rho(num_channels, beta_init, learnable)

    def forward(self, x):
        return beta_vq_leaky_relu(x, _channel_eta(self.rho, x), self.negative_slope)


class BetaVQAbs(_LearnableBeta, nn.Module):
    """β-VQ absolute value x · tanh(η x) with learnable β."""

    def __init__(
        self,
        num_channels: int | None = None,
        beta_init: float = 0.5,
        learnable: bool = True,
    ):
        super().__init__()
        self.rho = _init_rho(num_channels, beta_init, learnable)

    def forward(self, x):
        return beta_vq_abs(x, _channel_eta(self.rho, x))


class BetaVQMaxPool2d(_LearnableBeta, nn.Module):
    """β-softmax pooling with learnable β (Proposition 4, Table 1); ``beta_init = ½`` is softmax pooling."""

    def __init__(
        self,
        kernel_size=2,
        stride=None,
        padding=0,
        num_channels: int | None = None,
        beta_init: float = 0.5,
        learnable: bool = True,
    ):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.rho = _init_rho(num_channels, beta_init, learnable)

    def forward(self, x):
        eta = self.rho.exp().to(x.dtype)
        return beta_softmax_pool2d(
            x,
            eta if eta.numel() > 1 else eta.reshape(()),
            self.kernel_size,
            self.stride,
            self.padding,
        )


# ----------------------------------------------------------------------------------------------
# 4. Beyond the paper (Section 6, future work 1 and 2): a learned convex max-affine
#    activation under β-VQ, and activations from the Tsallis α-entropy VQ
#    (:mod:`smaso.tsallis`)


class BetaVQMaxout(_LearnableBeta, nn.Module):
    """A learned convex max-affine activation max_r (a_cr x + b_cr) with R pieces per
    channel, under β-VQ.

    Each channel c has its own slopes a_c (R,), offsets b_c (R,) and β_c, all learned.
    The output is Σ_r T_r (a_cr x + b_cr) with T = softmax(η s) (Eq. 9, Theorem 3), or
    the α-entropy VQ α-entmax(η s) of :mod:`smaso.tsallis` (Eq. T2) when ``alpha`` > 1.
    The hard VQ (β = 1, :meth:`hard`) is the convex max-affine function itself (Eq. 1).
    Initialisation: slopes evenly spaced in [0, 1], offsets 0, so the hard version
    starts as the ReLU.
    """

    def __init__(
        self,
        num_channels: int,
        pieces: int = 3,
        alpha: float = 1.0,
        beta_init: float = 0.5,
        learnable: bool = True,
    ):
        super().__init__()
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
        self.alpha = _check_alpha(alpha)
        self.slopes = nn.Parameter(
            torch.linspace(0.0, 1.0, pieces).repeat(num_channels, 1)
        )
        self.offsets = nn.Parameter(torch.zeros(num_channels, pieces))
        self.rho = _init_rho(num_channels, beta_init, learnable)

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
        """The hard-VQ (β = 1) output: the convex max-affine function max_r s_r (Eq. 1)."""
        return self.scores(x).amax(2)

    def forward(self, x):
        s = self.scores(x)
        eta = self.rho.exp().to(x.dtype).view((1, -1) + (1,) * (x.ndim - 1))
        u = eta * s
        T = (
            torch.softmax(u, dim=2)
            if self.alpha == 1.0
            else entmax(u, self.alpha, dim=2)
        )
        return (T * s).sum(2)

    def extra_repr(self):
        C, R = self.slopes.shape
        return f"num_channels={C}, pieces={R}, alpha={self.alpha}, learnable={self.rho.requires_grad}"


class TsallisVQReLU(_LearnableBeta, nn.Module):
    """α-entropy VQ of the ReLU, x · tsallis_sigmoid(η x, α), with learnable β (Eq. T2
    of :mod:`smaso.tsallis`).

    α = 1 is swish (:class:`BetaVQReLU`); α = 2 the Gini-VQ x · clip((η x + 1)/2, 0, 1),
    which at β = 1/4 (η = 1/3) is hard-swish; α = 1.5 lies between (smooth, exactly 0
    for η x ≤ −2 and x for η x ≥ 2). ``num_channels`` gives one β per channel (dim 1),
    ``None`` one for the layer.
    """

    def __init__(
        self,
        num_channels: int | None = None,
        alpha: float = 2.0,
        beta_init: float = 0.25,
        learnable: bool = True,
    ):
        super().__init__()
        self.alpha = _check_alpha(alpha)
        self.rho = _init_rho(num_channels, beta_init, learnable)

    def forward(self, x):
        return x * tsallis_sigmoid(_channel_eta(self.rho, x) * x, self.alpha)

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
