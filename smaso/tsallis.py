"""VQ with a Tsallis α-entropy penalty: the paper's future work 2 (Section 6), for any
MASO.

Section 6 of the paper proposes to replace the Shannon entropy in Eq. (7)–(8) by another
penalty. Here the penalty is the Tsallis α-entropy, scaled as ((8.1) in chapter 8 of the
book, whose equation numbers (8.x) the docstrings below use)

    H_α(t) = Σ_r (t_r − t_r^α) / (α (α − 1))     (α > 1),     H_1(t) = −Σ_r t_r log t_r,

which tends to the Shannon entropy as α → 1 and is half the Gini index 1 − Σ_r t_r² at α
= 2. The α-entropy VQ of a unit with region scores s_r = <A_r, z> + B_r is

    T_{α,β} = argmax_{t ∈ Δ_R}  β <t, s> + (1 − β) H_α(t)
    (8.2)

(Eq. 8 with H replaced by H_α). For β < 1, dividing by 1 − β leaves <t, η s> + H_α(t)
with the same η = β / (1 − β) as Theorem 3. Its KKT conditions give the unique maximiser

    t_r = [ (α − 1) η s_r − τ ]_+^{1 / (α − 1)},   τ such that Σ_r t_r = 1,
    (8.3)

the α-entmax of η s: softmax at α = 1 (Theorem 3 again), sparsemax (the Euclidean
projection of η s onto the simplex) at α = 2. β = 1 gives the hard VQ and β = 0 the
uniform 1/R, for every α.

For two regions the maximiser depends only on the score difference d = η (s_1 − s_2);
the weight of region 1 is :func:`tsallis_sigmoid` (the logistic sigmoid at α = 1, the
"hard sigmoid" clip((d + 1)/2, 0, 1) at α = 2). Hence the α-entropy VQ of the ReLU MASO
is x · tsallis_sigmoid(η x), which at α = 2, η = 1/3 (β = 1/4) is exactly hard-swish x ·
relu6(x + 3) / 6.

Shapes follow :mod:`smaso.maso`: ``A`` (K, R, D), ``B`` (K, R), ``z`` (N, D) or (D,); β
is a number or a tensor of shape () or (K,); α is a Python number ≥ 1 (a fixed
hyper-parameter).
"""

from __future__ import annotations

import torch

from .checks import as_beta, check_alpha, check_eta, check_float_tensor
from .maso import apply_vq, check_params, scores
from .vq import beta_select, beta_softmax, entropy, window_pool

__all__ = [
    "CLOSED_FORM_ALPHAS",
    "HARD_SWISH_ETA",
    "beta_entmax",
    "entmax",
    "entmax_kkt_residual",
    "scalar_tsallis_maso",
    "sparse_pool_closed_form",
    "sparsemax",
    "tsallis_entropy",
    "tsallis_maso",
    "tsallis_objective",
    "tsallis_pool2d",
    "tsallis_sigmoid",
    "tsallis_sigmoid_slope",
    "tsallis_vq",
    "tsallis_vq_abs",
    "tsallis_vq_leaky_relu",
    "tsallis_vq_relu",
]

#: The scale η (β = η / (1 + η) = 1/4) at which the Gini-VQ (α = 2) of the ReLU is
#: hard-swish.
HARD_SWISH_ETA = 1.0 / 3.0

#: The α whose two-region weight :func:`tsallis_sigmoid` has a closed form (and a slope,
#: :func:`tsallis_sigmoid_slope`); other α solve (8.3) by bisection.
CLOSED_FORM_ALPHAS = (1.0, 1.5, 2.0)


def tsallis_entropy(t: torch.Tensor, alpha: float = 2.0, dim: int = -1) -> torch.Tensor:
    """Tsallis α-entropy H_α(t) = Σ_r (t_r − t_r^α) / (α(α − 1)) along ``dim``; Shannon
    at α = 1 ((8.1) of the book).

    This is Tsallis's entropy divided by α, the scaling under which α = 2 gives
    sparsemax exactly. It is continuous in α at 1 and equals (1 − Σ t_r²)/2, half the
    Gini index, at α = 2.
    """
    check_float_tensor(t, "t")
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        return entropy(t, dim=dim)
    return (t - t.clamp(min=0) ** alpha).sum(dim=dim) / (alpha * (alpha - 1))


def tsallis_objective(
    t: torch.Tensor, s: torch.Tensor, beta=0.5, alpha: float = 2.0
) -> torch.Tensor:
    """The α-entropy VQ objective β <t, s> + (1 − β) H_α(t) of (8.2) (Eq. 8 with H
    → H_α)."""
    beta = as_beta(beta, s)
    return beta * (t * s).sum(-1) + (1 - beta) * tsallis_entropy(t, alpha)


