"""The Gaussian-mixture reading of a MASO (Section 3.1-3.2, Theorem 2, Appendix C).

For one unit ``k``, the Soft MASO model of Eq. (3) generates the layer input as
a mixture of ``R`` Gaussians with means ``A[k, r]``, isotropic variance
``sigma2`` and region prior ``pi[k]``. Theorem 2: with ``sigma2 = 1`` and
``pi[k, r] = softmax_r(B[k, r] + 1/2 ||A[k, r]||^2)``, the MAP region of
Eq. (4) is the MASO hard VQ of Eq. (1)/(5) for *any* ``A`` and ``B``; and
Corollary 2: the MASO input-space partition is that GMM's MAP partition.

Scaling the exponent of that prior by ``1 / sigma2`` (``scaled_prior=True``) makes
Theorem 2 hold for *every* ``sigma2``: the posterior is then
``softmax(scores / sigma2)``, it tends to the hard VQ as ``sigma2 -> 0`` (the remark
after Eq. (6)), and it is the beta-VQ of Eq. (9) at ``sigma2 = (1 - beta) / beta``
(:func:`sigma2_from_beta`).
Appendix E.6: the sigmoid is the posterior of a ReLU unit, and a tanh network is a
sigmoid network with reparametrised weights (:func:`tanh_to_sigmoid`).

Shapes follow :mod:`smaso.maso`: ``A`` (K, R, D), ``B`` (K, R), ``z`` (N, D) or (D,).
"""

import math

import torch

from .checks import batched, check_sigma2
from .maso import check_params
from .vq import eta_from_beta

__all__ = [
    "calibration_error",
    "log_joint",
    "map_vq",
    "monte_carlo_prior",
    "posterior",
    "region_prior",
    "relu_prior",
    "sigma2_from_beta",
    "tanh_to_sigmoid",
]


def region_prior(A, B, sigma2=1.0):
    """Region prior ``pi`` (K, R) of Theorem 2: ``softmax_r(B[k, r] + 1/2 ||A[k,
    r]||^2)``.

    With the K-means offsets of Proposition 1 (``B = -1/2 ||A||^2``) it is uniform.
    ``sigma2`` other than 1 gives the scaled prior
    ``softmax_r((B[k, r] + 1/2 ||A[k, r]||^2) / sigma2)``, under which Theorem 2 holds
    at that noise variance (see :func:`log_joint`).

    Args:
        A: slopes, shape ``(K, R, D)``.
        B: offsets, shape ``(K, R)``.
        sigma2: the noise variance, a positive number (default ``1.0``).

    Returns:
        The prior, shape ``(K, R)``; each row sums to 1.

    Example::

        >>> import torch
        >>> from smaso.gmm import region_prior
        >>> from smaso.maso import kmeans_offsets
        >>> A = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]]])
        >>> region_prior(A, kmeans_offsets(A))
        tensor([[0.3333, 0.3333, 0.3333]])
    """
    check_params(A, B)
    return _log_prior(A, B, check_sigma2(sigma2)).exp()


def _log_prior(A, B, sigma2):
    """``log region_prior(A, B, sigma2)``, computed as a log-softmax (no underflow)."""
    return torch.log_softmax((B + 0.5 * (A * A).sum(dim=-1)) / sigma2, dim=-1)


def log_joint(A, B, z, sigma2=1.0, scaled_prior=False):
    """``log p(z | t_k = r) + log pi[k, r]`` for the GMM of Eq. (3), shape (N, K, R).

    ``p(z | t_k = r) = N(z; A[k, r], sigma2 I)`` is evaluated from the Gaussian
    density itself, ``-D/2 log(2 pi sigma2) - ||z - A[k, r]||^2 / (2 sigma2)``
    (explicit differences, memory O(N K R D)), and ``pi`` is the prior of
    Theorem 2 (:func:`region_prior`). Nothing here uses the MASO scores, so
    comparing its arg max with :func:`smaso.maso.hard_vq` checks Theorem 2.
    Unbatched ``z`` (D,) gives (K, R).

    ``scaled_prior=False`` holds the prior at its ``sigma2 = 1`` value whatever the
    noise variance (the paper's Theorem 2 prior). ``scaled_prior=True`` uses
    ``region_prior(A, B, sigma2)``, ``pi ~ exp((B + 1/2 ||A||^2) / sigma2)``; then
    ``log p(z, t = r) = (<A[k, r], z> + B[k, r]) / sigma2 + c(z)``, so Theorem 2
    holds for every ``sigma2``.
    """
    D, sigma2 = _check_log_joint(A, B, z, sigma2, scaled_prior)
    z2, single = batched(z)
    sq = ((z2[:, None, None, :] - A[None]) ** 2).sum(dim=-1)  # (N, K, R)
    log_lik = -0.5 * D * math.log(2 * math.pi * sigma2) - sq / (2 * sigma2)
    prior_sigma2 = sigma2 if scaled_prior else 1.0
    log_prior = _log_prior(A, B, prior_sigma2)
    out = log_lik + log_prior
    return out[0] if single else out


