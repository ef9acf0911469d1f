"""Orthogonal filters (Section 5, Eq. 11, Table 2 and the paragraphs after it):
penalties and exact layers.

Theorem 4 needs the slopes of different units to be orthogonal, Eq. (11). For a layer
``nn.Linear`` / ``nn.Conv2d`` followed by a ReLU, the slopes of unit ``k`` are its
filter ``w_k`` (the weight row, or the conv filter flattened to ``in_channels * kh *
kw``) and 0, so Eq. (11) asks for mutually orthogonal filters. (For a convolution this
is orthogonality of the filters at one position only; the rows of the full convolution
matrix at overlapping positions are not orthogonal, see the paper's Appendix B.) Two
ways to get there:

* penalties added to the loss: the paper's ``lambda sum_{k != k'} <w_k, w_k'>^2`` (and a
  scale-free, normalised variant), and the penalty the authors' released code trains
  with, on the Gram matrix of the per-class input templates ``d f_c / d x`` (double
  backprop);
* an exact reparametrisation ``W = orth(V)`` (a ``torch.nn.utils.parametrize``
  parametrization) by classical Gram-Schmidt (a loop, as in the paper), modified
  Gram-Schmidt, or a sign-fixed QR factorisation, which compute the same function.

Decisions. Orthogonalised filters have unit norm by default (``keep_norms=True`` gives
each the norm of the raw filter ``v_k`` instead). When a layer has more filters than
inputs (``out > fan_in``, e.g. 96 filters of 3x3 on RGB, in R^27) the filters cannot be
mutually orthogonal; by default (``tall="columns"``) the weight then gets orthonormal
*columns* (``W^T W = I``, the closest a tall matrix gets to orthogonal rows), or with
``tall="error"`` a ``ValueError``. Linearly dependent filters raise a ``ValueError``.
Never NaN. A *square* layer (as many filters as inputs) loses its last filter's sign
when that raw filter's residual crosses zero in training; :func:`reanchor_`, called
every few steps, changes the raw weight without changing the function so that it does
not (``benchmarks/square_layers.py``).
"""

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "OrthogonalFilters",
    "anchor_map",
    "check_orthogonalizable",
    "check_rank",
    "filter_matrix",
    "filter_penalty",
    "gram_schmidt",
    "input_templates",
    "layer_groups",
    "maso_orthogonality_penalty",
    "modified_gram_schmidt",
    "orthogonal_layers",
    "orthogonality_penalty",
    "orthogonalize",
    "penalty_loss",
    "qr_orthogonalize",
    "reanchor_",
    "reanchor_every",
    "reanchored",
    "register_orthogonal",
    "rows_to_orthogonalize",
    "template_penalty",
]

METHODS = ("gs", "mgs", "qr")
TALL = ("columns", "error")


def _check_weight(W, name="W"):
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim < 2:
        raise ValueError(
            f"{name} must have shape (out, ...) with at least 2 dims, got "
            f"{tuple(W.shape)}"
        )
    if not W.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(W.shape)})")


def filter_matrix(W):
    """The filters of a weight as rows, ``(out, fan_in)``: a Linear weight as is, a conv
    weight ``(out, in, kh, kw)`` flattened to ``(out, in * kh * kw)``: the slopes of Eq.
    (11)."""
    _check_weight(W)
    return W.reshape(W.shape[0], -1)


def orthogonality_penalty(W, normalized=False, groups=1):
    """``sum_{k != k'} <w_k, w_k'>^2`` over the filters of ``W`` (Section 5, with lambda
    = 1).

    This is the paper's penalty ``sum_k sum_{k' != k} sum_{r, r'} <A[k,r], A[k',r']>^2``
    for a ReLU layer, whose slopes are ``(w_k, 0)``. ``normalized=True`` uses the
    cosines ``<w_k, w_k'> / (||w_k|| ||w_k'||)`` instead, which does not push the filter
    norms down (zero filters count as orthogonal to everything). Equals ``||W W^T||_F^2
    - sum_k ||w_k||^4``. ``groups > 1``: the weight of a grouped layer (the packed runs
    of :mod:`smaso.pack`), penalised group by group; a tensor of ``groups`` penalties.
    """
    F = _group_filters(W, groups)
    if normalized:
        norm = torch.linalg.vector_norm(F, dim=-1, keepdim=True)
        F = F / torch.where(norm > 0, norm, torch.ones_like(norm))
    G = F @ F.mT
    pen = (G * G).sum((-2, -1)) - (G.diagonal(dim1=-2, dim2=-1) ** 2).sum(-1)
    return pen if groups > 1 else pen[0]