# --------------------------------------------------------------------------------------
# α-entmax: the maximiser of <t, u> + H_α(t) over the simplex ((8.3) with η s = u)


def _sparsemax_last(x: torch.Tensor) -> torch.Tensor:
    """Sparsemax along the last dim by sorting: t = [x − τ]_+ with τ = (Σ_{top k} x −
    1)/k."""
    xs, _ = torch.sort(x, dim=-1, descending=True)
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    cums = xs.cumsum(-1)
    support = (1 + k * xs > cums).sum(
        -1, keepdim=True
    )  # >= 1: the top entry always qualifies
    tau = (cums.gather(-1, support - 1) - 1) / support.to(x.dtype)
    return (x - tau).clamp(min=0)


def _entmax_bisect_last(x: torch.Tensor, alpha: float, n_iter: int) -> torch.Tensor:
    """α-entmax along the last dim of ``x`` = (α−1)(u − max u) (so max x = 0), by
    bisection on τ.

    f(τ) = Σ_r [x_r − τ]_+^{1/(α−1)} decreases in τ; f(−1) ≥ 1 (the top entry alone
    gives 1) and f(−R^{1−α}) ≤ 1 (every entry is at most 1/R), so τ lies in that
    bracket. The result is normalised, which removes the bisection's residual error in Σ
    t.
    """
    p = 1.0 / (alpha - 1)
    R = x.shape[-1]
    lo = torch.full_like(x[..., :1], -1.0)
    hi = torch.full_like(x[..., :1], -(R ** (1 - alpha)))
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        mass = ((x - mid).clamp(min=0) ** p).sum(-1, keepdim=True)
        above = mass >= 1
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    t = (x - lo).clamp(min=0) ** p
    return t / t.sum(-1, keepdim=True)


class _Entmax(torch.autograd.Function):
    """α-entmax along the last dim with the exact backward (α > 1).

    Jacobian of (8.3): dt/du = diag(g) − g gᵀ / Σ g with g_r = t_r^{2−α} on the
    support, 0 off it.
    """

    @staticmethod
    def forward(ctx, u, alpha, n_iter):
        x = (u - u.amax(-1, keepdim=True)) * (alpha - 1)
        x = x.clamp(
            min=-2.0
        )  # entries with x <= -1 are never in the support (τ >= -1); -inf -> -2
        t = (
            _sparsemax_last(x)
            if alpha == 2.0
            else _entmax_bisect_last(x, alpha, n_iter)
        )
        ctx.alpha = alpha
        ctx.save_for_backward(t)
        return t

    @staticmethod
    def backward(ctx, v):
        (t,) = ctx.saved_tensors
        alpha = ctx.alpha
        g = (
            (t > 0).to(t.dtype)
            if alpha == 2.0
            else torch.where(t > 0, t.clamp(min=0) ** (2 - alpha), 0.0)
        )
        gv = g * v
        grad = gv - g * gv.sum(-1, keepdim=True) / g.sum(-1, keepdim=True)
        return grad, None, None


def entmax(
    u: torch.Tensor, alpha: float = 1.5, dim: int = -1, n_iter: int | None = None
) -> torch.Tensor:
    """α-entmax of ``u`` along ``dim``: the maximiser of <t, u> + H_α(t) over the
    simplex ((8.3) of the book).

    α = 1: softmax (Proposition 2); α = 2: sparsemax, computed exactly by sorting; other
    α > 1: the threshold τ of (8.3) by ``n_iter`` bisection steps (default: enough
    for the dtype's precision, 60 for float64, 30 otherwise), then normalised. Gradients
    w.r.t. ``u`` are exact (Jacobian of (8.3)). Entries equal to -inf get weight 0 (at
    least one entry per slice must be finite); NaN or +inf are errors. In float32, α
    within ~1e-3 of 1 loses accuracy: use float64 or α = 1.
    """
    check_float_tensor(u, "u")
    alpha = check_alpha(alpha)
    if torch.isnan(u).any() or (u == float("inf")).any():
        raise ValueError("entmax input contains NaN or +inf")
    if u.ndim == 0:
        raise ValueError("entmax needs at least one dimension")
    if (u == float("-inf")).all(dim=dim).any():
        raise ValueError("entmax: a slice along dim has no finite entry (all -inf)")
    if alpha == 1.0:
        return torch.softmax(u, dim=dim)
    if n_iter is None:
        n_iter = 60 if u.dtype == torch.float64 else 30
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}")
    out = _Entmax.apply(u.movedim(dim, -1), alpha, n_iter)
    return out.movedim(-1, dim)