def _check_log_joint(A, B, z, sigma2, scaled_prior):
    """The argument checks of :func:`log_joint`: the input dimension ``D`` and the
    checked ``sigma2``."""
    _, _, D = check_params(A, B, z)
    sigma2 = check_sigma2(sigma2)
    if not isinstance(scaled_prior, bool):
        raise TypeError(
            f"scaled_prior must be True or False, got {type(scaled_prior).__name__}"
        )
    return D, sigma2


def posterior(A, B, z, sigma2=1.0, scaled_prior=False):
    """Posterior ``p(t_k = r | z)`` (N, K, R) of the GMM of Eq. (3) with the prior of
    Theorem 2.

    At ``sigma2 = 1`` this equals the soft VQ of Eq. (6),
    ``softmax_r(<A[k, r], z> + B[k, r])``. With ``scaled_prior=True`` (see
    :func:`log_joint`) it equals ``softmax_r((<A[k, r], z> + B[k, r]) / sigma2)`` for
    every ``sigma2``: the beta-VQ of Eq. (9) at ``beta = 1 / (1 + sigma2)``, which
    tends to the hard VQ as ``sigma2 -> 0``.

    Args:
        A: slopes (the Gaussian means), shape ``(K, R, D)``.
        B: offsets, shape ``(K, R)``.
        z: the input, shape ``(N, D)`` or ``(D,)``.
        sigma2: the noise variance, a positive number (default ``1.0``).
        scaled_prior: if ``True``, the prior is ``region_prior(A, B, sigma2)``; if
            ``False`` (default), it is held at its ``sigma2 = 1`` value.

    Returns:
        The posterior, shape ``(N, K, R)`` (or ``(K, R)`` for unbatched ``z``).

    Example::

        >>> import torch
        >>> from smaso.gmm import posterior
        >>> from smaso.vq import soft_vq
        >>> g = torch.Generator().manual_seed(0)
        >>> A, B = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, generator=g)
        >>> z = torch.randn(5, 4, generator=g)
        >>> torch.allclose(posterior(A, B, z), soft_vq(A, B, z), atol=1e-6)
        True
    """
    return torch.softmax(log_joint(A, B, z, sigma2, scaled_prior), dim=-1)


def map_vq(A, B, z, sigma2=1.0, scaled_prior=False):
    """One-hot MAP region (N, K, R) of Eq. (4) (ties to the lowest region index).

    Theorem 2: at ``sigma2 = 1`` this equals the MASO hard VQ
    :func:`smaso.maso.hard_vq` for every ``A``, ``B``. For other ``sigma2`` it does
    so with ``scaled_prior=True``, not with the prior held at its ``sigma2 = 1``
    value (the default), under which the MAP tends to the nearest centroid as
    ``sigma2 -> 0``.
    """
    lj = log_joint(A, B, z, sigma2, scaled_prior)
    return torch.zeros_like(lj).scatter_(-1, lj.argmax(dim=-1, keepdim=True), 1.0)


