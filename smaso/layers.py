"""Real deep-network layers as MASOs (Theorem 1, Appendix A).

Theorem 1 states that any layer made of an affine operator (fully connected,
convolution, batch norm in eval mode, average pooling, ...) followed by a
convex, piecewise-affine nonlinearity (ReLU, leaky ReLU, absolute value,
maxout) and/or max/average pooling, with or without a skip connection
(:class:`Residual`), is a MASO, Eq. (1) / Eq. (14). This module
builds the MASO parameters ``A`` (K, R, D) and ``B`` (K, R) of such layers from
the ``torch.nn`` modules themselves, on flattened (``C*H*W``) inputs/outputs.

The construction is *dense*: the affine part is materialised as a full
``(M, D)`` matrix (through the Jacobian of the layer), and pooling multiplies
the number of regions. It is meant for analysing small layers (inputs of a few
hundred dimensions), not for production-size networks.
"""

import torch
from torch import nn

from .maso import hard_vq, region_affine

__all__ = [
    "Abs",
    "Maxout",
    "Residual",
    "affine_params",
    "layer_maso",
    "nonlinearity_pieces",
    "region_affine_map",
    "split_layers",
]


class Abs(nn.Module):
    """Absolute-value activation ``|x|`` (a MASO with R = 2 pieces ``x, -x``;
    Theorem 1)."""

    def forward(self, x):
        return torch.abs(x)