def _group_filters(W, groups):
    """The filters of ``W`` as ``(groups, out / groups, fan_in)``."""
    F = filter_matrix(W)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if F.shape[0] % groups:
        raise ValueError(f"{F.shape[0]} filters cannot be split into {groups} groups")
    return F.reshape(groups, F.shape[0] // groups, F.shape[1])


def layer_groups(m):
    """How many independent groups of filters layer ``m`` holds: a convolution's
    ``groups``, a packed dense layer's (:class:`smaso.models.GroupedLinear`), else
    1."""
    return getattr(m, "groups", 1)


def maso_orthogonality_penalty(A):
    """The paper's penalty ``sum_k sum_{k' != k} sum_{r, r'} <A[k,r], A[k',r']>^2`` on
    MASO slopes
    ``A`` (K, R, D) (Section 5, Table 2; zero iff Eq. (11) holds)."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim != 3:
        raise ValueError(f"A must have shape (K, R, D), got {tuple(A.shape)}")
    G = torch.einsum("krd,lsd->krls", A, A)
    same = torch.eye(A.shape[0], dtype=torch.bool, device=A.device)[:, None, :, None]
    return (G * G).masked_fill(same, 0.0).sum()


def orthogonal_layers(model):
    """The ``nn.Linear`` and ``nn.Conv2d`` modules of ``model`` (in ``model.modules()``
    order): the layers whose filters Eq. (11) constrains and the penalties / exact
    parametrisation act on."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def filter_penalty(model, normalized=False):
    """Sum of :func:`orthogonality_penalty` over every Linear/Conv2d weight of ``model``
    (Section 5).

    Uses ``module.weight``, i.e. the orthogonalised weight of a parametrised layer.
    For packed runs (:mod:`smaso.pack`: grouped layers) one penalty per run.
    """
    layers = orthogonal_layers(model)
    if not layers:
        raise ValueError(
            f"model has no nn.Linear or nn.Conv2d layer to penalise: {model}"
        )
    return sum(
        orthogonality_penalty(m.weight, normalized, layer_groups(m)) for m in layers
    )


def input_templates(model, x, create_graph=True):
    """Per-class input templates ``d f_c(x_n) / d x_n``, shape (N, C, *x.shape[1:]).

    These are the rows of the region-specific affine map of the whole network (Eq. 15-16
    applied end to end). One backward pass per class; with ``create_graph=True`` the
    result can itself be differentiated (double backprop). Per-sample templates need a
    model that treats samples independently (no batch norm in training mode). A model
    of packed runs (:mod:`smaso.pack`) maps (k, N, ...) to (k, N, C); its templates are
    (k, N, C, ...), each run's from its own inputs.
    """
    return _templates(model, x, create_graph)[0]


def _check_template_args(model, x):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")


def _check_output(out, x, lead):
    if out.ndim != lead + 1 or out.shape[:lead] != x.shape[:lead]:
        raise ValueError(
            f"model must map (N, ...) inputs to (N, C) outputs, got {tuple(out.shape)} "
            f"for input {tuple(x.shape)}"
        )


def _templates(model, x, create_graph):
    """(templates, number of leading sample axes of ``x``: 1, or 2 for packed runs).

    One forward pass of ``model`` on ``x`` (which updates batch-norm running
    statistics as a training forward pass does), then all classes' backward passes
    at once, as one batch of cotangents: through the layers of a network of
    :mod:`smaso.models` (:func:`_chain`) by their explicit backward formulas, else by
    ``torch.func.vmap`` over ``torch.autograd.grad``. The template of class ``c`` is
    the gradient of ``sum_n f_c(x_n)`` in ``x_n``, exactly what one backward pass per
    class (:func:`_templates_loop`) gives, batch-norm's cross-sample terms included."""
    _check_template_args(model, x)
    lead = 2 if hasattr(model, "runs") else 1  # packed runs: (k, N, ...)
    chain = _chain(model)
    with torch.enable_grad():
        if chain is None:
            return _templates_vmap(model, x, create_graph, lead), lead
        T = _templates_chain(chain, model, x, lead)
    return (T if create_graph else T.detach()), lead


def _templates_loop(model, x, create_graph):
    """The templates by one backward pass per class (the reference the batched
    :func:`_templates` is tested against)."""
    _check_template_args(model, x)
    x = x.detach().requires_grad_(True)
    out = model(x)
    lead = 2 if hasattr(model, "runs") else 1
    _check_output(out, x, lead)
    C = out.shape[-1]
    eye = torch.eye(C, dtype=out.dtype, device=out.device)
    grads = [
        torch.autograd.grad(
            out, x, eye[c].expand_as(out), create_graph=create_graph, retain_graph=True
        )[0]
        for c in range(C)
    ]
    return torch.stack(grads, dim=lead), lead


def _one_hots(out):
    """(C, *out.shape): cotangent ``c`` is 1 at class ``c`` of every output row (of
    every run), 0 elsewhere; built from ``out`` (no factory call)."""
    C = out.shape[-1]
    E = torch.diag_embed(torch.ones_like(out.detach()[(0,) * (out.ndim - 1)]))
    return E.view(C, *(1,) * (out.ndim - 1), C).expand(C, *out.shape)


def _templates_vmap(model, x, create_graph, lead):
    """Any model: one backward pass vmapped over the classes' cotangents."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    _check_output(out, x, lead)

    def vjp(g):
        return torch.autograd.grad(
            out, x, g, create_graph=create_graph, retain_graph=True
        )[0]

    return torch.func.vmap(vjp)(_one_hots(out)).movedim(0, lead)


#: Modules that act on each entry apart (per-channel parameters at most): their
#: backward is the product with their derivative, computed once for all classes.
_ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.GELU,
    nn.ELU,
    nn.Softplus,
    nn.Identity,
)


#: Elementwise modules whose derivative is piecewise constant.
_PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.Identity)


def _elementwise_types():
    from . import activations as act  # imported late: this module imports no smaso one

    return (
        *_ELEMENTWISE,
        act.BetaVQAbs,
        act.BetaVQLeakyReLU,
        act.BetaVQMaxout,
        act.BetaVQReLU,
        act.SoftplusSwish,
        act.TsallisVQReLU,
    )


def _supported(m):
    from .models import GroupedLinear

    if isinstance(m, nn.Conv2d):
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if isinstance(m, nn.MaxPool2d):
        k, s = nn.modules.utils._pair(m.kernel_size), nn.modules.utils._pair(m.stride)
        return (
            k == s
            and nn.modules.utils._pair(m.padding) == (0, 0)
            and nn.modules.utils._pair(m.dilation) == (1, 1)
            and not m.ceil_mode
            and not m.return_indices
        )
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return nn.modules.utils._pair(m.output_size) == (1, 1)
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    if getattr(m, "inplace", False):
        return False
    return isinstance(m, (nn.Linear, GroupedLinear, *_elementwise_types()))


def _chain(model):
    """The layers of ``model`` if it is an ``nn.Sequential`` (or packed runs of one,
    :class:`smaso.pack.PackedRuns`) of layers whose backward :func:`_templates_chain`
    knows, ending in a dense layer; else None."""
    from .pack import PackedRuns

    net = model.net if isinstance(model, PackedRuns) else model
    if type(net) is not nn.Sequential or not len(net):
        return None
    layers = list(net)
    if not all(_supported(m) for m in layers) or not isinstance(layers[-1], nn.Linear):
        return None
    return layers


def _batch_norm_backward(m, z):
    """The backward of batch norm ``m`` at its input ``z`` (N, ch, ...), as a function
    of a batch of cotangents (B, N, ch, ...): in training mode (batch statistics) the
    gradient through the normalisation, the statistics of each cotangent's own N
    samples included."""
    dims = (0, *range(2, z.ndim))
    shape = (1, -1, *(1,) * (z.ndim - 2))
    w = m.weight.view(shape) if m.weight is not None else None
    if m.training or m.running_mean is None:
        var, mean = torch.var_mean(z, dim=dims, correction=0, keepdim=True)
        invstd = (var + m.eps).rsqrt()
        xhat = (z - mean) * invstd
        a = invstd if w is None else invstd * w
        red = tuple(d + 1 for d in dims)

        def back(g):
            mg = g.mean(red, keepdim=True)
            m2 = (g * xhat).mean(red, keepdim=True)
            return a * g - (a * mg + (a * m2) * xhat)

        return back
    a = (m.running_var.view(shape) + m.eps).rsqrt()
    a = a if w is None else a * w
    return lambda g: g * a


def _templates_chain(layers, model, x, lead):
    """Templates through ``layers`` (:func:`_chain`) with explicit backward formulas
    applied to all classes' cotangents at once, a batch (C, N, ...): the forward pass
    runs each layer as the model does (same values, same batch-norm updates) and keeps
    what the backward needs, then the cotangents go down the layers. Differentiable
    (double backprop) in the parameters."""
    z, out, backs = _chain_forward(layers, model, x, lead, graph=True)
    return _chain_backward(backs, _class_cotangents(z, out), model, x, lead)


def _class_cotangents(z, out):
    """The cotangents of the network's output ``z`` (N, [runs *] C), one per class:
    (C, *z.shape)."""
    g = _one_hots(z.view(len(z), -1, out.shape[-1]))
    return g.reshape(g.shape[0], *z.shape)


def _chain_forward(layers, model, x, lead, graph, stats=True):
    """The forward pass of :func:`_templates_chain`: (the network's output, as its last
    layer gives it and as (N, C) or (runs, N, C); per layer, its backward as a
    function of a batch of cotangents). ``graph``: the backward can be differentiated
    in the parameters. ``stats=False``: batch norm in training mode normalises with
    the batch's statistics but leaves its running statistics as they are (a
    recomputation of a forward pass that updated them)."""
    from .models import GroupedLinear

    x = x.detach()
    z = model.pack_input(x) if lead == 2 else x
    backs = []
    for m in layers:
        if isinstance(m, nn.Conv2d):
            W, zin = m.weight, z.shape
            z = m._conv_forward(z, W, m.bias)
            backs.append(_conv_backward(m, W, zin, z.shape))
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            backs.append(_batch_norm_backward(m, z))
            if stats or not m.training:
                z = m(z)
            else:
                z = nn.functional.batch_norm(
                    z, None, None, m.weight, m.bias, True, 0.0, m.eps
                )
            continue
        if isinstance(m, nn.MaxPool2d):
            y, idx = nn.functional.max_pool2d(
                z, m.kernel_size, m.stride, return_indices=True
            )
            backs.append(_max_pool_backward(z, y, idx))
            z = y
            continue
        if isinstance(m, nn.AdaptiveAvgPool2d):
            H, W = z.shape[-2:]
            shape = z.shape
            backs.append(lambda g, s=shape, a=H * W: g.expand(g.shape[0], *s) / a)
            z = m(z)
            continue
        if isinstance(m, nn.Flatten):
            shape = z.shape
            backs.append(lambda g, s=shape: g.reshape(g.shape[0], *s))
            z = m(z)
            continue
        if isinstance(m, GroupedLinear):
            W = m.weight.view(m.groups, -1, m.in_features)
            backs.append(lambda g, W=W: _grouped_backward(g, W))
            z = m(z)
            continue
        if isinstance(m, nn.Linear):
            W = m.weight
            backs.append(lambda g, W=W: g @ W)
            z = m(z)
            continue
        if not z.requires_grad:  # (nothing before needs a gradient)
            z = z.detach().requires_grad_(True)
        y = m(z)  # elementwise: the derivative at z, for every class
        (slope,) = torch.autograd.grad(y, z, torch.ones_like(y), create_graph=graph)
        if not graph or isinstance(m, _PIECEWISE_LINEAR):  # a slope of zero
            slope = slope.detach()  # derivative: the product keeps no class-wide tensor
        backs.append(lambda g, s=slope: g * s)
        z = y if graph else y.detach()
    out = z.view(len(z), model.runs, -1).transpose(0, 1) if lead == 2 else z
    _check_output(out, x, lead)
    return z, out, backs


def _chain_backward(backs, g, model, x, lead):
    """The templates of the classes whose cotangents ``g`` (B, *output shape) are
    given: ``backs`` (:func:`_chain_forward`) applied in reverse, then (B, N, [runs *]
    ch, H, W) -> (N, B, ...) or (runs, N, B, ch, H, W)."""
    for back in reversed(backs):
        g = back(g)
    if lead == 2:
        g = g.view(g.shape[0], g.shape[1], model.runs, *x.shape[2:])
        return g.permute(2, 1, 0, *range(3, g.ndim))
    return g.movedim(0, 1)


def _conv_backward(m, W, zin, zout):
    """Backward of convolution ``m`` (weight ``W``) from output shape ``zout`` to
    input shape ``zin``: a transposed convolution on the (C * N) cotangents."""
    out_pad = [
        zin[2 + i]
        - ((zout[2 + i] - 1) * m.stride[i] - 2 * m.padding[i])
        - m.dilation[i] * (m.kernel_size[i] - 1)
        - 1
        for i in range(2)
    ]

    def back(g):
        t = nn.functional.conv_transpose2d(
            g.flatten(0, 1), W, None, m.stride, m.padding, out_pad, m.groups, m.dilation
        )
        return t.view(g.shape[0], *zin)

    return back


def _max_pool_backward(z, y, idx):
    """Backward of a max-pooling with non-overlapping windows (kernel = stride): each
    output's cotangent goes to its window's maximum, the one the pooling's indices
    name (ties as PyTorch breaks them)."""
    mask = torch.zeros_like(z).flatten(2).scatter_(2, idx.flatten(2), 1.0).view_as(z)
    (H, W), (h, w) = z.shape[-2:], y.shape[-2:]
    kh, kw = H // h, W // w

    def back(g):
        B = g.shape[:-2]
        up = g[..., :, None, :, None].expand(*B, h, kh, w, kw)
        up = up.reshape(*B, h * kh, w * kw)
        if (h * kh, w * kw) != (H, W):
            up = nn.functional.pad(up, (0, W - w * kw, 0, H - h * kh))
        return up * mask

    return back


def _grouped_backward(g, W):
    """Backward of a :class:`smaso.models.GroupedLinear` (weight ``W`` as (groups,
    out, in)) for cotangents (B, N, groups * out)."""
    B, N = g.shape[:2]
    t = torch.einsum("bngo,goi->bngi", g.view(B, N, W.shape[0], W.shape[1]), W)
    return t.reshape(B, N, -1)


def _gram_penalty(T, lead):
    T = T.flatten(lead + 1)  # (..., N, C, D)
    G = T @ T.mT
    N, C = G.shape[-3], G.shape[-1]
    off = 1.0 - torch.diag_embed(torch.ones_like(G[..., 0, 0, :]))[..., None, :, :]
    return (G * G * off).sum((-3, -2, -1)) / (N * C * C)


class _ChunkedTemplatePenalty(torch.autograd.Function):
    """:func:`template_penalty` of a network :func:`_chain` knows, in class chunks.

    With ``G_n = T_n T_n^T`` the Gram matrix of input ``n``'s templates and ``P`` the
    penalty, ``dP = (4 / (N C^2)) sum_n sum_c <dT_{n,c}, U_{n,c}>`` where ``U_n =
    (G_n with a zero diagonal) T_n``: the penalty's gradient in the parameters is the
    gradient of ``<T(theta), U>`` at a fixed ``U``, a sum over classes. The forward
    pass computes the templates ``chunk`` classes at a time without a graph, then ``P``
    and ``U``; the backward pass recomputes the layers' forward once (batch-norm
    running statistics untouched) and differentiates ``<T_chunk, U_chunk>`` chunk by
    chunk. A pass holds one chunk's cotangents of every layer, instead of all ``C``
    classes': memory grows with the chunk, operations with the number of chunks."""

    @staticmethod
    def forward(ctx, model, layers, x, lead, chunk, *params):
        with torch.enable_grad():  # the elementwise layers' derivatives
            z, out, backs = _chain_forward(layers, model, x, lead, graph=False)
        parts = _class_cotangents(z, out).split(chunk)
        T = torch.cat([_chain_backward(backs, g, model, x, lead) for g in parts], lead)
        T = T.flatten(lead + 1)  # (..., N, C, D)
        G = T @ T.mT
        off = 1.0 - torch.diag_embed(torch.ones_like(G[..., 0, 0, :]))[..., None, :, :]
        N, C = G.shape[-3], G.shape[-1]
        ctx.save_for_backward(x, (G * off) @ T, *params)
        ctx.model, ctx.layers, ctx.lead, ctx.chunk = model, layers, lead, chunk
        ctx.scale = 4 / (N * C * C)
        return (G * G * off).sum((-3, -2, -1)) / (N * C * C)

    @staticmethod
    def backward(ctx, grad):
        x, U, *params = ctx.saved_tensors
        model, layers, lead, chunk = ctx.model, ctx.layers, ctx.lead, ctx.chunk
        w = (grad * ctx.scale).reshape(*grad.shape, 1, 1, 1)  # per run when packed
        grads = [None] * len(params)
        with torch.enable_grad():
            z, out, backs = _chain_forward(layers, model, x, lead, True, stats=False)
            parts = _class_cotangents(z, out).split(chunk)
            for g, u in zip(parts, U.split(chunk, lead), strict=True):
                T = _chain_backward(backs, g, model, x, lead).flatten(lead + 1)
                part = torch.autograd.grad(
                    (T * u * w).sum(), params, retain_graph=True, allow_unused=True
                )
                grads = [_add(a, b) for a, b in zip(grads, part, strict=True)]
        return (None, None, None, None, None, *grads)


