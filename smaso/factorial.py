"""Joint VQ inference in the factorial model of a whole MASO layer (Section 5, Eq.
10-12, Theorem 4).

The per-unit GMM of Eq. (3) (:mod:`smaso.gmm`) lets each unit ``k`` explain the layer
input on its own. The factorial model of Eq. (10) lets all ``K`` units explain it
together:

    t_k ~ pi[k] independently,   z = sum_k A[k, t_k] + eps,   eps ~ N(0, sigma2 I).

The paper does not write out the joint prior of ``t = (t_1, ..., t_K)``, but its
factorial model implies it: each unit's region is drawn on its own from its Section 3.1
prior, so the joint prior is the product of the per-unit priors of Theorem 2
(:func:`smaso.gmm.region_prior`), each the prior that makes unit ``k`` a MASO. That
product is the default here (a custom joint prior can be passed instead).

Exact inference enumerates all ``R**K`` configurations (guarded by ``max_configs``).
Expanding the square in the log-likelihood,

    log p(t | z) = c(z) + sum_k [ (<A[k,t_k], z> - 1/2 ||A[k,t_k]||^2) / sigma2 + log
    pi[k, t_k] ]
                        - (1 / sigma2) sum_{k < k'} <A[k, t_k], A[k', t_k']>,

shows what Theorem 4 needs. Under the orthogonality of Eq. (11) the last (cross) term
vanishes and what is left is exactly the sum of the per-unit GMM log-posteriors of Eq.
(3) with the same prior and ``sigma2`` (``||z||^2`` is a constant; the ``||A[k, r]||^2``
terms appear in both models), so

    p(t | z) = prod_k p_k(t_k | z)     (Theorem 4),  and the joint MAP is the per-unit
    MAPs (Corollary 1),

and at ``sigma2 = 1`` the per-unit MAP is the MASO hard VQ (Theorem 2). Eq. (11) is
sufficient, not necessary: ``t`` is independent given ``z`` iff every cross block
``<A[k, r], A[k', r']>`` is additive in ``(r, r')`` (:func:`coupling` is zero). Shapes
follow :mod:`smaso.maso`.
"""

import math

import torch

from .checks import batched, check_sigma2, check_tensor
from .gmm import posterior, region_prior
from .maso import check_params

__all__ = [
    "configurations",
    "coupling",
    "disagreement",
    "factorised_map",
    "joint_log_posterior",
    "joint_map",
    "joint_marginals",
    "joint_posterior",
    "mutual_coherence",
    "product_posterior",
    "sample_factorial",
]

MAX_CONFIGS = 2**20