class Maxout(nn.Module):
    """Maxout (Theorem 1): max over groups of ``num_pieces`` consecutive features along
    dim 1.

    Input (N, C, ...) gives output (N, C // num_pieces, ...); output channel
    ``j`` is the max of input channels ``j*num_pieces, ..., (j+1)*num_pieces - 1``.
    ``C`` must be divisible by ``num_pieces``.
    """

    def __init__(self, num_pieces):
        super().__init__()
        if (
            isinstance(num_pieces, bool)
            or not isinstance(num_pieces, int)
            or num_pieces < 1
        ):
            raise ValueError(f"num_pieces must be a positive int, got {num_pieces!r}")
        self.num_pieces = num_pieces

    def forward(self, x):
        if x.ndim < 2:
            raise ValueError(
                f"Maxout expects input of shape (N, C, ...), got {tuple(x.shape)}"
            )
        C = x.shape[1]
        if C % self.num_pieces != 0:
            raise ValueError(
                f"Maxout: number of features C = {C} (input shape {tuple(x.shape)}) "
                "is not "
                f"divisible by num_pieces = {self.num_pieces}"
            )
        x = x.reshape(x.shape[0], C // self.num_pieces, self.num_pieces, *x.shape[2:])
        return x.amax(dim=2)

    def extra_repr(self):
        return f"num_pieces={self.num_pieces}"


class Residual(nn.Module):
    """A skip connection around a layer, ``shortcut(z) + body(z)`` (Theorem 1: "with or
    without skip connections").

    ``body`` is a module or a list of modules (held as an ``nn.Sequential``);
    ``shortcut`` is ``None`` for the identity, ``z + body(z)``, or an affine module
    (or list of them), e.g. a strided 1x1 ``nn.Conv2d`` projection. If ``body`` is one
    MASO layer (:func:`layer_maso`), so is the block: with the shortcut ``P z + p``,
    ``P z + p + max_r(<A_kr, z> + B_kr) = max_r(<A_kr + P_k, z> + B_kr + p_k)``, the
    same regions with the shortcut's row added to every slope. A deeper ``body`` (a
    ResNet basic block) is not one MASO layer, but it is still one affine map per
    region, ``P + A_body[z]`` (:func:`region_affine_map`).
    """

    def __init__(self, body, shortcut=None):
        super().__init__()
        self.body = nn.Sequential(*_flatten_modules(body))
        if shortcut is None:
            shortcut = nn.Identity()
        short = _flatten_modules(shortcut)
        for m in short:
            if not isinstance(m, _AFFINE + (nn.Identity,)):
                raise TypeError(
                    f"Residual: the shortcut must be affine (nn.Linear, nn.Conv2d, "
                    f"nn.AvgPool2d, nn.BatchNorm1d/2d, nn.Flatten, nn.Identity), got "
                    f"{m!r}"
                )
        self.shortcut = nn.Sequential(*short)

    def forward(self, z):
        return self.shortcut(z) + self.body(z)


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_AFFINE = (nn.Linear, nn.Conv2d, nn.AvgPool2d, nn.Flatten) + _BATCHNORM
_ACTIVATION = (nn.ReLU, nn.LeakyReLU, Abs, nn.Identity, Maxout)
_POOL = (nn.MaxPool2d, nn.AvgPool2d)
_SUPPORTED = (
    "affine: nn.Linear, nn.Conv2d, nn.BatchNorm1d/2d (eval mode), nn.AvgPool2d, "
    "nn.Flatten; "
    "nonlinearity: nn.ReLU, nn.LeakyReLU (negative_slope <= 1), smaso.layers.Abs, "
    "nn.Identity, "
    "smaso.layers.Maxout; pooling: nn.MaxPool2d, nn.AvgPool2d"
)


def _flatten_modules(modules):
    """A list of modules from a module, a list/tuple, or (nested) nn.Sequential."""
    if isinstance(modules, nn.Sequential):
        modules = list(modules)
    elif isinstance(modules, nn.Module):
        modules = [modules]
    elif isinstance(modules, (list, tuple)):
        modules = list(modules)
    else:
        raise TypeError(
            "expected an nn.Module, a list of modules or nn.Sequential, got "
            f"{type(modules).__name__}"
        )
    out = []
    for m in modules:
        if isinstance(m, nn.Sequential):
            out.extend(_flatten_modules(m))
        elif isinstance(m, nn.Module):
            out.append(m)
        else:
            raise TypeError(f"expected nn.Module entries, got {type(m).__name__}")
    return out


def _check_type(m):
    if isinstance(m, Residual):
        for sub in list(m.body) + list(m.shortcut):
            _check_type(sub)
        return
    if not isinstance(m, _AFFINE + _ACTIVATION + _POOL):
        raise TypeError(
            f"unsupported module {m!r} ({type(m).__name__}); supported modules are "
            f"{_SUPPORTED}"
        )


def _check_supported(m):
    _check_type(m)
    if isinstance(m, Residual):
        for sub in list(m.body) + list(m.shortcut):
            _check_supported(sub)
        return
    if isinstance(m, nn.LeakyReLU) and m.negative_slope > 1:
        raise ValueError(
            f"{m!r}: with negative_slope = {m.negative_slope} > 1, leaky ReLU equals "
            "min(x, s*x), "
            "a concave function, so it is not a max-affine spline (MASO); need "
            "negative_slope <= 1"
        )
    if isinstance(m, _BATCHNORM):
        if m.training:
            raise ValueError(
                f"{m!r} is in training mode: it normalises with batch statistics and "
                "is not an affine map "
                "of a single input; call .eval() first"
            )
        if m.running_mean is None or m.running_var is None:
            raise ValueError(
                f"{m!r} has track_running_stats=False, so it uses batch statistics "
                "even in eval mode "
                "and is not an affine map of a single input"
            )
    if isinstance(m, nn.MaxPool2d) and m.return_indices:
        raise ValueError(f"{m!r}: return_indices=True is not supported")


def _check_shape(input_shape):
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if (
        not isinstance(input_shape, (tuple, list))
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0
            for s in input_shape
        )
        or len(input_shape) == 0
    ):
        raise ValueError(
            "input_shape must be a non-empty tuple of positive ints without the "
            "batch dimension, "
            f"e.g. (C, H, W) or (D,), got {input_shape!r}"
        )
    return tuple(input_shape)


def _same_device(a, b):
    return a.type == b.type and (
        a.index is None or b.index is None or a.index == b.index
    )


def _dtype_device(modules, dtype=None, device=None):
    """Common dtype/device of the modules' parameters and buffers (else the given
    ones, else defaults)."""
    tensors = [
        t
        for m in modules
        for t in list(m.parameters()) + list(m.buffers())
        if t.is_floating_point()
    ]
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) > 1:
        raise ValueError(f"modules mix parameter dtypes {sorted(map(str, dtypes))}")
    if len(devices) > 1:
        raise ValueError(f"modules mix parameter devices {sorted(map(str, devices))}")
    if dtypes:
        (pdtype,) = dtypes
        if dtype is not None and dtype != pdtype:
            raise ValueError(
                f"dtype mismatch: input is {dtype} but the modules' parameters are "
                f"{pdtype}"
            )
        dtype = pdtype
    if devices:
        (pdevice,) = devices
        if device is not None and not _same_device(torch.device(device), pdevice):
            raise ValueError(
                f"device mismatch: input is on {device} but the modules' parameters "
                f"are on {pdevice}"
            )
        device = pdevice
    return dtype or torch.get_default_dtype(), torch.device(
        device
    ) if device is not None else torch.device("cpu")


