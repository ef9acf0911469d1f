"""Packed runs: several training runs of one network as one network, so that a GPU
does the work of k runs per kernel launch (Table 2's grid, Section 5).

A step of the Table 2 networks on batches of 50 images is too small to fill a GPU: it
is bound by the number of kernel launches, not by arithmetic. Packing k runs of the same
configuration (different seeds) side by side multiplies the work per launch by k:

* every convolution becomes a grouped convolution with ``groups=k`` (run ``r`` reads
  only its own input channels), batch norm and the per-channel activations (learnable
  β) simply get k times the channels, the dense layer is a
  :class:`smaso.models.GroupedLinear`; so each run keeps its own weights, batch-norm
  statistics and β (:func:`smaso.models.conv_net` with ``runs=k``);
* each run has its own batches: the input is (k, N, C, H, W), run ``r``'s images in
  ``x[r]``, and the output (k, N, classes);
* the loss is the sum of the runs' losses, so each run's gradient is its own; Adam is
  element-wise, so each run's optimiser state and steps are its own too. Penalties and
  exact orthogonality act group by group (:mod:`smaso.orthogonal`);
* runs may differ in their learning rate and penalty weight as well: each run's
  penalty is weighted by its own λ, and :func:`scale_steps` makes each run's Adam
  step its own learning rate's (one optimiser, one fused kernel, for all runs).

k packed runs compute the numbers of the k separate runs (to rounding: the tests check
float64 to 1e-10). :func:`pack_state` and :func:`unpack_state` move weights between
the two forms, so each run still gets its own results and weights files.
"""

from __future__ import annotations

import collections
import math
import os
import weakref

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "LiveBytes",
    "PackedRuns",
    "free_memory",
    "pack_size",
    "pack_state",
    "scale_steps",
    "unpack_state",
]


