"""The Gaussian-mixture reading of a MASO (Section 3.1-3.2, Theorem 2, Appendix C).

For one unit ``k``, the Soft MASO model of Eq. (3) generates the layer input as
a mixture of ``R`` Gaussians with means ``A[k, r]``, isotropic variance
``sigma2`` and region prior ``pi[k]``. Theorem 2: with ``sigma2 = 1`` and
``pi[k, r] = softmax_r(B[k, r] + 1/2 ||A[k, r]||^2)``, the MAP region of
Eq. (4) is the MASO hard VQ of Eq. (1)/(5) for *any* ``A`` and ``B``; and
Corollary 2: the MASO input-space partition is that GMM's MAP partition.

Shapes follow :mod:`smaso.maso`: ``A`` (K, R, D), ``B`` (K, R), ``z`` (N, D) or (D,).
"""

import math

import torch

from .checks import batched, check_sigma2
from .maso import check_params

__all__ = [
    "log_joint",
    "map_vq",
    "monte_carlo_prior",
    "posterior",
    "region_prior",
    "relu_prior",
]


def region_prior(A, B):
    """Region prior ``pi`` (K, R) of Theorem 2: ``softmax_r(B[k, r] + 1/2 ||A[k,
    r]||^2)``.

    With the K-means offsets of Proposition 1 (``B = -1/2 ||A||^2``) it is uniform.
    """
    check_params(A, B)
    return torch.softmax(B + 0.5 * (A * A).sum(dim=-1), dim=-1)


def log_joint(A, B, z, sigma2=1.0):
    """``log p(z | t_k = r) + log pi[k, r]`` for the GMM of Eq. (3), shape (N, K, R).

    ``p(z | t_k = r) = N(z; A[k, r], sigma2 I)`` is evaluated from the Gaussian
    density itself, ``-D/2 log(2 pi sigma2) - ||z - A[k, r]||^2 / (2 sigma2)``
    (explicit differences, memory O(N K R D)), and ``pi`` is the prior of
    Theorem 2 (:func:`region_prior`). Nothing here uses the MASO scores, so
    comparing its arg max with :func:`smaso.maso.hard_vq` checks Theorem 2.
    Unbatched ``z`` (D,) gives (K, R).
    """
    _, _, D = check_params(A, B, z)
    sigma2 = check_sigma2(sigma2)
    z2, single = batched(z)
    sq = ((z2[:, None, None, :] - A[None]) ** 2).sum(dim=-1)  # (N, K, R)
    log_lik = -0.5 * D * math.log(2 * math.pi * sigma2) - sq / (2 * sigma2)
    log_prior = torch.log_softmax(B + 0.5 * (A * A).sum(dim=-1), dim=-1)
    out = log_lik + log_prior
    return out[0] if single else out


def posterior(A, B, z, sigma2=1.0):
    """Posterior ``p(t_k = r | z)`` (N, K, R) of the GMM of Eq. (3) with the prior of
    Theorem 2.

    At ``sigma2 = 1`` this equals the soft VQ of Eq. (6),
    ``softmax_r(<A[k, r], z> + B[k, r])``.
    """
    return torch.softmax(log_joint(A, B, z, sigma2), dim=-1)


def map_vq(A, B, z, sigma2=1.0):
    """One-hot MAP region (N, K, R) of Eq. (4) (ties to the lowest region index).

    Theorem 2: at ``sigma2 = 1`` this equals the MASO hard VQ
    :func:`smaso.maso.hard_vq` for every ``A``, ``B``. (For other ``sigma2``
    with the same, Theorem-2 prior it generally does not.)
    """
    lj = log_joint(A, B, z, sigma2)
    return torch.zeros_like(lj).scatter_(-1, lj.argmax(dim=-1, keepdim=True), 1.0)


def relu_prior(norm2):
    """Closed-form region prior of a zero-bias ReLU unit (Theorem 2, Appendix C).

    Regions ordered (active, inactive) with slopes ``(w, 0)``: ``pi =
    (e^{||w||^2 / 2}, 1) / (e^{||w||^2 / 2} + 1)``. ``norm2 = ||w||^2`` (a
    tensor of any shape, or a number); returns shape ``(..., 2)``.
    E.g. ``relu_prior(1.0) = (0.6225, 0.3775)``. The active region always gets
    at least half of the mass.
    """
    if not isinstance(norm2, torch.Tensor):
        if isinstance(norm2, bool) or not isinstance(norm2, (int, float)):
            raise TypeError(
                f"norm2 must be a tensor or a number, got {type(norm2).__name__}"
            )
        norm2 = torch.tensor(float(norm2), dtype=torch.get_default_dtype())
    if not norm2.is_floating_point():
        raise ValueError(f"norm2 must be floating point, got dtype {norm2.dtype}")
    if bool(torch.isnan(norm2).any()) or bool((norm2 < 0).any()):
        raise ValueError("norm2 = ||w||^2 must be nonnegative and not NaN")
    return torch.stack(
        [torch.sigmoid(0.5 * norm2), torch.sigmoid(-0.5 * norm2)], dim=-1
    )