def _run(modules, x):
    for m in modules:
        x = m(x)
    return x


def _out_shape(modules, shape, dtype, device):
    with torch.no_grad():
        return tuple(
            _run(modules, torch.zeros((1,) + shape, dtype=dtype, device=device)).shape[
                1:
            ]
        )


def affine_params(layer, input_shape, dtype=None, device=None):
    """Dense matrix ``W`` (M, D) and vector ``b`` (M,) of an affine layer (Appendix A).

    ``layer(x).flatten() == W @ x.flatten() + b`` for every ``x`` of shape
    ``input_shape`` (no batch dimension, e.g. ``(C, H, W)`` or ``(D,)``), with
    ``D = prod(input_shape)`` and ``M`` the flattened output size. ``layer`` is
    an ``nn.Linear``, ``nn.Conv2d`` (any stride, padding, padding mode,
    dilation, groups, with or without bias), ``nn.AvgPool2d``, eval-mode
    ``nn.BatchNorm1d/2d`` or ``nn.Flatten`` -- or a list / ``nn.Sequential`` of
    them, which is composed into one affine map.

    ``W`` is the Jacobian of the layer (``torch.func.jacrev``) and ``b`` the
    layer applied to zeros, both in the layer's parameter dtype (``dtype``, or
    the default dtype, for parameter-free layers) and on its device (``device``,
    or the CPU, for parameter-free layers). Dense: intended for small layers.
    """
    modules = _flatten_modules(layer)
    input_shape = _check_shape(input_shape)
    for m in modules:
        _check_supported(m)
        if not isinstance(m, _AFFINE + (nn.Identity,)):
            raise TypeError(
                f"{m!r} is not an affine module; affine_params supports nn.Linear, "
                "nn.Conv2d, "
                "nn.AvgPool2d, nn.BatchNorm1d/2d (eval), nn.Flatten, nn.Identity"
            )
    dtype, device = _dtype_device(modules, dtype, device)
    D = 1
    for s in input_shape:
        D *= s

    def f(v):
        return _run(modules, v.reshape((1,) + input_shape)).reshape(-1)

    zero = torch.zeros(D, dtype=dtype, device=device)
    with torch.no_grad():
        try:
            b = f(zero)
        except RuntimeError as e:
            raise ValueError(
                f"modules {modules} cannot be applied to input_shape {input_shape}: {e}"
            ) from e
        W = torch.func.jacrev(f)(zero)
    return W.detach(), b.detach()


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _maxpool_windows(pool, shape, device):
    """Input unit indices (K_out, kh*kw) of every max-pooling window, and the output
    shape.

    Windows overlapping the padding have fewer valid entries; their padded slots
    are filled with the window's first valid entry (a duplicate, which does not
    change a max).
    """
    C, H, W = shape
    kh, kw = _pair(pool.kernel_size)
    sh, sw = _pair(pool.stride)
    ph, pw = _pair(pool.padding)
    dh, dw = _pair(pool.dilation)
    _, Ho, Wo = _out_shape([pool], shape, torch.float32, device)
    rows = (
        torch.arange(Ho, device=device)[:, None] * sh
        - ph
        + torch.arange(kh, device=device)[None, :] * dh
    )
    cols = (
        torch.arange(Wo, device=device)[:, None] * sw
        - pw
        + torch.arange(kw, device=device)[None, :] * dw
    )
    valid = ((rows >= 0) & (rows < H))[:, None, :, None] & ((cols >= 0) & (cols < W))[
        None, :, None, :
    ]
    spatial = rows[:, None, :, None] * W + cols[None, :, None, :]  # (Ho, Wo, kh, kw)
    valid = valid.reshape(Ho * Wo, kh * kw)
    spatial = spatial.reshape(Ho * Wo, kh * kw)
    first = valid.to(torch.int8).argmax(
        dim=1, keepdim=True
    )  # every window has >= 1 valid entry
    spatial = torch.where(valid, spatial, spatial.gather(1, first))
    idx = (
        torch.arange(C, device=device)[:, None, None] * (H * W) + spatial[None]
    )  # (C, Ho*Wo, kk)
    return idx.reshape(C * Ho * Wo, kh * kw), (C, Ho, Wo)


