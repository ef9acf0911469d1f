"""Soft and β-VQ inference for any MASO (Sections 3.3 and 4, Eq. 6–9, Proposition 2,
Theorem 3).

A MASO unit picks a region with the hard VQ of Eq. (2). Here that choice is replaced by
a point of the probability simplex that solves an entropy-penalised problem:

* soft VQ, Eq. (6)/(7):  T_S = argmax_t  <t, s> + H(t)                 = softmax(s);
* β-VQ,   Eq. (8)/(9):  T_β = argmax_t  β <t, s> + (1 − β) H(t)        = softmax(η s),
  η = β / (1 − β);

where s_r = <A_r, z> + B_r are the unit's region scores (:func:`smaso.maso.scores`). β =
1 gives the hard VQ, β = ½ the soft VQ, β = 0 the uniform 1/R ("linear MASO"). The MASO
output for any of these matrices is Eq. (2), :func:`smaso.maso.apply_vq`.

Shapes follow :mod:`smaso.maso`: ``A`` (K, R, D), ``B`` (K, R), ``z`` (N, D) or (D,); β
is a number or a tensor of shape () or (K,) (one β per unit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import as_beta, as_pair, check_eta
from .maso import apply_vq, check_params, scores

__all__ = [
    "beta_from_eta",
    "beta_maso",
    "beta_select",
    "beta_softmax",
    "beta_vq",
    "entropy",
    "eta_from_beta",
    "maximise_on_simplex",
    "soft_maso",
    "soft_vq",
    "vq_objective",
    "window_pool",
]


def eta_from_beta(beta):
    """η = β / (1 − β) of Theorem 3 / Proposition 7 (β = 1 gives η = inf)."""
    like = (
        beta
        if isinstance(beta, torch.Tensor)
        else torch.empty((), dtype=torch.get_default_dtype())
    )
    beta = as_beta(beta, like)
    return beta / (1 - beta)


def beta_from_eta(eta):
    """β = η / (1 + η), the inverse of :func:`eta_from_beta`.

    η ≥ 0; η = inf gives β = 1.
    """
    eta = torch.as_tensor(
        eta,
        dtype=eta.dtype if isinstance(eta, torch.Tensor) else torch.get_default_dtype(),
    )
    if torch.isnan(eta).any() or (eta < 0).any():
        raise ValueError(f"eta must be >= 0, got {eta.flatten()[:4].tolist()}")
    return torch.where(torch.isinf(eta), torch.ones_like(eta), eta / (1 + eta))


def beta_softmax(s: torch.Tensor, beta, dim: int = -1) -> torch.Tensor:
    """The β-VQ of scores ``s`` along ``dim``: softmax(η s) with η = β/(1−β), Eq. (9),
    Theorem 3.

    ``beta`` broadcasts against ``s`` with ``dim`` removed (a number, or e.g. one β per
    unit). The limits are exact and finite, with no NaN or inf for any finite scores:

    * β = 1 (η = ∞): the hard VQ; at ties the mass is split evenly over the tied maxima,
      which is the limit of softmax(η s) as η → ∞ (the MASO output is the same for any
      split of a tie);
    * β = 0 (η = 0): the uniform 1/R;
    * 0 < β < 1: softmax(η s), computed with the max subtracted (log-sum-exp), so large
      scores or η close to ∞ do not overflow. Gradients w.r.t. ``s`` and β are those of
      this expression.
    """
    return beta_select(s, beta, dim, lambda logits: torch.softmax(logits, dim=dim))


def _check_scores(s) -> None:
    if not isinstance(s, torch.Tensor) or not s.is_floating_point():
        raise TypeError("s must be a floating-point tensor of scores")
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")


def beta_select(s: torch.Tensor, beta, dim: int, weights) -> torch.Tensor:
    """Shared body of the β-VQ maps: ``weights(η (s − max s))`` for 0 ≤ β < 1, the exact
    hard VQ at β = 1.

    ``weights`` maps logits to the simplex along ``dim`` (softmax for Eq. (9); α-entmax
    for the Tsallis VQ of :mod:`smaso.tsallis`). The logits are shifted by the maximum
    and clamped to be finite, so η·gap is never NaN; at β = 1 the mass is split evenly
    over the tied maxima.
    """
    _check_scores(s)
    beta = as_beta(beta, s)
    if beta.ndim:
        beta = beta.unsqueeze(dim)
    hard = beta == 1
    eta = beta / torch.where(hard, torch.ones_like(beta), 1 - beta)  # finite everywhere
    top_score = s.amax(dim=dim, keepdim=True)
    gap = (s - top_score).clamp(
        min=torch.finfo(s.dtype).min
    )  # <= 0 and finite; 0 at the maximum
    soft = weights(eta * gap)  # η·gap may reach -inf (weight 0), never NaN
    if hard.any():
        top = s == top_score
        limit = top.to(s.dtype) / top.sum(dim=dim, keepdim=True)
        soft = torch.where(hard, limit, soft)
    return soft


def window_pool(
    x: torch.Tensor,
    eta,
    kernel_size,
    stride,
    padding,
    weights,
    name: str = "window_pool",
) -> torch.Tensor:
    """Σ_i w_i u_i over each pooling window of (N, C, H, W) ``x``, with w =
    ``weights``(η u) along dim 2.

    The shared body of the VQ poolings (the VQ of a max-pooling MASO, whose pieces are
    the window's entries): softmax weights give
    :func:`smaso.activations.beta_softmax_pool2d`, α-entmax
    weights :func:`smaso.tsallis.tsallis_pool2d`. Zero-padding positions get logit −inf
    (weight 0), so they are excluded from the window, as max-pooling excludes them.
    ``eta`` a number or a (C,) tensor.
    """
    if x.ndim != 4:
        raise ValueError(f"{name} expects (N, C, H, W), got shape {tuple(x.shape)}")
    eta = check_eta(eta, x)
    if eta.ndim == 1:
        if eta.shape[0] != x.shape[1]:
            raise ValueError(
                f"eta has {eta.shape[0]} entries but x has {x.shape[1]} channels"
            )
        eta = eta.view(1, -1, 1, 1)  # one per channel, broadcast over the windows
    elif eta.ndim != 0:
        raise ValueError(
            f"eta must be a number or a (C,) tensor, got shape {tuple(eta.shape)}"
        )
    (kh, kw), (ph, pw) = as_pair(kernel_size), as_pair(padding)
    sh, sw = as_pair(stride if stride is not None else kernel_size)
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"kernel {kh}x{kw} does not fit a {H}x{W} input with padding {padding}"
        )
    u = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw)).view(
        N, C, kh * kw, Ho * Wo
    )
    valid = (
        F.unfold(
            torch.ones(1, 1, H, W, dtype=x.dtype, device=x.device),
            (kh, kw),
            padding=(ph, pw),
            stride=(sh, sw),
        ).view(1, 1, kh * kw, Ho * Wo)
        > 0
    )
    w = weights((eta * u).masked_fill(~valid, float("-inf")))
    return (w * u.masked_fill(~valid, 0.0)).sum(2).view(N, C, Ho, Wo)


def soft_vq(A, B, z):
    """Soft-VQ selection matrix T_S (N, K, R), Eq. (6): p(t_k = r | z) =
    softmax_r(<A_kr, z> + B_kr).

    This is the posterior of the GMM of Theorem 2 at σ² = 1
    (:func:`smaso.gmm.posterior`), and the maximiser of Eq. (7) (Proposition 2).

    Args:
        A: slopes, shape ``(K, R, D)``.
        B: offsets, shape ``(K, R)``.
        z: the input, shape ``(N, D)`` or ``(D,)``.

    Returns:
        The soft VQ matrix, shape ``(N, K, R)`` (or ``(K, R)`` for unbatched ``z``);
        each row lies on the probability simplex.

    Example::

        >>> import torch
        >>> from smaso.maso import apply_vq
        >>> from smaso.vq import soft_vq
        >>> A, B = torch.tensor([[[1.0], [0.0]]]), torch.zeros(1, 2)  # ReLU
        >>> z = torch.linspace(-3, 3, 7)[:, None]
        >>> torch.allclose(apply_vq(A, B, z, soft_vq(A, B, z)), z * torch.sigmoid(z))
        True
    """
    return torch.softmax(scores(A, B, z), dim=-1)


def beta_vq(A, B, z, beta):
    """β-VQ selection matrix T_β (N, K, R), Eq. (9), Theorem 3; ``beta`` a number or
    (K,) tensor in [0, 1].

    ``softmax_r(η s)`` of the region scores ``s`` with η = β / (1 − β)
    (:func:`beta_softmax`). β = 1: hard VQ (ties split evenly); β = ½: soft VQ
    (Eq. 6); β = 0: uniform 1/R.

    Args:
        A: slopes, shape ``(K, R, D)``.
        B: offsets, shape ``(K, R)``.
        z: the input, shape ``(N, D)`` or ``(D,)``.
        beta: a number or a tensor of shape ``()`` or ``(K,)`` (one β per unit), in
            [0, 1].

    Returns:
        The β-VQ matrix, shape ``(N, K, R)`` (or ``(K, R)`` for unbatched ``z``).

    Example::

        >>> import torch
        >>> from smaso.maso import hard_vq
        >>> from smaso.vq import beta_vq, soft_vq
        >>> g = torch.Generator().manual_seed(0)
        >>> A, B = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, generator=g)
        >>> z = torch.randn(5, 4, generator=g)
        >>> torch.allclose(beta_vq(A, B, z, 0.5), soft_vq(A, B, z))
        True
        >>> torch.equal(beta_vq(A, B, z, 1.0), hard_vq(A, B, z))
        True
    """
    K, _, _ = check_params(A, B, z)
    beta = as_beta(beta, A)
    if beta.ndim not in (0, 1) or (beta.ndim == 1 and beta.shape[0] != K):
        raise ValueError(
            f"beta must be a number or a tensor of shape (K,) = ({K},), got shape "
            f"{tuple(beta.shape)}"
        )
    return beta_softmax(scores(A, B, z), beta, dim=-1)


def soft_maso(A, B, z):
    """MASO output under soft VQ: Eq. (2) with T = T_S.

    Section 3.4; the ReLU gives the SiLU, Prop. 3.
    """
    return apply_vq(A, B, z, soft_vq(A, B, z))


def beta_maso(A, B, z, beta):
    """MASO output under β-VQ: Eq. (2) with T = T_β.

    Section 4; the ReLU gives swish, Prop. 7.
    """
    return apply_vq(A, B, z, beta_vq(A, B, z, beta))


def entropy(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy H(t) = −Σ_r t_r log t_r along ``dim`` (0 log 0 = 0), Eq. 7–8."""
    return -torch.special.xlogy(t, t).sum(dim=dim)