def sparsemax(u: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax of ``u`` along ``dim``: the Gini (α = 2) case of :func:`entmax`,
    (8.3).

    The Euclidean projection of ``u`` onto the simplex, [u − τ]_+ (Martins & Astudillo,
    2016).
    """
    return entmax(u, 2.0, dim=dim)


def entmax_kkt_residual(
    t: torch.Tensor, u: torch.Tensor, alpha: float = 1.5
) -> torch.Tensor:
    """Largest violation of the KKT conditions certifying t = argmax_{Δ} <t, u> + H_α(t)
    ((8.3) of the book), last dim.

    The problem is strictly concave, so these conditions are necessary and sufficient: t
    ≥ 0, Σ t = 1, and with c_r = (α−1) u_r − t_r^{α−1} (for α > 1; c_r = u_r − log t_r
    for α = 1), c_r = τ on the support and (α−1) u_r ≤ τ off it. Returns one number per
    slice; 0 means optimal. Independent of how ``t`` was computed.
    """
    check_float_tensor(t, "t")
    check_float_tensor(u, "u")
    alpha = check_alpha(alpha)
    if t.shape != u.shape:
        raise ValueError(
            f"t and u must have the same shape, got {tuple(t.shape)} and "
            f"{tuple(u.shape)}"
        )
    feas = torch.maximum((t.sum(-1) - 1).abs(), (-t).clamp(min=0).amax(-1))
    if alpha == 1.0:
        c = u - torch.log(t)
        return torch.maximum(feas, c.amax(-1) - c.amin(-1))
    supp = t > 0
    c = (alpha - 1) * u - t.clamp(min=0) ** (alpha - 1)
    n = supp.sum(-1, keepdim=True).clamp(min=1)
    tau = torch.where(supp, c, 0.0).sum(-1, keepdim=True) / n
    on = torch.where(supp, (c - tau).abs(), 0.0).amax(-1)
    off = torch.where(supp, 0.0, ((alpha - 1) * u - tau).clamp(min=0)).amax(-1)
    return torch.maximum(feas, torch.maximum(on, off))


# --------------------------------------------------------------------------------------
# The α-entropy VQ of a MASO ((8.2)–(8.3) of the book) and its output (Eq. 2)


def beta_entmax(
    s: torch.Tensor, beta, alpha: float = 2.0, dim: int = -1
) -> torch.Tensor:
    """The α-entropy β-VQ of scores ``s`` along ``dim``: α-entmax(η s), η = β/(1−β),
    (8.3).

    The Tsallis counterpart of :func:`smaso.vq.beta_softmax` (which it returns at α =
    1). β = 1 gives the hard VQ (ties split evenly, the limit η → ∞), β = 0 exactly the
    uniform 1/R. ``beta`` broadcasts against ``s`` with ``dim`` removed. Gradients flow
    to ``s`` and β.
    """
    check_float_tensor(s, "s")
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        return beta_softmax(s, beta, dim=dim)
    soft = beta_select(s, beta, dim, lambda logits: entmax(logits, alpha, dim=dim))
    b = as_beta(beta, s)
    b = b.unsqueeze(dim) if b.ndim else b
    if (
        b == 0
    ).any():  # exactly uniform (the bisection would leave rounding-level differences)
        soft = torch.where(b == 0, torch.full_like(soft, 1.0 / s.shape[dim]), soft)
    return soft


def tsallis_vq(A, B, z, beta, alpha: float = 2.0):
    """α-entropy VQ selection matrix T_{α,β} (N, K, R) of a MASO (A, B) at input z,
    (8.2)–(8.3).

    α = 1 is the β-VQ of Theorem 3 (:func:`smaso.vq.beta_vq`); α = 2 the Gini-VQ,
    sparsemax(η s). ``beta`` a number or (K,) tensor in [0, 1].
    """
    K, _, _ = check_params(A, B, z)
    b = as_beta(beta, A)
    if b.ndim not in (0, 1) or (b.ndim == 1 and b.shape[0] != K):
        raise ValueError(
            f"beta must be a number or a tensor of shape (K,) = ({K},), got shape "
            f"{tuple(b.shape)}"
        )
    return beta_entmax(scores(A, B, z), b, alpha, dim=-1)


def tsallis_maso(A, B, z, beta, alpha: float = 2.0):
    """MASO output under the α-entropy VQ: Eq. (2) with T = T_{α,β} of (8.3)."""
    return apply_vq(A, B, z, tsallis_vq(A, B, z, beta, alpha))


def scalar_tsallis_maso(
    A, B, x: torch.Tensor, beta, alpha: float = 2.0
) -> torch.Tensor:
    """Apply a scalar MASO unit (A (1, R, 1), B (1, R)) elementwise to ``x`` under the
    α-entropy VQ ((8.3), Eq. 2).

    The Tsallis counterpart of :func:`smaso.activations.scalar_beta_maso` (equal at α =
    1).
    """
    if A.ndim != 3 or A.shape[0] != 1 or A.shape[2] != 1 or B.shape != A.shape[:2]:
        raise ValueError(
            "expected a scalar MASO unit A (1, R, 1), B (1, R); got "
            f"{tuple(A.shape)}, {tuple(B.shape)}"
        )
    s = x.unsqueeze(-1) * A[0, :, 0].to(x) + B[0].to(x)
    beta = as_beta(beta, x)
    return (
        beta_entmax(s, beta.unsqueeze(-1) if beta.ndim else beta, alpha, dim=-1) * s
    ).sum(-1)


# --------------------------------------------------------------------------------------
# Two regions: the α-sigmoid, and closed forms of the ReLU, leaky-ReLU and absolute
# value


def tsallis_sigmoid(x: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """α-entmax([x, 0])_1: the weight of region 1 of a two-region unit with score
    difference ``x`` ((8.3) of the book).

    The α-entropy counterpart of Proposition 5 (the soft DN layer's output). Closed
    forms: α = 1: sigmoid(x); α = 2: clip((x + 1)/2, 0, 1), a "sparse sigmoid" (at x/3
    it is MobileNetV3's hard-sigmoid relu6(x + 3)/6); α = 1.5: ((d + √(2 − d²))/2)² with
    d = clip(x/2, −1, 1), which is 0 for x ≤ −2 and 1 for x ≥ 2. Other α use
    :func:`entmax` on the pair.

    Args:
        x: the score difference of region 1 over region 2, a float tensor of any shape.
        alpha: the entropy's α ≥ 1 (default 2, the sparse sigmoid).

    Returns:
        the weight of region 1, in [0, 1], of ``x``'s shape.

    Example::

        >>> import torch
        >>> from smaso.tsallis import tsallis_sigmoid
        >>> x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 3.0])
        >>> tsallis_sigmoid(x).tolist()
        [0.0, 0.0, 0.5, 0.75, 1.0]
        >>> torch.allclose(tsallis_sigmoid(x, alpha=1.0), torch.sigmoid(x))
        True
    """
    check_float_tensor(x, "x")
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        return torch.sigmoid(x)
    if alpha == 2.0:  # clip((x + 1)/2, 0, 1), with derivative 0 at the kinks x = ±1
        p = (x + 1) / 2  # on every torch (clamp's own backward there varies by version)
        return torch.where(p <= 0, 0.0, torch.where(p >= 1, 1.0, p))
    if alpha == 1.5:
        d = (x / 2).clamp(-1, 1)
        return ((d + torch.sqrt(2 - d * d)) / 2) ** 2
    return entmax(torch.stack([x, torch.zeros_like(x)], -1), alpha)[..., 0]


def tsallis_sigmoid_slope(u: torch.Tensor, w: torch.Tensor, alpha: float = 2.0):
    """dw/du of the two-region weight w = :func:`tsallis_sigmoid`(u, α), given w
    ((8.3)).

    α = 1: σ(u)(1 − σ(u)), from w alone; α = 2: ½ where 0 < (u + 1)/2 < 1 (0 at the
    kinks u = ±1, as autograd's clamp), else 0; α = 1.5: q (1 − d/√(2 − d²)) / 2 with
    d = clip(u/2, −1, 1) and q = (d + √(2 − d²))/2 (0 beyond |u| = 2). The backward of
    the α-entropy VQ activations (:func:`smaso.activations.two_piece_vq_grads`).
    """
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        return w * (1 - w)
    if alpha == 2.0:
        p = (u + 1) / 2
        return torch.where((p > 0) & (p < 1), 0.5, 0.0).to(u.dtype)
    if alpha == 1.5:
        d = (u / 2).clamp(-1, 1)
        r = torch.sqrt(2 - d * d)
        return (d + r) / 2 * (1 - d / r) / 2
    raise ValueError(
        f"tsallis_sigmoid_slope has closed forms for alpha in {CLOSED_FORM_ALPHAS}, "
        f"got {alpha}"
    )


def tsallis_vq_relu(
    x: torch.Tensor, eta=HARD_SWISH_ETA, alpha: float = 2.0
) -> torch.Tensor:
    """α-entropy VQ of the ReLU MASO (pieces x and 0): x · tsallis_sigmoid(η x) ((8.3),
    Eq. 2).

    α = 1: swish (Proposition 7). α = 2 (Gini-VQ): x · clip((η x + 1)/2, 0, 1), i.e. 0
    for x ≤ −1/η, x for x ≥ 1/η and (η x² + x)/2 between; at η = 1/3 (β = 1/4) this is
    hard-swish x · relu6(x + 3)/6 exactly. η → ∞ gives the ReLU, η = 0 the linear x/2.
    """
    check_float_tensor(x, "x")
    return x * tsallis_sigmoid(check_eta(eta, x) * x, alpha)


def tsallis_vq_leaky_relu(
    x: torch.Tensor, eta=1.0, alpha: float = 2.0, negative_slope: float = 0.01
) -> torch.Tensor:
    """α-entropy VQ of the leaky-ReLU MASO (pieces x, s x; s ≤ 1): s x + (1 − s) x ·
    tsallis_sigmoid(η (1 − s) x)."""
    check_float_tensor(x, "x")
    if not negative_slope <= 1:
        raise ValueError(
            f"leaky-ReLU with negative_slope = {negative_slope} > 1 is concave, not a "
            "MASO"
        )
    s = negative_slope
    return s * x + (1 - s) * x * tsallis_sigmoid(check_eta(eta, x) * (1 - s) * x, alpha)


def tsallis_vq_abs(x: torch.Tensor, eta=1.0, alpha: float = 2.0) -> torch.Tensor:
    """α-entropy VQ of the absolute-value MASO (pieces ±x): x · (2 tsallis_sigmoid(2 η
    x) − 1).

    α = 1: x · tanh(η x); α = 2: x · clip(2 η x, −1, 1), equal to 2 η x² for |x| ≤
    1/(2η) and |x| beyond.
    """
    check_float_tensor(x, "x")
    return x * (2 * tsallis_sigmoid(2 * check_eta(eta, x) * x, alpha) - 1)


# --------------------------------------------------------------------------------------
# Pooling: the α-entropy VQ of the max-pooling MASO (Proposition 4 with H → H_α)


def sparse_pool_closed_form(u: torch.Tensor, eta=1.0) -> torch.Tensor:
    """Gini-VQ (α = 2) of max-pooling over the last dim, in closed form: mean_S(u) + η
    |S| var_S(u).

    S is the support of sparsemax(η u) (the top-k entries, k the largest with 1 + k η
    u_(k) > η Σ_{j≤k} u_(j)) and var_S the population variance over it. Follows from
    (8.3): on S, t_i = η u_i − τ with τ = (η Σ_S u − 1)/|S|, so Σ t_i u_i = η (Σ_S u² −
    (Σ_S u)²/|S|) + mean_S u. |S| = 1 gives the max, η → 0 the mean (average pooling).
    Written without :func:`sparsemax`.
    """
    check_float_tensor(u, "u")
    eta = check_eta(eta, u)
    if eta.ndim:
        eta = eta.unsqueeze(-1)
    us, _ = torch.sort(u, dim=-1, descending=True)
    k = torch.arange(1, u.shape[-1] + 1, dtype=u.dtype, device=u.device)
    csum = us.cumsum(-1)
    inside = 1 + k * eta * us > eta * csum
    n = inside.sum(-1, keepdim=True)
    mask = k <= n
    m = torch.where(mask, us, 0.0).sum(-1, keepdim=True) / n
    var = torch.where(mask, (us - m) ** 2, 0.0).sum(-1, keepdim=True) / n
    return (m + eta * n * var).squeeze(-1)


def tsallis_pool2d(
    x: torch.Tensor, eta=1.0, alpha: float = 2.0, kernel_size=2, stride=None, padding=0
) -> torch.Tensor:
    """α-entropy VQ pooling of (N, C, H, W) ``x``: Σ_i α-entmax(η u)_i u_i over each
    window ((8.3) of the book).

    The α-entropy VQ of the max-pooling MASO whose pieces are the window's entries. α =
    1 is β-softmax pooling (:func:`smaso.activations.beta_softmax_pool2d`), α = 2 sparse
    pooling (see :func:`sparse_pool_closed_form`). ``eta`` a number or a (C,) tensor;
    zero-padding positions are excluded from the window, as max-pooling excludes them.
    """
    check_float_tensor(x, "x")
    alpha = check_alpha(alpha)
    return window_pool(
        x,
        eta,
        kernel_size,
        stride,
        padding,
        lambda logits: entmax(logits, alpha, dim=2),
        "tsallis_pool2d",
    )