_INITS = ("xavier_normal", "xavier_uniform", "kaiming_uniform_torch_default")


def monte_carlo_prior(
    init, activation, fan_in, fan_out, n_layers, generator=None, dtype=None
):
    """Region priors (Theorem 2) of randomly initialised layers (Appendix C), shape
    (n_layers*fan_out, 2).

    Draws ``n_layers`` weight matrices ``W`` (fan_out, fan_in) of an
    ``nn.Linear(fan_in, fan_out)`` with zero bias and

    * ``init="xavier_normal"``: ``N(0, 2 / (fan_in + fan_out))``;
    * ``init="xavier_uniform"``: ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``;
    * ``init="kaiming_uniform_torch_default"``: PyTorch's ``nn.Linear`` default,
      ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (variance ``1 / (3 fan_in)``);
    * ``init=<float>``: ``N(0, init**2)``.

    builds the layer's MASO (``activation="relu"``: ``A = [W, 0]``,
    ``activation="abs"``: ``A = [W, -W]``, ``B = 0``) and returns
    :func:`region_prior` of every unit, regions ordered (active/positive,
    inactive/negative). ``generator`` (a ``torch.Generator``) makes it
    reproducible; samples live on the generator's device.

    Notes on Appendix C. For abs, both slopes have the same norm, so every
    unit's prior is exactly (0.5, 0.5) -- not only in expectation. For ReLU the
    prior is ``relu_prior(||w||^2)`` with ``E ||w||^2 = fan_in v^2``. The
    paper says Xavier gives ``D v^2 = 1`` and hence ``pi ~ (0.62, 0.38)``; with
    Glorot's variance ``2 / (fan_in + fan_out)`` one gets
    ``fan_in v^2 = 2 fan_in / (fan_in + fan_out)``, which is 1 only when
    ``fan_in == fan_out``. The paper also says this prior "slightly favors the
    inactive state" and that smaller ``v`` favours the inactive state more. By
    Theorem 2 it is the other way round: the larger mass
    ``e^{1/2} / (1 + e^{1/2}) ~ 0.622`` goes to the ACTIVE region (slope ``w``),
    the inactive region (slope 0) gets ``~ 0.378``, and as ``v -> 0`` the prior
    tends to (0.5, 0.5); it never favours the inactive state.
    """
    for name, v in (("fan_in", fan_in), ("fan_out", fan_out), ("n_layers", n_layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if activation not in ("relu", "abs"):
        raise ValueError(f"activation must be 'relu' or 'abs', got {activation!r}")
    if isinstance(init, str):
        if init not in _INITS:
            raise ValueError(
                f"init must be one of {_INITS} or a float std, got {init!r}"
            )
    elif (
        isinstance(init, bool)
        or not isinstance(init, (int, float))
        or not (init >= 0 and math.isfinite(init))
    ):
        raise ValueError(
            f"init must be one of {_INITS} or a nonnegative float std, got {init!r}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator, got {type(generator).__name__}"
        )
    dtype = dtype or torch.get_default_dtype()
    device = generator.device if generator is not None else torch.device("cpu")
    shape = (fan_out, fan_in)
    priors = []
    for _ in range(
        n_layers
    ):  # loop over layers (bounded memory), vectorised over units
        if init == "xavier_normal":
            W = torch.randn(
                shape, generator=generator, dtype=dtype, device=device
            ) * math.sqrt(2.0 / (fan_in + fan_out))
        elif init == "xavier_uniform":
            a = math.sqrt(6.0 / (fan_in + fan_out))
            W = (
                2 * torch.rand(shape, generator=generator, dtype=dtype, device=device)
                - 1
            ) * a
        elif init == "kaiming_uniform_torch_default":
            a = 1.0 / math.sqrt(fan_in)
            W = (
                2 * torch.rand(shape, generator=generator, dtype=dtype, device=device)
                - 1
            ) * a
        else:
            W = torch.randn(
                shape, generator=generator, dtype=dtype, device=device
            ) * float(init)
        other = torch.zeros_like(W) if activation == "relu" else -W
        A = torch.stack([W, other], dim=1)  # (fan_out, 2, fan_in)
        B = torch.zeros(fan_out, 2, dtype=dtype, device=device)
        priors.append(region_prior(A, B))
    return torch.cat(priors, dim=0)