def configurations(K, R, max_configs=MAX_CONFIGS, device=None):
    """All ``R**K`` joint VQ configurations ``t`` of Eq. (10)/(12), a long tensor (R**K,
    K).

    Row ``i`` is the base-``R`` expansion of ``i`` (unit 0 varies slowest), so a joint
    posterior of shape (N, R**K) reshapes to (N, R, ..., R) with one axis per unit.
    Refuses (``ValueError``) when ``R**K > max_configs``.
    """
    for name, v in (("K", K), ("R", R), ("max_configs", max_configs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if max_configs < R**K:
        raise ValueError(
            f"brute-force joint inference over R**K = {R}**{K} = {R**K} "
            "configurations exceeds "
            f"max_configs = {max_configs}; use fewer units or regions, or raise "
            "max_configs"
        )
    t = torch.arange(R**K, device=device)
    powers = R ** torch.arange(K - 1, -1, -1, device=device)
    return (t[:, None] // powers) % R


def _config_means(A, t):
    """Means ``sum_k A[k, t_k]`` of the factorial model's R**K Gaussians, (C, D)."""
    mu = torch.zeros(t.shape[0], A.shape[-1], dtype=A.dtype, device=A.device)
    for k in range(A.shape[0]):
        mu = mu + A[k, t[:, k]]
    return mu


def _joint_log_prior(A, B, t, log_prior):
    if log_prior is None:  # product of the per-unit priors of Theorem 2
        lp = torch.log(region_prior(A, B))
        return sum(lp[k, t[:, k]] for k in range(A.shape[0]))
    check_tensor(log_prior, "log_prior")
    C = t.shape[0]
    if tuple(log_prior.shape) != (C,):
        raise ValueError(
            f"log_prior must have shape (R**K,) = ({C},), one entry per configuration, "
            f"got {tuple(log_prior.shape)}"
        )
    if log_prior.dtype != A.dtype or log_prior.device != A.device:
        raise ValueError(
            f"log_prior must have A's dtype and device ({A.dtype}, {A.device}), "
            f"got ({log_prior.dtype}, {log_prior.device})"
        )
    if bool(torch.isnan(log_prior).any()) or bool((log_prior == math.inf).any()):
        raise ValueError("log_prior contains NaN or +inf")
    if not bool(torch.isfinite(log_prior).any()):
        raise ValueError("log_prior gives every configuration zero probability")
    return log_prior


def joint_log_posterior(A, B, z, sigma2=1.0, log_prior=None, max_configs=MAX_CONFIGS):
    """Exact ``log p(t | z)`` of the factorial model (paper Eq. 10) for every
    configuration: (N, R**K).

    Columns follow :func:`configurations`. The Gaussian log-density of each
    configuration's mean ``mu_t = sum_k A[k, t_k]`` is evaluated directly (nothing
    assumes paper Eq. 11), the prior is the product of the Theorem-2 priors unless
    ``log_prior`` (R**K,) is given (need not be normalised), and each row is normalised
    with a log-sum-exp. Memory O(R**K (N + D)). Unbatched ``z`` (D,) gives (R**K,).
    """
    K, R, _ = check_params(A, B, z)
    sigma2 = check_sigma2(sigma2)
    t = configurations(K, R, max_configs, device=A.device)
    z2, single = batched(z)
    mu = _config_means(A, t)
    sq = (
        (z2 * z2).sum(-1, keepdim=True) - 2 * z2 @ mu.T + (mu * mu).sum(-1)
    )  # ||z - mu_t||^2
    lj = -sq / (2 * sigma2) + _joint_log_prior(A, B, t, log_prior)
    out = lj - torch.logsumexp(lj, dim=-1, keepdim=True)
    return out[0] if single else out


def joint_posterior(A, B, z, sigma2=1.0, log_prior=None, max_configs=MAX_CONFIGS):
    """Exact joint posterior ``p(t | z)`` (N, R**K) of Eq. (10) by enumeration.

    The left side of Theorem 4.
    """
    return joint_log_posterior(A, B, z, sigma2, log_prior, max_configs).exp()


def joint_map(A, B, z, sigma2=1.0, log_prior=None, max_configs=MAX_CONFIGS):
    """Joint MAP configuration of Eq. (12) by brute force: long (N, K) (or (K,)).

    Enumerates the ``R**K`` configurations of :func:`configurations` and takes the
    arg max of :func:`joint_log_posterior`. Inputs are processed in chunks so that
    memory stays O(2**22 + R**K D). Ties go to the first configuration in
    :func:`configurations` order.

    Args:
        A: slopes, shape ``(K, R, D)``.
        B: offsets, shape ``(K, R)``.
        z: the input, shape ``(N, D)`` or ``(D,)``.
        sigma2: the noise variance, a positive number (default ``1.0``).
        log_prior: optional joint log-prior, shape ``(R**K,)`` (need not be
            normalised); default ``None``, the product of the Theorem-2 priors.
        max_configs: the largest ``R**K`` allowed (default ``MAX_CONFIGS = 2**20``);
            more raises ``ValueError``.

    Returns:
        The region of every unit, a long tensor of shape ``(N, K)`` (or ``(K,)`` for
        unbatched ``z``).

    Example::

        >>> import torch
        >>> from smaso.factorial import factorised_map, joint_map
        >>> A = torch.eye(4).reshape(2, 2, 4)  # orthogonal units, Eq. (11)
        >>> B = torch.zeros(2, 2)
        >>> z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(joint_map(A, B, z), factorised_map(A, B, z))  # Corollary 1
        True
        >>> joint_map(A, B, z).shape
        torch.Size([6, 2])
    """
    K, R, _ = check_params(A, B, z)
    t = configurations(K, R, max_configs, device=A.device)
    z2, single = batched(z)
    chunk = max(1, 2**22 // t.shape[0])
    idx = torch.cat(
        [
            joint_log_posterior(
                A, B, z2[i : i + chunk], sigma2, log_prior, max_configs
            ).argmax(-1)
            for i in range(0, z2.shape[0], chunk)
        ]
    )
    out = t[idx]
    return out[0] if single else out


def factorised_map(A, B, z, sigma2=1.0):
    """Per-unit MAP codes ``argmax_r p_k(t_k = r | z)`` of the GMM of Eq. (3), long
    (N, K): the right side of Eq. (12), linear in ``K``.

    At ``sigma2 = 1`` these are the MASO VQ codes (Theorem 2).

    Args:
        A: slopes, shape ``(K, R, D)``.
        B: offsets, shape ``(K, R)``.
        z: the input, shape ``(N, D)`` or ``(D,)``.
        sigma2: the noise variance, a positive number (default ``1.0``).

    Returns:
        The region of every unit, a long tensor of shape ``(N, K)`` (or ``(K,)`` for
        unbatched ``z``).

    Example::

        >>> import torch
        >>> from smaso.factorial import factorised_map
        >>> from smaso.maso import vq_codes
        >>> g = torch.Generator().manual_seed(0)
        >>> A, B = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, generator=g)
        >>> z = torch.randn(8, 5, generator=g)
        >>> torch.equal(factorised_map(A, B, z), vq_codes(A, B, z))  # Theorem 2
        True
    """
    return posterior(A, B, z, sigma2).argmax(-1)


def _check_joint(P, K, R):
    check_tensor(P, "P")
    if P.ndim not in (1, 2) or P.shape[-1] != R**K:
        raise ValueError(
            f"P must have shape (N, R**K) or (R**K,) with R**K = {R**K}, got "
            f"{tuple(P.shape)}"
        )


def joint_marginals(P, K, R):
    """Marginals ``p(t_k = r | z)`` (N, K, R) of a joint posterior ``P`` (N, R**K) over
    :func:`configurations`.

    Under Theorem 4 these are the per-unit posteriors of Eq. (3).
    """
    _check_joint(P, K, R)
    P2, single = batched(P)
    cube = P2.reshape((P2.shape[0],) + (R,) * K)
    dims = set(range(1, K + 1))
    out = torch.stack(
        [
            cube.sum(dim=tuple(sorted(dims - {k + 1}))) if K > 1 else cube
            for k in range(K)
        ],
        dim=1,
    )
    return out[0] if single else out


def product_posterior(Q):
    """``prod_k Q[n, k, t_k]`` over all configurations: (N, R**K) from per-unit
    probabilities (N, K, R).

    With ``Q = smaso.gmm.posterior(A, B, z, sigma2)`` this is the right side of Theorem
    4.
    """
    check_tensor(Q, "Q")
    if Q.ndim not in (2, 3):
        raise ValueError(f"Q must have shape (N, K, R) or (K, R), got {tuple(Q.shape)}")
    Q2 = Q.unsqueeze(0) if Q.ndim == 2 else Q
    _, K, R = Q2.shape
    t = configurations(K, R, device=Q.device)
    out = Q2[:, torch.arange(K, device=Q.device), t].prod(-1)  # (N, C, K) -> (N, C)
    return out[0] if Q.ndim == 2 else out


def _check_slopes(A):
    """Refuse anything but a slope tensor of shape (K, R, D)."""
    check_tensor(A, "A")
    if A.ndim != 3:
        raise ValueError(f"A must have shape (K, R, D), got {tuple(A.shape)}")


def _unit_rows(A):
    """Flattened slopes (K*R, D), their unit index and their norms."""
    K, R, D = A.shape
    flat = A.reshape(K * R, D)
    unit = torch.arange(K, device=A.device).repeat_interleave(R)
    return flat, unit, torch.linalg.vector_norm(flat, dim=-1)


def mutual_coherence(A):
    """``max_{k != k', r, r'} |<A[k,r], A[k',r']>| / (||A[k,r]|| ||A[k',r']||)``: 0 iff
    Eq. (11) holds.

    Zero slopes (e.g. a ReLU's inactive region) are orthogonal to everything and count
    as 0. A single unit (K = 1) has coherence 0. Returns a 0-dim tensor.
    """
    _check_slopes(A)
    flat, unit, norm = _unit_rows(A)
    u = flat / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]
    cos = (u @ u.T).abs()
    cos = cos.masked_fill(unit[:, None] == unit[None, :], 0.0)
    return cos.max()


def coupling(A):
    """Strength of the interaction between units' VQs in paper Eq. 10, (K, K), zero on
    the diagonal.

    Entry ``(k, k')`` is the Frobenius norm of the double-centred cross-Gram block
    ``G(r, r') = <A[k, r], A[k', r']>`` (row and column means removed). It is zero iff
    ``G`` is additive, ``f(r) + g(r')``. For a product prior, ``t`` is independent given
    ``z`` (the joint posterior factorises, paper Theorem 4's conclusion) for every
    ``z``, ``B`` and ``sigma2`` iff all entries are zero. Paper Eq. 11 (zero blocks) is
    the special case used by paper Theorem 4.
    """
    _check_slopes(A)
    G = torch.einsum("krd,lsd->krls", A, A)
    Gc = (
        G
        - G.mean(1, keepdim=True)
        - G.mean(3, keepdim=True)
        + G.mean((1, 3), keepdim=True)
    )
    out = torch.linalg.vector_norm(Gc, dim=(1, 3))
    return out.fill_diagonal_(0.0)


def disagreement(A, B, z, sigma2=1.0, max_configs=MAX_CONFIGS):
    """How far exact joint inference (Eq. 10, 12) is from per-unit inference (Eq. 3-4)
    on inputs ``z``.

    Returns a dict of floats:

    * ``map_mismatch``: fraction of inputs whose joint MAP (Eq. 12, left) differs from
      the per-unit MAPs (Eq. 12, right) in at least one unit;
    * ``tv_factorised``: mean total-variation distance between ``p(t | z)`` and the
      product of the per-unit GMM posteriors (Theorem 4's two sides);
    * ``tv_marginals``: mean TV distance between ``p(t | z)`` and the product of its own
      marginals (zero iff the units' VQs are independent given ``z``);
    * ``coherence``: :func:`mutual_coherence`; ``coupling``: the largest entry of
      :func:`coupling`.

    Under Eq. (11) all five are zero (up to rounding). The prior is the product of
    Theorem-2 priors.
    """
    K, R, _ = check_params(A, B, z)
    z2, _ = batched(z)
    P = joint_posterior(A, B, z2, sigma2, max_configs=max_configs)
    t = configurations(K, R, max_configs, device=A.device)
    per_unit = posterior(A, B, z2, sigma2)
    tv = lambda p, q: 0.5 * (p - q).abs().sum(-1).mean().item()  # noqa: E731
    return {
        "map_mismatch": (t[P.argmax(-1)] != per_unit.argmax(-1))
        .any(-1)
        .double()
        .mean()
        .item(),
        "tv_factorised": tv(P, product_posterior(per_unit)),
        "tv_marginals": tv(P, product_posterior(joint_marginals(P, K, R))),
        "coherence": mutual_coherence(A).item(),
        "coupling": coupling(A).max().item(),
    }


def sample_factorial(A, B, n, sigma2=1.0, generator=None):
    """Draw ``n`` inputs from the factorial model Eq. (10) with the product of Theorem-2
    priors.

    Returns ``(z, t)``: ``z`` (n, D) in A's dtype and ``t`` long (n, K), the
    configurations used. ``generator`` (a ``torch.Generator`` on A's device) makes it
    reproducible.
    """
    _, _, D = check_params(A, B)
    sigma2 = check_sigma2(sigma2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator, got {type(generator).__name__}"
        )
    t = torch.multinomial(
        region_prior(A, B), n, replacement=True, generator=generator
    ).T  # (n, K)
    eps = torch.randn(n, D, generator=generator, dtype=A.dtype, device=A.device)
    return _config_means(A, t) + math.sqrt(sigma2) * eps, t