def _layer_maso(modules, input_shape, max_regions=4096, dtype=None, device=None):
    """Like :func:`layer_maso` but also returns the output feature shape."""
    modules = _flatten_modules(modules)
    input_shape = _check_shape(input_shape)
    if (
        isinstance(max_regions, bool)
        or not isinstance(max_regions, int)
        or max_regions < 1
    ):
        raise ValueError(f"max_regions must be a positive int, got {max_regions!r}")
    for m in modules:
        _check_supported(m)
    dtype, device = _dtype_device(modules, dtype, device)
    if modules and isinstance(modules[0], Residual):
        return residual_maso(modules, input_shape, max_regions, dtype, device)
    affine, act, post, pool, tail = _parse_layer(modules)
    W, b, S0 = _affine_part(affine, input_shape, dtype, device)
    A, B, S1 = nonlinearity_pieces(act, W, b, S0)
    for m in post:
        S1 = _out_shape([m], S1, dtype, device)
    if isinstance(pool, nn.MaxPool2d):
        A, B, S1 = _maxpool_pieces(pool, A, B, S1, max_regions)
    elif isinstance(pool, nn.AvgPool2d):
        A, B = _avgpool_pieces(pool, A, B, S1, max_regions)
        S1 = _out_shape([pool], S1, dtype, device)
    for m in tail:
        S1 = _out_shape([m], S1, dtype, device)
    if A.shape[1] > max_regions:
        raise ValueError(
            f"layer has R = {A.shape[1]} regions per unit > max_regions = {max_regions}"
        )
    return A.contiguous(), B.contiguous(), S1


def _parse_layer(modules):
    """``[affine...] [activation] [Flatten...] [pooling] [Flatten...]``: the parts of
    one MASO layer, or a ValueError naming what does not fit."""
    i, n = 0, len(modules)
    affine = []
    while i < n and isinstance(modules[i], _AFFINE):
        affine.append(modules[i])
        i += 1
    act, pool, post, tail = None, None, [], []
    if i < n and isinstance(modules[i], _ACTIVATION):
        act = modules[i]
        i += 1
    while i < n and isinstance(modules[i], nn.Flatten):
        post.append(modules[i])
        i += 1
    if i < n and isinstance(modules[i], _POOL) and not post:
        pool = modules[i]
        i += 1
        while i < n and isinstance(modules[i], nn.Flatten):
            tail.append(modules[i])
            i += 1
    if i < n:
        raise ValueError(
            f"cannot read {[type(m).__name__ for m in modules]} as one MASO layer: "
            "expected affine modules, "
            "then at most one nonlinearity, then at most one pooling; unexpected "
            f"{modules[i]!r} at position {i} "
            "(use split_layers to cut a network into MASO layers)"
        )
    return affine, act, post, pool, tail


def _affine_part(affine, input_shape, dtype, device):
    """``u = W z + b`` of the layer's affine modules (the identity if there are none),
    and the feature shape of ``u``."""
    if affine:
        W, b = affine_params(affine, input_shape, dtype=dtype, device=device)
        return W, b, _out_shape(affine, input_shape, dtype, device)
    D = 1
    for s in input_shape:
        D *= s
    eye = torch.eye(D, dtype=dtype, device=device)
    return eye, torch.zeros(D, dtype=dtype, device=device), input_shape