def _add(a, b):
    return b if a is None else a if b is None else a + b


def template_penalty(model, x, chunk=None):
    """The penalty the authors' released code trains with for the Table 2 experiment
    (Section 5), applied to the templates instead of the slopes of Eq. (11): squared
    off-diagonal entries of each input's template Gram matrix ``G_n[c, c'] = <d f_c / d
    x_n, d f_c' / d x_n>``, averaged like the code does:

        (1 / (N C^2)) sum_n sum_{c != c'} G_n[c, c']^2

    (a mean over all ``C x C x N`` entries, with the diagonal set to zero).
    Differentiable (double backprop) in the model's parameters. For a linear model
    ``f(x) = W x + b`` it is ``orthogonality_penalty(W) / C^2``. Packed runs: one
    penalty per run. All classes' templates come from one batched backward pass
    (:func:`_templates`). With ``chunk`` (an int), a network of :mod:`smaso.models`
    takes ``chunk`` classes per pass, the gradient too
    (:class:`_ChunkedTemplatePenalty`, differentiable once, in the parameters): the
    same numbers in a memory that grows with the chunk instead of the number of
    classes, for more operations (``benchmarks/template.py`` measures both).
    """
    _check_template_args(model, x)
    chain = _chain(model) if chunk is not None else None
    if chain is None:
        return _gram_penalty(*_templates(model, x, True))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(
            f"chunk must be a positive int (classes per pass), got {chunk!r}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    lead = 2 if hasattr(model, "runs") else 1
    return _ChunkedTemplatePenalty.apply(model, chain, x.detach(), lead, chunk, *params)


def _template_penalty_loop(model, x):
    """:func:`template_penalty` with one backward pass per class: the reference."""
    return _gram_penalty(*_templates_loop(model, x, True))


PENALTIES = ("filters", "filters_normalized", "templates")


def penalty_loss(kind, lam=1.0, chunk=None):
    """An ``extra_loss(model, x, y)`` for :func:`smaso.train.fit`: ``lam`` times one of
    the penalties.

    ``kind``: ``"filters"`` (the paper's, Section 5), ``"filters_normalized"``
    (cosines), or ``"templates"`` (the authors' code, :func:`template_penalty`, with
    ``chunk`` classes per pass). ``lam``: a number, or for packed runs
    (:mod:`smaso.pack`) a tensor of one weight per run, on the model's device.
    """
    if kind not in PENALTIES:
        raise ValueError(f"kind must be one of {PENALTIES}, got {kind!r}")
    if isinstance(lam, torch.Tensor):
        if lam.ndim != 1 or not bool((lam >= 0).all() & lam.isfinite().all()):
            raise ValueError(f"lam must be one nonnegative weight per run, got {lam}")
    elif isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"lam must be a nonnegative number, got {lam!r}")

    def extra_loss(model, x, y):
        if kind == "templates":
            return lam * template_penalty(model, x, chunk)
        return lam * filter_penalty(model, normalized=(kind == "filters_normalized"))

    return extra_loss


