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
  exact orthogonality act group by group (:mod:`smaso.orthogonal`).

k packed runs compute the numbers of the k separate runs (to rounding: the tests check
float64 to 1e-10). :func:`pack_state` and :func:`unpack_state` move weights between
the two forms, so each run still gets its own results and weights files.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PackedRuns", "pack_state", "unpack_state"]


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