def nonlinearity_pieces(act, W, b, S0):
    """Theorem 1 [paper Theorem 1], one nonlinearity: the slopes ``A`` (K, R, D) and
    offsets ``B`` (K, R) of the max-affine pieces of ``act`` applied to ``u = W z + b``
    (feature shape ``S0``), and the output feature shape. ReLU: ``max(u, 0)``,
    leaky-ReLU: ``max(u, s u)``, absolute value: ``max(u, -u)``, maxout: the max over
    each group of ``num_pieces`` features."""
    if act is None or isinstance(act, nn.Identity):
        return W[:, None, :], b[:, None], S0
    if isinstance(act, nn.ReLU):
        A = torch.stack([W, torch.zeros_like(W)], dim=1)
        B = torch.stack([b, torch.zeros_like(b)], dim=1)
        return A, B, S0
    if isinstance(act, nn.LeakyReLU):
        s = act.negative_slope  # <= 1 checked: leaky_relu(x) = max(x, s x)
        return torch.stack([W, s * W], dim=1), torch.stack([b, s * b], dim=1), S0
    if isinstance(act, Abs):
        return torch.stack([W, -W], dim=1), torch.stack([b, -b], dim=1), S0
    p, C = act.num_pieces, S0[0]  # Maxout
    if C % p != 0:
        raise ValueError(
            f"Maxout: {C} features (feature shape {S0}) not divisible by "
            f"num_pieces = {p}"
        )
    rest = W.shape[0] // C
    A = W.reshape(C // p, p, rest, -1).transpose(1, 2).reshape(-1, p, W.shape[1])
    B = b.reshape(C // p, p, rest).transpose(1, 2).reshape(-1, p)
    return A, B, (C // p,) + S0[1:]


def _maxpool_pieces(pool, A, B, S1, max_regions):
    """Max-pooling over the pieces: each output unit's regions are the union of its
    window's pieces."""
    if len(S1) != 3:
        raise ValueError(
            f"{pool!r} needs a (C, H, W) feature map, got feature shape {S1}"
        )
    idx, S1 = _maxpool_windows(pool, S1, A.device)
    K, kk = idx.shape
    R1 = A.shape[1]
    R = kk * R1
    if max_regions < R:
        raise ValueError(
            f"{pool!r} gives R = {kk} * {R1} = {R} regions per unit > max_regions "
            f"= {max_regions}"
        )
    A = A[idx].reshape(K, R, A.shape[-1])  # union of the window's pieces
    return A, B[idx].reshape(K, R), S1


def _avgpool_pieces(pool, A, B, S1, max_regions):
    """Average pooling over the pieces: mean_j max_r (a_jr z + b_jr) = max over
    (r_1..r_n) of sum_j w_j (a_{j r_j} z + b_{j r_j}), with w_j >= 0."""
    dtype, device, R1 = A.dtype, A.device, A.shape[1]
    P, _ = affine_params(pool, S1, dtype=dtype, device=device)  # (K, K1), weights >= 0
    mask = P != 0
    nwin = int(mask.sum(dim=1).max())
    # nonzero columns first; padded slots get weight 0: their choice is a duplicate
    cols = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :nwin]
    w = P.gather(1, cols)
    R = R1**nwin
    if max_regions < R:
        raise ValueError(
            f"{pool!r} after a {R1}-piece nonlinearity gives R = {R1}**{nwin} = "
            f"{R} regions per unit "
            f"> max_regions = {max_regions}; raise max_regions or use a smaller "
            "window"
        )
    r = torch.arange(R, device=device)
    combos = torch.stack(
        [(r // R1 ** (nwin - 1 - j)) % R1 for j in range(nwin)], dim=1
    )  # (R, nwin)
    K = P.shape[0]
    A_new = torch.zeros(K, R, A.shape[-1], dtype=dtype, device=device)
    B_new = torch.zeros(K, R, dtype=dtype, device=device)
    for j in range(nwin):  # window positions, vectorised over units and regions
        A_new += w[:, j, None, None] * A[cols[:, j, None], combos[None, :, j]]
        B_new += w[:, j, None] * B[cols[:, j, None], combos[None, :, j]]
    return A_new, B_new


def _check_residual_tail(modules):
    """Only ``nn.Flatten`` may follow a :class:`Residual` block in one MASO layer."""
    for m in modules[1:]:
        if not isinstance(m, nn.Flatten):
            raise ValueError(
                f"cannot read {[type(m).__name__ for m in modules]} as one MASO layer: "
                "a Residual block is a layer of its own (only nn.Flatten may follow it "
                "in the same layer; use split_layers)"
            )


def residual_maso(modules, input_shape, max_regions, dtype, device):
    """MASO of ``[Residual, nn.Flatten...]`` (Theorem 1 with a skip connection):
    the body's (A, B) plus the shortcut's linear map added to every region's slope."""
    res, tail = modules[0], modules[1:]
    _check_residual_tail(modules)
    try:
        A, B, S = _layer_maso(list(res.body), input_shape, max_regions, dtype, device)
    except ValueError as e:
        raise ValueError(
            f"the body of {type(res).__name__} is not one MASO layer, so the block is "
            "not one MASO (region_affine_map still gives its region-specific affine "
            f"map): {e}"
        ) from e
    P, p = affine_params(list(res.shortcut), input_shape, dtype=dtype, device=device)
    S_short = _out_shape(list(res.shortcut), input_shape, dtype, device)
    if S_short != S:
        raise ValueError(
            f"Residual: the shortcut gives feature shape {S_short} but the body gives "
            f"{S}; they must match to be added"
        )
    A = A + P[:, None, :]  # z_k + max_r(...) = max_r(z_k + ...): every region
    B = B + p[:, None]
    for m in tail:
        S = _out_shape([m], S, dtype, device)
    return A.contiguous(), B.contiguous(), S


def layer_maso(modules, input_shape, max_regions=4096, dtype=None, device=None):
    """MASO parameters ``(A (K, R, D), B (K, R))`` of one DN layer (Theorem 1, Appendix
    A).

    ``modules`` (a list or ``nn.Sequential``) must read as
    ``[affine..., nonlinearity, pooling]``:

    * zero or more affine modules (``nn.Linear``, ``nn.Conv2d``, eval-mode
      ``nn.BatchNorm1d/2d``, ``nn.AvgPool2d``, ``nn.Flatten``), composed into
      one affine map ``u = W z + b`` (:func:`affine_params`);
    * optionally one nonlinearity: ``nn.ReLU`` (pieces ``u, 0``),
      ``nn.LeakyReLU(s)`` with ``s <= 1`` (pieces ``u, s u``; for ``s > 1`` it is
      ``min(u, s u)``, concave, not a MASO: ``ValueError``), :class:`Abs`
      (pieces ``u, -u``), ``nn.Identity`` (R = 1) or :class:`Maxout` (its
      ``num_pieces`` channels);
    * or instead a :class:`Residual` block whose body reads as above (its
      shortcut's row is added to the slope of every region);
    * optionally one pooling: ``nn.MaxPool2d`` (any kernel, stride, padding,
      dilation, ceil mode; the unit's pieces are the union of the pieces in its
      window, padded entries excluded) or ``nn.AvgPool2d`` after a nonlinearity
      (an average of max-affine functions is max-affine over the product of the
      region sets: ``R = R1 ** window``, refused beyond ``max_regions``).

    Units whose window has fewer pieces (borders) are padded by repeating an
    existing piece so that all units share one ``R``; duplicates do not change
    the max (Eq. (1)), only the VQ code numbering. ``nn.Flatten`` may appear
    anywhere (it is the identity on flattened coordinates).

    Then ``maso(A, B, x.flatten()) == nn.Sequential(*modules)(x).flatten()``
    for ``x`` of shape ``input_shape`` (no batch dimension). Unsupported
    modules raise ``TypeError``. ``A`` and ``B`` have the modules' parameter
    dtype and device; ``dtype``/``device`` are only needed for parameter-free
    layers (e.g. a lone ``nn.MaxPool2d``; default: default dtype, CPU) and
    must otherwise agree with the parameters. Dense construction: for small
    layers.

    Args:
        modules: the layer, a list of modules or an ``nn.Sequential``.
        input_shape: the feature shape of one input, without the batch dimension
            (e.g. ``(D,)`` or ``(C, H, W)``); ``D`` is its product.
        max_regions: the largest number of regions ``R`` per unit allowed (default
            4096); more raises ``ValueError``.
        dtype: dtype of ``A`` and ``B`` for parameter-free layers (default ``None``:
            the parameters' dtype, else the default dtype).
        device: device of ``A`` and ``B`` for parameter-free layers (default
            ``None``: the parameters' device, else CPU).

    Returns:
        ``(A, B)``: the slopes, shape ``(K, R, D)``, and offsets, shape ``(K, R)``,
        with ``K`` the flattened output size.

    Example::

        >>> import torch
        >>> from smaso.layers import layer_maso
        >>> from smaso.maso import maso
        >>> layer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> A, B = layer_maso(layer, (3,))
        >>> A.shape, B.shape
        (torch.Size([4, 2, 3]), torch.Size([4, 2]))
        >>> x = torch.randn(3, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(maso(A, B, x), layer(x), atol=1e-6)
        True
    """
    A, B, _ = _layer_maso(modules, input_shape, max_regions, dtype, device)
    return A, B


def _kind(m):
    if isinstance(m, Residual):
        return "residual"
    if isinstance(m, nn.Flatten):
        return "flatten"
    if isinstance(m, _ACTIVATION):
        return "act"
    if isinstance(m, nn.MaxPool2d):
        return "pool"
    if isinstance(m, nn.AvgPool2d):
        return "avgpool"
    return "affine"


def split_layers(seq):
    """Cut an ``nn.Sequential`` (or list of modules) into MASO layers (Theorem 1).

    Returns a list of module lists, each ``[affine..., nonlinearity, pooling]``
    as accepted by :func:`layer_maso`; the whole network is then a composition
    of MASOs (Section 2). A new group starts at the first affine module
    (``Linear``, ``Conv2d``, ``BatchNorm``) after a nonlinearity or pooling, and
    at any module after a pooling; an ``AvgPool2d`` directly after a
    nonlinearity is that layer's pooling, otherwise it is affine. ``nn.Flatten``
    stays in the current group. Nested ``nn.Sequential`` are flattened. A
    :class:`Residual` block is a group of its own.
    """
    modules = _flatten_modules(seq)
    for m in modules:
        _check_type(m)
    groups, state = [], None
    for m in modules:
        k = _kind(m)
        if state is None or k == "residual":
            new = True
        elif k == "flatten" or state == "affine":
            new = False
        elif state == "act":
            new = k not in ("pool", "avgpool")
        else:  # after pooling
            new = True
        if new:
            groups.append([])
            state = "affine"
        groups[-1].append(m)
        if k == "residual":  # a block is a layer of its own
            state = "pool"
        elif k == "act" and state == "affine":
            state = "act"
        elif (k == "pool" and state in ("affine", "act")) or (
            k == "avgpool" and state == "act"
        ):
            state = "pool"
    return groups


def region_affine_map(seq, x, max_regions=4096):
    """The region-specific affine map ``(A_x (Dout, Din), B_x (Dout,))`` of a whole
    network at ``x``.

    For each MASO layer of ``split_layers(seq)`` this computes the layer's
    MASO (:func:`layer_maso`), its hard VQ at the current layer input
    (Eq. (2), Proposition 8), the region-specific affine map ``A[T], B[T]`` of
    Eq. (15), and composes them, ``z_l = A_l[T] z_{l-1} + B_l[T]`` (Eq. (16)).
    Hence ``seq(x).flatten() == A_x @ x.flatten() + B_x``, and ``A_x`` is the
    Jacobian of the network at ``x`` (away from region boundaries). A
    :class:`Residual` block contributes ``P + A_body[z]``, its shortcut's matrix plus
    the region map of its body (computed recursively, so the body may hold several
    MASO layers, as in a ResNet basic block).

    ``x`` is ONE input without batch dimension, e.g. ``(C, H, W)`` or ``(D,)``.
    Dense: for small networks.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    groups = split_layers(seq)
    if not groups:
        raise ValueError("seq has no modules")
    _dtype_device(
        [m for g in groups for m in g], x.dtype, x.device
    )  # clear error on mismatch
    shape = tuple(x.shape)
    z = x.reshape(-1)
    Ax = torch.eye(z.shape[0], dtype=x.dtype, device=x.device)
    Bx = torch.zeros(z.shape[0], dtype=x.dtype, device=x.device)
    for g in groups:
        if isinstance(g[0], Residual):  # shortcut + the body's own region map
            AT, BT, shape = _residual_region_map(g, z, shape, max_regions)
        else:
            A, B, shape = _layer_maso(
                g, shape, max_regions, dtype=x.dtype, device=x.device
            )
            T = hard_vq(A, B, z)
            AT, BT = region_affine(A, B, T)
        Ax = AT @ Ax
        Bx = AT @ Bx + BT
        z = AT @ z + BT
    return Ax, Bx


def _residual_region_map(group, z, shape, max_regions):
    """Region-specific affine map of ``[Residual, nn.Flatten...]`` at input ``z``."""
    res = group[0]
    A_body, B_body = region_affine_map(res.body, z.reshape(shape), max_regions)
    P, p = affine_params(list(res.shortcut), shape, dtype=z.dtype, device=z.device)
    if P.shape != A_body.shape:
        raise ValueError(
            f"Residual: the shortcut maps {tuple(P.shape[::-1])} features but the body "
            f"{tuple(A_body.shape[::-1])}; they must match to be added"
        )
    return P + A_body, p + B_body, _out_shape(group, shape, z.dtype, z.device)