# ---------------------------------------------------------------- exact
# orthogonalisation


def check_rank(norms, M):
    """Refuse numerically dependent rows of ``M`` (Eq. 11 cannot hold): ``norms`` are
    the lengths of what is left of each row after removing the previous ones (a
    Gram-Schmidt norm, a diagonal of R); a ``ValueError`` if one is not finite or below
    ``max(rows, cols) * eps * max row norm``, instead of NaN. ``M`` may hold a batch of
    matrices (..., rows, cols), ``norms`` (..., rows). Reads the values on the host: a
    synchronisation on a GPU."""
    n = norms.abs()
    scale = torch.linalg.vector_norm(M, dim=-1).amax(-1, keepdim=True)
    tol = max(M.shape[-2:]) * torch.finfo(M.dtype).eps * scale
    if not bool(torch.isfinite(n).all()) or bool((n <= tol).any()):
        raise ValueError(
            f"the {M.shape[-2]} vectors to orthogonalise (matrix "
            f"{tuple(M.shape[-2:])}) are linearly dependent (or not finite): they "
            "cannot be made orthogonal"
        )


def rows_to_orthogonalize(W, tall="columns", groups=1):
    """(rows, transposed): the vectors to make orthogonal (Eq. 11) as ``(groups, rows,
    cols)``, the filters of each group, or (``out > fan_in``, ``tall="columns"``) their
    columns (``transposed`` True)."""
    M = _group_filters(W, groups)
    if tall not in TALL:
        raise ValueError(f"tall must be one of {TALL}, got {tall!r}")
    _, out, fan_in = M.shape
    if out <= fan_in:
        return M, False
    if tall == "error":
        raise ValueError(
            f"{out} filters in R^{fan_in} (weight {tuple(W.shape)}) cannot be "
            "mutually orthogonal "
            f"(out > in*kh*kw); use tall='columns' to get orthonormal columns instead"
        )
    return M.mT, True