class PackedRuns(nn.Module):
    """``runs`` networks trained side by side: ``net`` is the network built with
    ``runs=k`` (grouped layers, :func:`smaso.models.conv_net`); the module maps (k, N,
    C, H, W) to (k, N, classes), run ``r``'s output from run ``r``'s input only."""

    def __init__(self, net: nn.Module, runs: int):
        super().__init__()
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise ValueError(f"runs must be a positive int, got {runs!r}")
        self.net, self.runs = net, runs

    def forward(self, x):
        return (
            self.net(self.pack_input(x)).view(x.shape[1], self.runs, -1).transpose(0, 1)
        )

    def pack_input(self, x):
        """The input of ``net`` for inputs ``x`` (k, N, C, H, W): (N, k * C, H, W),
        run ``r``'s channels group ``r``."""
        k, n = x.shape[:2]
        if k != self.runs:
            raise ValueError(
                f"expected inputs of {self.runs} runs, (runs, N, ...), got "
                f"{tuple(x.shape)}"
            )
        x = x.transpose(0, 1).reshape(n, k * x.shape[2], *x.shape[3:])
        if x.is_cuda and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def pack_state(states: list[dict], packed: PackedRuns) -> dict:
    """The state dict of ``packed`` holding the
    separate runs' ``states`` (the same network built with ``runs=1``, one per run).

    Each packed tensor is the runs' tensors stacked along their first axis (output
    filters, channels, classes); counters (batch norm's ``num_batches_tracked``) must
    agree across runs. A state that does not fit is a ``ValueError`` naming the key.
    """
    target = packed.state_dict()
    prefix, k = "net.", packed.runs
    if len(states) != k:
        raise ValueError(f"{len(states)} states for {k} packed runs")
    keys = [key.removeprefix(prefix) for key in target]
    for s in states:
        if sorted(s) != sorted(keys):
            raise ValueError(
                "the runs' networks do not have the packed network's layers: "
                f"{sorted(set(s) ^ set(keys))[:5]}"
            )
    out = {}
    for key, t in target.items():
        parts = [s[key.removeprefix(prefix)] for s in states]
        if parts[0].shape == t.shape:  # a counter, shared
            if any(not torch.equal(p, parts[0]) for p in parts):
                raise ValueError(f"{key}: the runs disagree ({parts})")
            out[key] = parts[0].clone()
            continue
        same = all(p.shape == parts[0].shape for p in parts)
        if (
            not same
            or t.ndim == 0
            or t.shape[0] != k * parts[0].shape[0]
            or (t.numel() != k * parts[0].numel())
        ):
            raise ValueError(
                f"{key}: cannot pack {k} tensors of shape {tuple(parts[0].shape)} into "
                f"{tuple(t.shape)}"
            )
        out[key] = torch.cat([p.reshape(t.shape[0] // k, *t.shape[1:]) for p in parts])
    return out


def unpack_state(packed: PackedRuns, separate: nn.Module) -> list[dict]:
    """The separate runs' state dicts (each fitting ``separate``, the network built
    with ``runs=1``) from the packed network: the inverse of :func:`pack_state`."""
    shapes = {k: v.shape for k, v in separate.state_dict().items()}
    k = packed.runs
    out = [{} for _ in range(k)]
    for key, t in packed.state_dict().items():
        name = key.removeprefix("net.")
        if name not in shapes:
            raise ValueError(f"{key} has no counterpart in the separate network")
        t = t.detach()
        for r in range(k):
            if t.shape == shapes[name]:
                out[r][name] = t.clone()
            else:
                out[r][name] = t.reshape(k, -1)[r].reshape(shapes[name]).clone()
    return out


def scale_steps(opt: torch.optim.Optimizer, packed: PackedRuns, factors) -> list:
    """Make each packed run's optimiser step its own: run ``r``'s step times
    ``factors[r]``, so that Adam at learning rate ``lr`` steps run ``r`` at
    ``factors[r] * lr`` (Section 5's grid of learning rates in one pack).

    Adam's step ``-lr m / (sqrt(v) + eps)`` is linear in ``lr`` and its moments do not
    depend on it; so the step taken at ``lr`` and scaled afterwards is the step at
    ``factors[r] * lr``. A pre-step hook keeps the parameters, a post-step hook moves
    them back by ``1 - factors[r]`` of the step (``torch.lerp``; a factor of 1 leaves
    the step as it is, to the bit). Both are in-place multi-tensor operations on
    buffers made here, once, so a captured CUDA graph holds them. The optimiser's
    state (and its checkpoint) is that of the unscaled optimiser.

    Args:
        opt: the optimiser of ``packed``'s parameters (Adam; any optimiser whose step
            is linear in its learning rate).
        packed: the packed runs; every parameter holds the runs' slices along its
            first axis.
        factors: one positive factor per run (run ``r``'s rate over ``opt``'s).

    Returns:
        The hooks' handles (``.remove()`` them to undo).

    Example::

        >>> import torch
        >>> from smaso.pack import PackedRuns, scale_steps
        >>> packed = PackedRuns(torch.nn.Linear(1, 2, bias=False), 2)
        >>> with torch.no_grad():
        ...     _ = packed.net.weight.fill_(1.0)
        >>> opt = torch.optim.SGD(packed.parameters(), lr=0.5)
        >>> handles = scale_steps(opt, packed, [1.0, 0.25])
        >>> packed.net.weight.grad = torch.ones(2, 1)
        >>> opt.step()
        >>> packed.net.weight.flatten().tolist()
        [0.5, 0.875]
    """
    k = packed.runs
    factors = [float(f) for f in factors]
    if len(factors) != k or not all(math.isfinite(f) and f > 0 for f in factors):
        raise ValueError(f"need {k} positive step factors, got {factors}")
    params = [p for p in packed.parameters() if p.requires_grad]
    owned = {id(p) for g in opt.param_groups for p in g["params"]}
    if any(id(p) not in owned for p in params):
        raise ValueError("the optimiser does not hold all of the packed parameters")
    weights = []
    for p in params:
        if p.ndim == 0 or p.shape[0] % k:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is not per run")
        w = torch.tensor([1.0 - f for f in factors], dtype=p.dtype, device=p.device)
        shape = (k, p.shape[0] // k, *p.shape[1:])
        w = w.view(k, *[1] * p.ndim).expand(shape).reshape(p.shape)
        weights.append(w.contiguous())
    before = [torch.empty_like(p) for p in params]

    def keep(*_):
        with torch.no_grad():
            torch._foreach_copy_(before, params)

    def scale(*_):
        with torch.no_grad():
            torch._foreach_lerp_(params, before, weights)

    return [opt.register_step_pre_hook(keep), opt.register_step_post_hook(scale)]


# --------------------------------------------------------------------------------------
# how many runs fit


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes of the tensors created under it that are still referenced
    (a storage counted once, while any tensor on it lives): ``.peak`` after the
    ``with`` block. Counted op by op, so the same on every machine; what a device's
    allocator adds (rounding, workspaces) is not in it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs = collections.Counter()
        self.seen = set()

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t) in self.seen:
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key == 0:
                continue
            if self.refs[key] == 0:
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            self.seen.add(id(t))
            weakref.finalize(t, self._release, key, nbytes)
            weakref.finalize(t, self.seen.discard, id(t))
        return out


def free_memory(device) -> int:
    """Bytes free on ``device``: what the CUDA driver reports, or the host's free
    physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pack_size(per_run: int, free: int, cap: int, headroom: float = 0.8) -> int:
    """How many runs to pack in the free memory of a device.

    Args:
        per_run: bytes one run holds at the peak of its step
            (:func:`smaso.experiment.runner.run_memory`).
        free: bytes free (:func:`free_memory`).
        cap: the most runs to pack (the user's ``--pack``).
        headroom: the fraction of ``free`` to fill.

    Returns:
        At least 1 (a run that does not fit still runs alone), at most ``cap``.

    Example::

        >>> from smaso.pack import pack_size
        >>> pack_size(per_run=10, free=100, cap=15), pack_size(10, 100, 4)
        (8, 4)
    """
    if per_run <= 0 or free < 0 or cap < 1 or not 0 < headroom <= 1:
        raise ValueError(
            f"need per_run > 0, free >= 0, cap >= 1 and 0 < headroom <= 1, got "
            f"{per_run}, {free}, {cap}, {headroom}"
        )
    return max(1, min(cap, int(headroom * free // per_run)))