def relu_prior(norm2):
    """Closed-form region prior of a zero-bias ReLU unit (Theorem 2, Appendix C).

    Regions ordered (active, inactive) with slopes ``(w, 0)``: ``pi =
    (e^{||w||^2 / 2}, 1) / (e^{||w||^2 / 2} + 1)``. The active region always gets
    at least half of the mass.

    Args:
        norm2: ``||w||^2``, a nonnegative number or floating-point tensor of any
            shape.

    Returns:
        The prior (active, inactive), shape ``(..., 2)`` (``(2,)`` for a number).

    Example::

        >>> from smaso.gmm import relu_prior
        >>> relu_prior(1.0)
        tensor([0.6225, 0.3775])
        >>> relu_prior(0.0).tolist()
        [0.5, 0.5]
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
    _check_monte_carlo(init, activation, (fan_in, fan_out, n_layers), generator)
    dtype = dtype or torch.get_default_dtype()
    device = generator.device if generator is not None else torch.device("cpu")
    priors = []
    for _ in range(n_layers):  # one layer at a time (bounded memory), units at once
        W = _initial_weights(init, (fan_out, fan_in), generator, dtype, device)
        other = torch.zeros_like(W) if activation == "relu" else -W
        A = torch.stack([W, other], dim=1)  # (fan_out, 2, fan_in)
        B = torch.zeros(fan_out, 2, dtype=dtype, device=device)
        priors.append(region_prior(A, B))
    return torch.cat(priors, dim=0)


def _check_monte_carlo(init, activation, sizes, generator):
    fan_in, fan_out, n_layers = sizes
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


def _initial_weights(init, shape, generator, dtype, device):
    """A weight matrix of ``shape`` (fan_out, fan_in) drawn as ``init`` says
    (:func:`monte_carlo_prior`)."""
    fan_out, fan_in = shape
    draw = dict(generator=generator, dtype=dtype, device=device)
    if init == "xavier_normal":
        return torch.randn(shape, **draw) * math.sqrt(2.0 / (fan_in + fan_out))
    if init == "xavier_uniform":
        a = math.sqrt(6.0 / (fan_in + fan_out))
        return (2 * torch.rand(shape, **draw) - 1) * a
    if init == "kaiming_uniform_torch_default":
        a = 1.0 / math.sqrt(fan_in)
        return (2 * torch.rand(shape, **draw) - 1) * a
    return torch.randn(shape, **draw) * float(init)


def sigma2_from_beta(beta):
    """The noise variance ``sigma2 = (1 - beta) / beta`` at which the GMM posterior with
    the scaled prior is the beta-VQ of Eq. (9) (Theorem 3).

    ``posterior(A, B, z, sigma2, scaled_prior=True) = softmax(scores / sigma2)`` and
    ``beta_vq(A, B, z, beta) = softmax(eta * scores)`` with ``eta = beta / (1 -
    beta)``, so the two agree when ``sigma2 = 1 / eta``. ``beta = 1`` (hard VQ) gives
    ``sigma2 = 0``, ``beta = 1/2`` (soft VQ) ``sigma2 = 1``, ``beta = 0`` (uniform)
    ``sigma2 = inf``. ``beta`` is a number (computed in float64) or a tensor in
    [0, 1].
    """
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        beta = torch.tensor(float(beta), dtype=torch.float64)
    eta = eta_from_beta(beta)
    return torch.where(eta == 0, torch.full_like(eta, math.inf), 1 / eta)


def tanh_to_sigmoid(W, b, W_next, b_next):
    """Sigmoid-network weights ``(2 W, 2 b, 2 W_next, b_next - W_next 1)`` equal to the
    tanh network ``W_next tanh(W z + b) + b_next`` (Appendix E.6, Proposition 5).

    From ``tanh(u) = 2 sigmoid(2 u) - 1``: ``W_next tanh(W z + b) + b_next = (2
    W_next) sigmoid(2 W z + 2 b) + (b_next - W_next 1)``, where ``W_next 1`` is the
    vector of row sums of ``W_next``. A sigmoid layer is the soft DN layer of
    Proposition 5 (the region probability of a ReLU unit), so a tanh network is a
    network of such layers. Appendix E.6 states the reparametrisation as ``C :=
    2 C``, ``C' := 2 C'``, ``b' := b' - 1``: it leaves the first layer's bias
    undoubled and shifts the next bias by 1 instead of by ``W_next 1``; both are
    wrong unless ``b = 0`` and every row of ``W_next`` sums to 1.

    Shapes: ``W`` (H, D), ``b`` (H,), ``W_next`` (C, H), ``b_next`` (C,) (the layout
    of ``nn.Linear.weight`` / ``.bias``). For a convolution, pass its dense matrix
    (:func:`smaso.layers.affine_params`).
    """
    names = ("W", "b", "W_next", "b_next")
    tensors = (W, b, W_next, b_next)
    for name, t, ndim in zip(names, tensors, (2, 1, 2, 1), strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != ndim or not t.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point tensor with {ndim} dims, got shape "
                f"{tuple(t.shape)} and dtype {t.dtype}"
            )
    H = W.shape[0]
    if b.shape[0] != H or W_next.shape[1] != H or b_next.shape[0] != W_next.shape[0]:
        raise ValueError(
            "shapes do not chain: W (H, D), b (H,), W_next (C, H), b_next (C,); got "
            f"{[tuple(t.shape) for t in tensors]}"
        )
    return 2 * W, 2 * b, 2 * W_next, b_next - W_next.sum(dim=1)


def calibration_error(confidence, correct, n_bins=10):
    """Expected calibration error of confidences against outcomes (Section 3.2).

    The hard VQ states no confidence (every selection is certain); a posterior does.
    ``ECE = sum_b (n_b / N) |mean(correct in b) - mean(confidence in b)|`` over
    ``n_bins`` equal-width bins ``(i / n_bins, (i + 1) / n_bins]`` of ``[0, 1]`` (0
    falls in the first). ``confidence`` a float tensor in [0, 1], ``correct`` a bool
    or 0/1 tensor of the same shape (e.g. whether the selected class is the label).
    Returns a 0-dim tensor in the dtype of ``confidence``.
    """
    if not isinstance(confidence, torch.Tensor) or not confidence.is_floating_point():
        raise TypeError("confidence must be a floating-point tensor")
    if not isinstance(correct, torch.Tensor) or correct.shape != confidence.shape:
        raise ValueError(
            "correct must be a tensor of the same shape as confidence "
            f"{tuple(confidence.shape)}"
        )
    if confidence.numel() == 0:
        raise ValueError("confidence is empty")
    if bool(((confidence < 0) | (confidence > 1) | confidence.isnan()).any()):
        raise ValueError("confidence must lie in [0, 1]")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    conf = confidence.flatten()
    hit = correct.flatten().to(conf.dtype)
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    gap = torch.zeros(n_bins, dtype=conf.dtype, device=conf.device)
    gap.index_add_(0, bins, hit - conf)
    return gap.abs().sum() / conf.numel()