def gs_rows(M, check=True):
    """Classical Gram-Schmidt on the rows of M (out <= fan_in), the paper's exact
    orthogonalisation of the filters (Section 3.4, Theorem 4): each row minus its
    projections on the previous orthonormal rows, computed from the original row, then
    normalised. ``M`` may be a batch (..., out, fan_in); ``check``: refuse dependent
    rows (:func:`orthogonalize`)."""
    # the orthonormal rows so far, grown by concatenation (one autograd node per row)
    Q, norms = M[..., :0, :], []
    for k in range(M.shape[-2]):
        m = M[..., k, :, None]
        u = (m - Q.mT @ (Q @ m))[..., 0]
        nk = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
        norms.append(nk)
        Q = torch.cat([Q, (u / nk)[..., None, :]], dim=-2)
    if check:
        check_rank(torch.cat(norms, -1), M)
    return Q


def mgs_rows(M, check=True):
    """Modified Gram-Schmidt: normalise the next row, then remove it from all remaining
    rows (``M`` and ``check`` as in :func:`gs_rows`)."""
    rows, norms = [], []
    V = M
    for _ in range(M.shape[-2]):
        nk = torch.linalg.vector_norm(V[..., 0, :], dim=-1, keepdim=True)
        q = V[..., 0, :] / nk
        norms.append(nk)
        rows.append(q)
        V = V[..., 1:, :] - (V[..., 1:, :] @ q[..., None]) * q[..., None, :]
    if check:
        check_rank(torch.cat(norms, -1), M)
    return torch.stack(rows, dim=-2)