def vq_objective(t: torch.Tensor, s: torch.Tensor, beta=0.5) -> torch.Tensor:
    """The entropy-penalised VQ objective β <t, s> + (1 − β) H(t) of Eq. (8) (Table 1).

    At β = ½ it is half of Eq. (7), <t, s> + H(t), so both have the same maximiser.
    """
    beta = as_beta(beta, s)
    return beta * (t * s).sum(-1) + (1 - beta) * entropy(t)


def _simplex_beta(s, beta, step_size) -> torch.Tensor:
    """β as a tensor for :func:`maximise_on_simplex`, after checking its arguments."""
    beta = as_beta(beta, s)
    if (beta >= 1).any():
        raise ValueError(
            "maximise_on_simplex needs beta < 1 (at beta = 1 the maximiser is the "
            "hard VQ)"
        )
    if not 0 < step_size < 2:
        raise ValueError(
            "step_size must lie in (0, 2) for the iteration to converge, got "
            f"{step_size}"
        )
    return beta


def maximise_on_simplex(
    s: torch.Tensor, beta=0.5, steps: int = 200, step_size: float = 0.5
) -> torch.Tensor:
    """Maximise :func:`vq_objective` over the simplex numerically, by mirror
    (exponentiated-gradient) ascent.

    Independent of the closed form: starts from the uniform point and iterates ``t ← t ·
    exp(lr · ∇f(t))`` followed by normalisation, with ∇f = β s − (1 − β)(log t + 1) and
    ``lr = step_size / (1 − β)`` (the entropy term's curvature sets the scale; the error
    shrinks by a factor ``1 − step_size`` per step). Used to check Proposition 2 and
    Theorem 3 (the closed forms are the optima). For 0 ≤ β < 1 and 0 < step_size < 2.
    """
    beta = _simplex_beta(s, beta, step_size)
    lr = step_size / (1 - beta)
    log_t = torch.full_like(s, -torch.log(torch.tensor(float(s.shape[-1]))).item())
    for _ in range(steps):
        grad = beta * s - (1 - beta) * (log_t + 1)
        log_t = torch.log_softmax(log_t + lr * grad, dim=-1)
    return log_t.exp()