def qr_rows(M, check=True):
    """Orthonormal rows by QR of M^T with the signs of R's diagonal folded into Q, so
    that R has a positive diagonal: the unique such factorisation, hence the same rows
    as Gram-Schmidt (``M`` and ``check`` as in :func:`gs_rows`)."""
    Q, Rm = torch.linalg.qr(M.mT)
    d = Rm.diagonal(dim1=-2, dim2=-1)
    if check:
        check_rank(d, M)
    return (Q * d.sign()[..., None, :]).mT


_ROWS = {"gs": gs_rows, "mgs": mgs_rows, "qr": qr_rows}


def orthogonalize(
    W, method="qr", tall="columns", keep_norms=False, *, groups=1, check=True
):
    """Exactly orthogonal filters (Eq. 11) from a raw weight ``W`` (out, ...) of the
    same shape.

    The filters (rows of :func:`filter_matrix`) are orthonormalised in order, ``w_1``
    first, by ``method``: ``"gs"`` classical Gram-Schmidt (the paper's
    reparametrisation, a Python loop), ``"mgs"`` modified Gram-Schmidt (a loop,
    numerically more stable), or ``"qr"`` (one ``torch.linalg.qr``). In exact arithmetic
    all three give the same rows, with the same gradients. ``keep_norms=True`` rescales
    row ``k`` to ``||w_k||``. If ``out > fan_in``: with ``tall="columns"`` the *columns*
    are orthonormalised instead (``W^T W = I``), with ``tall="error"`` a ``ValueError``.
    Linearly dependent or non-finite rows raise a ``ValueError`` — a check that reads
    values on the host (a GPU synchronisation); ``check=False`` leaves it out, for a
    training step that checks once per epoch instead (:func:`check_orthogonalizable`).
    ``groups``: the filters of a grouped layer (packed runs, :mod:`smaso.pack`) are
    orthogonalised group by group, in one batched computation.

    Args:
        W: the raw weight, ``(out, ...)`` (e.g. ``(out, in)`` or ``(out, in, kh, kw)``);
            its filters are its flattened rows.
        method: ``"gs"``, ``"mgs"`` or ``"qr"`` (default ``"qr"``).
        tall: what to do if ``out > fan_in``: ``"columns"`` (default) or ``"error"``.
        keep_norms: rescale each orthonormal filter to its raw norm (default False).
        groups: the number of groups of a grouped layer (default 1).
        check: raise on dependent or non-finite filters (default True).

    Returns:
        the orthogonalised weight, of ``W``'s shape.

    Example::

        >>> import torch
        >>> from smaso.orthogonal import orthogonalize
        >>> W = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
        >>> Q = orthogonalize(W)
        >>> Q.shape, torch.allclose(Q @ Q.T, torch.eye(3), atol=1e-5)
        (torch.Size([3, 5]), True)
        >>> torch.allclose(Q, orthogonalize(W, "gs"), atol=1e-5)
        True
    """
    _check_weight(W)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    M, transposed = rows_to_orthogonalize(W, tall, groups)
    if check and not bool(torch.isfinite(M).all()):
        raise ValueError("W contains NaN or inf entries")
    Q = _ROWS[method](M, check)
    if transposed:
        Q = Q.mT
    if keep_norms:
        Q = Q * torch.linalg.vector_norm(
            _group_filters(W, groups), dim=-1, keepdim=True
        )
    return Q.reshape(W.shape)


def check_orthogonalizable(model):
    """Raise ``ValueError`` if a parametrised layer of ``model`` (:class:`
    OrthogonalFilters` or the authors' unnormalised Gram-Schmidt) has raw filters that
    cannot be orthogonalised (dependent or not finite): the check a training step with
    ``check=False`` leaves out, run once (e.g. per epoch). Returns the number of layers
    checked."""
    n = 0
    with torch.no_grad():
        for m in orthogonal_layers(model):
            if not parametrize.is_parametrized(m, "weight"):
                continue
            W = m.parametrizations.weight.original
            for p in m.parametrizations.weight:
                if hasattr(p, "verify"):
                    p.verify(W)
                    n += 1
                W = p(W)
    return n


def gram_schmidt(W, tall="columns", keep_norms=False):
    """Classical Gram-Schmidt orthogonalisation of the filters, the paper's
    reparametrisation
    (Section 5, after Table 2; :func:`orthogonalize` with ``method="gs"``)."""
    return orthogonalize(W, "gs", tall, keep_norms)


def modified_gram_schmidt(W, tall="columns", keep_norms=False):
    """Modified Gram-Schmidt (Björck, 1967; :func:`orthogonalize` with
    ``method="mgs"``), Eq. (11)."""
    return orthogonalize(W, "mgs", tall, keep_norms)


def qr_orthogonalize(W, tall="columns", keep_norms=False):
    """Sign-fixed QR (:func:`orthogonalize` with ``method="qr"``): same function as
    Gram-Schmidt, Eq. (11)."""
    return orthogonalize(W, "qr", tall, keep_norms)


class OrthogonalFilters(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: ``weight =
    orthogonalize(original, ...)``.

    Orthogonalises whole flattened filters, Eq. (11). (PyTorch's
    ``nn.utils.parametrizations.orthogonal`` on a 4-D conv weight orthogonalises each
    ``kh x kw`` slice instead.) The raw weight stays the trainable parameter
    (``parametrizations.weight.original``), so gradients flow through the
    orthogonalisation, as in the paper. ``groups``: a grouped layer's filters
    (packed runs, :mod:`smaso.pack`), group by group. ``check=False``: no rank check in
    the forward pass (it synchronises a GPU on every step); :meth:`verify` (through
    :func:`check_orthogonalizable`) runs it when asked, e.g. once per epoch.
    """

    def __init__(
        self, method="qr", tall="columns", keep_norms=False, *, groups=1, check=True
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if tall not in TALL:
            raise ValueError(f"tall must be one of {TALL}, got {tall!r}")
        self.method, self.tall, self.keep_norms = method, tall, bool(keep_norms)
        self.groups, self.check = groups, bool(check)

    #: orthonormal filters (:func:`reanchored` keeps the raw filters' norms)
    unnormalised = False

    def _orthogonalize(self, weight, check):
        # autocast off: Gram-Schmidt's matmuls in bf16 leave filters orthogonal to ~1e-3
        with torch.autocast(weight.device.type, enabled=False):
            return orthogonalize(
                weight,
                self.method,
                self.tall,
                self.keep_norms,
                groups=self.groups,
                check=check,
            )

    def forward(self, weight):
        return self._orthogonalize(weight, self.check)

    def verify(self, weight):
        """Raise ``ValueError`` if ``weight`` cannot be orthogonalised."""
        self._orthogonalize(weight, True)

    def right_inverse(self, weight):
        """A raw weight whose orthogonalisation is ``weight``, so that ``layer.weight =
        W`` works after registration, as with PyTorch's own parametrizations.

        :func:`orthogonalize` leaves filters that already satisfy Eq. (11) as they are
        (orthonormal ones; orthogonal ones with ``keep_norms=True``), so the raw weight
        is ``weight`` itself (a copy: the layer does not share the caller's tensor).
        Other filters end up orthogonalised, as ``parametrizations.orthogonal`` does
        with a matrix that is not orthogonal. With ``tall="columns"`` and
        ``keep_norms=True`` the map has no such inverse (``NotImplementedError``, as
        PyTorch raises for its Cayley map): set ``parametrizations.weight.original``.
        The first call (registration) fixes the shape; a weight of another shape is
        refused (one instance per layer, as :func:`register_orthogonal` does).
        """
        _check_weight(weight, "weight")
        shape = getattr(self, "shape", None)
        if shape is None:
            self.shape = tuple(weight.shape)
        elif tuple(weight.shape) != shape:
            raise ValueError(
                f"expected a weight of shape {shape}, got {tuple(weight.shape)}"
            )
        _, out, fan_in = _group_filters(weight, self.groups).shape
        if self.keep_norms and out > fan_in:
            raise NotImplementedError(
                "a tall weight with keep_norms=True cannot be assigned through the "
                "parametrization; set parametrizations.weight.original instead"
            )
        return weight.detach().clone()

    def extra_repr(self):
        return (
            f"method={self.method!r}, tall={self.tall!r}, keep_norms={self.keep_norms}"
            f", groups={self.groups}, check={self.check}"
        )


def register_orthogonal(model, method="qr", tall="columns", keep_norms=False):
    """Make every ``nn.Linear`` / ``nn.Conv2d`` weight of ``model`` exactly orthogonal
    (Eq. 11) by registering :class:`OrthogonalFilters` on it; returns the parametrised
    modules.

    Refuses grouped convolutions (their weight mixes groups) and layers already
    parametrised. With ``tall="error"``, layers with ``out > fan_in`` are refused before
    anything is registered.
    """
    layers = orthogonal_layers(model)
    if not layers:
        raise ValueError(
            f"model has no nn.Linear or nn.Conv2d layer to orthogonalise: {model}"
        )
    OrthogonalFilters(method, tall, keep_norms)  # validates the arguments
    for m in layers:
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(
                f"{m}: grouped convolutions (groups={m.groups}) are not supported"
            )
        if parametrize.is_parametrized(m, "weight"):
            raise ValueError(f"{m}: weight is already parametrised")
        with torch.no_grad():
            rows_to_orthogonalize(m.weight, tall)  # raises early for tall='error'
    for m in layers:
        parametrize.register_parametrization(
            m, "weight", OrthogonalFilters(method, tall, keep_norms)
        )
    return layers


# ---------------------------------------------------------------- re-anchoring
# A square exact layer (as many filters as inputs) has its last orthonormal filter
# fixed, up to sign, by the others: the loss does not depend on the last raw filter
# ``v_n`` except through the sign of its residual ``R_nn = <v_n, q_n>``, which the other
# filters' rotation (and Adam's steps on rounding noise) can take through zero: the
# filter flips (a jump of the function), and near zero the rank check raises.


def anchor_map(M, unnormalised=False):
    """The change of raw variable that re-anchors the exact parametrisation of the rows
    of ``M`` (..., r, c), ``r <= c`` (Eq. 11).

    With ``M = L Q`` (``Q`` the sign-fixed orthonormal rows of :func:`qr_rows`, ``L``
    lower triangular with the positive diagonal ``|R_kk|``), returns ``A = D L^-1``
    (float64, (..., r, r), lower triangular with positive diagonal), so that ``A M =
    D Q``: ``D`` the rows' norms ``||v_k||`` (orthonormalised filters: ``A M`` has the
    raw rows' norms and residuals ``R_kk = ||v_k||``, the largest they can be), or
    ``D = |R_kk|`` (``unnormalised``: ``A M = U``, the authors' unnormalised
    Gram-Schmidt filters, whose residuals *are* ``|R_kk|``, so unchanged). Since the
    QR factorisation with positive diagonal is unique, ``orth(A X) = orth(X)`` for
    every ``X`` of full rank: the re-anchored raw weight computes the same filters
    (and so does any perturbation of it: a change of variable, not an approximation).
    Dependent rows raise the ``ValueError`` of :func:`check_rank`.
    """
    M64 = M.detach().double()
    R = torch.linalg.qr(M64.mT, mode="r")[1]
    d = R.diagonal(dim1=-2, dim2=-1)
    check_rank(d, M64)
    L = R.mT * d.sign()[..., None, :]  # M = L (Q signs)^T, diagonal |R_kk|
    D = d.abs() if unnormalised else torch.linalg.vector_norm(M64, dim=-1)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    return D[..., :, None] * torch.linalg.solve_triangular(L, eye, upper=False)


def reanchored(W, p, prior=()):
    """The re-anchored raw weight of an exact parametrisation ``p`` (an
    :class:`OrthogonalFilters` or the authors' unnormalised Gram-Schmidt,
    :class:`smaso.filters.UnnormalisedGramSchmidt`) with raw weight ``W``: the same
    exactly orthogonal filters (Eq. 11), from raw filters whose residuals are
    ``R_kk = ||v_k||`` (:func:`anchor_map`), far from the rank tolerance; ``None`` where
    that is not possible (see below).

    ``prior``: the parametrisations applied to ``W`` before ``p`` (e.g. the
    apodisation of :class:`smaso.filters.Apodize`); each must apply one linear map to
    every filter alike (attribute ``filterwise_linear``), so that it commutes with the
    change of variable ``W -> A W``, which mixes filters. Layers with more filters than
    inputs (their *columns* orthonormalised, ``tall="columns"``) are re-anchored
    column-wise, ``W -> W A^T``, unless a prior parametrisation or ``keep_norms``
    (norms of the rows) would not commute with that: then ``None`` (such layers cannot
    lose a filter the square way: their columns' residuals live in a space of more
    than one dimension, where the loss has a gradient). Float64 computation, the
    result in ``W``'s dtype.
    """
    for q in prior:
        if not getattr(q, "filterwise_linear", False):
            raise ValueError(
                f"cannot re-anchor through the parametrization {q}: only one applying "
                "the same linear map to every filter (filterwise_linear) commutes with "
                "it"
            )
    pre = W
    for q in prior:
        pre = q(pre)
    M, transposed = rows_to_orthogonalize(pre, p.tall, p.groups)
    if transposed and (prior or p.keep_norms):
        return None
    A = anchor_map(M, p.unnormalised)
    F = _group_filters(W, p.groups).double()
    F = F @ A.mT if transposed else A @ F
    return F.reshape(W.shape).to(W.dtype)


def reanchor_(model, unnormalised=False):
    """Re-anchor every exact layer of ``model`` in place (those of the authors'
    unnormalised Gram-Schmidt only with ``unnormalised=True``, see below): its raw
    weight (``parametrizations.weight.original``) becomes :func:`reanchored`'s, copied
    into the same tensor (no new storage: it can run between replays of a captured CUDA
    graph); returns the number of layers re-anchored. The function the model computes is
    unchanged (to rounding); what changes is the raw weight: orthonormalised filters
    get raw filters ``||v_k|| q_k`` (residuals ``R_kk = ||v_k||``, rows' norms kept), so
    the residual of a square layer's last filter starts again from its largest value
    instead of drifting to zero (a flip of that filter, a jump of the function, or the
    rank check's ``ValueError``). For the authors' unnormalised Gram-Schmidt the raw
    weight becomes the filters ``u_k`` themselves: same function, same residuals
    (``|R_kk| = ||u_k||`` is the filter's norm there, and a zero crossing is continuous,
    the filter shrinking through 0); only the components of the raw filters along
    earlier ones are removed. It cannot help there, and in ``benchmarks/
    square_layers.py`` it changed training so that filters shrank closer to the rank
    tolerance: left out by default.

    Call it once after building the model (the initial raw weight is far from
    anchored: a square layer's last residual can start near zero), then every few
    steps (:func:`reanchor_every`).

    The optimiser's state is left as it is (Adam's moments kept). Re-anchoring is the
    change of raw variable ``W -> A W`` (:func:`anchor_map`): the raw gradient at the
    same function becomes ``A^-T`` times the old one, and ``A`` is the identity plus
    the drift of the raw weight since the last re-anchoring (``A = I`` re-anchoring
    twice), small when re-anchoring often (``benchmarks/square_layers.py`` records
    it), so the kept moments are close to those of the new variable. Transforming the
    first moment exactly (``A^-T m``) has no counterpart for the second (not linear in
    the gradient); resetting them restarts Adam's bias correction for these layers
    (it needs their step counts). Keeping them needs no access to the optimiser, works
    with any, and leaves a captured optimiser step untouched. Reads values on the host
    (a GPU synchronisation) and raises the ``ValueError`` of :func:`check_rank` if a
    layer's filters are already dependent.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    n = 0
    with torch.no_grad():
        for m in orthogonal_layers(model):
            if not parametrize.is_parametrized(m, "weight"):
                continue
            plist = m.parametrizations.weight
            exact = [i for i, p in enumerate(plist) if hasattr(p, "unnormalised")]
            if not exact or (plist[exact[-1]].unnormalised and not unnormalised):
                continue
            if exact != [len(plist) - 1]:
                raise ValueError(
                    f"{m}: can only re-anchor one exact parametrization, applied last"
                )
            W = plist.original
            new = reanchored(W, plist[-1], list(plist)[:-1])
            if new is not None:
                W.copy_(new)
                n += 1
    return n


def reanchor_every(model, every, unnormalised=False):
    """A training hook (``on_batch`` of :func:`smaso.train.train_epoch`) calling
    :func:`reanchor_` (``model``, ``unnormalised``) after every ``every``-th call
    (counted across epochs); it returns what :func:`reanchor_` returned, else 0."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    calls = 0

    def hook(*_):
        nonlocal calls
        calls += 1
        return reanchor_(model, unnormalised) if calls % every == 0 else 0

    return hook
