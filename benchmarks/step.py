"""The training step of the Table 2 runs (Section 5), on the CPU: how many ATen
operations (≈ GPU kernel launches) and host synchronisations one step issues, before
and after the changes that make it fit a GPU, and what packing k runs into one network
(smaso.pack) saves.

1. Operations per step, per Table 2 setting (the largeCNN of the authors' code; the
   template penalty with 10 and 100 classes; the exact rows by QR and by the
   Gram-Schmidt loop): counted with a ``TorchDispatchMode`` over ``train_epoch`` (two
   steps minus one: the per-step count, without the epoch's final read-out).
   "before": the exact layers check their rank in every forward pass (a host
   synchronisation per layer), Adam as PyTorch runs it on CUDA by default (foreach);
   "after": the check once per epoch, fused Adam (what ``smaso.experiment`` does on
   CUDA). Synchronising operations (``_local_scalar_dense``, ``nonzero``, ...) are
   counted apart.
2. Packed k runs against k separate runs: operations per step (also of the pack
   across Table 2's learning rates, each run's step rescaled to its own by
   ``smaso.pack.scale_steps``), and time per step of k sequential steps against one
   packed step (interleaved rounds, median of the paired ratios), for the smallCNN and
   the largeCNN on 32x32 batches of 50.

Writes benchmarks/results/step.json (the previous file kept as step.json.bak).

    .venv/bin/python benchmarks/step.py [--threads 1] [--k 5] [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import loadavg, median_paired_ratio, metadata, write_results
from smaso.experiment import (
    TABLE2_LRS,
    RunConfig,
    build_loss,
    build_model,
    build_packed,
)
from smaso.pack import scale_steps
from smaso.train import train_epoch

#: Operations that read a device value on the host (a GPU synchronisation).
SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.item",
        "aten.is_nonzero",
        "aten.equal",
        "aten.nonzero",
        "aten.masked_select",
        "aten._unique2",
        "aten.unique_consecutive",
    }
)

#: Table 2 settings: RunConfig fields (and the number of classes).
SETTINGS = {
    "baseline": (dict(), 10),
    "filter penalty": (dict(orthogonality="filters"), 10),
    "template penalty, 10 classes": (dict(orthogonality="templates"), 10),
    "template penalty, 100 classes": (
        dict(orthogonality="templates", dataset="cifar100"),
        100,
    ),
    "exact QR + swish": (dict(orthogonality="qr", activation="swish"), 100),
    "exact Gram-Schmidt loop + swish": (
        dict(orthogonality="gs", activation="swish"),
        100,
    ),
    "authors' exact row (unnormalised GS, apodised)": (
        dict(
            model="small-cnn-v2",
            orthogonality="gs-unnormalised",
            activation="swish-softplus",
            protocol="authors",
        ),
        10,
    ),
}


#: Operations that make a tensor from sizes or values given on the host (on a GPU:
#: values copied from the host, or a shape a graph would bake in), counted as
#: "created" when the package's own code calls them inside a step; a copy with an
#: explicit ``device`` counts as a move. (``ones_like`` and its kind take everything
#: from a tensor on the device: a fill, like any other operation.)
FACTORY_OPS = frozenset(
    {
        "aten.arange",
        "aten.empty",
        "aten.empty_strided",
        "aten.eye",
        "aten.full",
        "aten.hamming_window",
        "aten.lift_fresh",
        "aten.linspace",
        "aten.new_empty",
        "aten.new_empty_strided",
        "aten.new_full",
        "aten.new_ones",
        "aten.new_zeros",
        "aten.ones",
        "aten.rand",
        "aten.randint",
        "aten.randn",
        "aten.randperm",
        "aten.scalar_tensor",
        "aten.zeros",
    }
)
PACKAGE = str(Path(__file__).resolve().parents[1] / "smaso")
_TORCH = str(Path(torch.__file__).resolve().parent)
#: PyTorch's frames between an operation and the dispatch mode that sees it.
_WRAPPERS = (
    "torch/utils/_python_dispatch.py",
    "torch/_ops.py",
    "torch/_dynamo/eval_frame.py",
    "torch/_compile.py",
)


def _caller() -> str:
    """``file:line`` of the innermost Python frame outside this file and PyTorch's
    dispatch machinery: where the operation was asked for."""
    f = sys._getframe(2)
    while f is not None and (
        f.f_code.co_filename == __file__ or f.f_code.co_filename.endswith(_WRAPPERS)
    ):
        f = f.f_back
    return "?" if f is None else f"{f.f_code.co_filename}:{f.f_lineno}"


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations run under it (after autograd: forward, backward and
    optimiser alike). A synchronising operation on one of the ``host`` tensors (Adam's
    step counters, which PyTorch keeps on the CPU for a CUDA model unless the optimiser
    is fused or capturable) is counted as ``host_scalar``: no device is waited for.
    A factory operation (:data:`FACTORY_OPS`) or a copy to an explicit ``device``
    called from the package's own code (``smaso/``, not PyTorch's internals, such as
    the backward engine's zero gradients) is also counted under ``created FILE:LINE
    OP``."""

    def __init__(self, host=()):
        super().__init__()
        self.ops = collections.Counter()
        self.host = {id(t) for t in host}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS and args and id(args[0]) in self.host:
            name = "host_scalar"
        self.ops[name] += 1
        moved = name in ("aten._to_copy", "aten.copy_") and "device" in (kwargs or {})
        if name in FACTORY_OPS or moved:
            where = _caller()
            if where.startswith(PACKAGE) and not where.startswith(_TORCH):
                self.ops[f"created {where[len(PACKAGE) - 5 :]} {name}"] += 1
        return func(*args, **(kwargs or {}))


def created(ops: collections.Counter) -> dict:
    """The tensors the package's code created or moved: ``{"FILE:LINE OP": n}``."""
    return {k[len("created ") :]: v for k, v in ops.items() if k.startswith("created ")}


def count_ops(fn, host=()) -> collections.Counter:
    with OpCounter(host) as c:
        fn()
    return c.ops


def per_step_ops(model, opt, extra, x, y, batches) -> collections.Counter:
    """Operations of one training step: ``train_epoch`` over two batches minus over
    one (the epoch's set-up and read-out cancel), after a first step that creates the
    optimiser's state."""
    train_epoch(model, opt, x, y, batches[:1], extra)
    host = [s["step"] for s in opt.state.values() if s["step"].device.type == "cpu"]
    one = count_ops(lambda: train_epoch(model, opt, x, y, batches[:1], extra), host)
    two = count_ops(lambda: train_epoch(model, opt, x, y, batches[:2], extra), host)
    two.subtract(one)
    return +two


def summary(ops: collections.Counter) -> dict:
    new = created(ops)
    return {
        "ops": sum(v for k, v in ops.items() if not k.startswith("created ")),
        "created": sum(new.values()),
        "created_ops": new,
        "syncs": sum(v for k, v in ops.items() if k in SYNC_OPS),
        "sync_ops": {k: v for k, v in ops.items() if k in SYNC_OPS},
    }


def _data(n, classes, batch, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    shape = (batch,) if k is None else (k, batch)
    batches = [torch.randint(0, n, shape, generator=g) for _ in range(2)]
    return x, y, batches


def optimizer(model, kind):
    params = list(model.parameters())
    if kind == "fused":
        return torch.optim.Adam(params, lr=1e-3, fused=True)
    return torch.optim.Adam(params, lr=1e-3, foreach=kind == "foreach")


def count_settings(model_name, batch, names):
    """Operations per step of each setting, before and after."""
    out = {}
    for name in names:
        fields, classes = SETTINGS[name]
        config = RunConfig(**{"model": model_name, **fields})
        x, y, batches = _data(8 * batch, classes, batch)
        extra = build_loss(config)
        row = {}
        for when, check, kind in (
            ("before", True, "foreach"),
            ("after", False, "fused"),
        ):
            model = build_model(config, 3, classes, check=check)
            ops = per_step_ops(model, optimizer(model, kind), extra, x, y, batches)
            row[when] = summary(ops)
        row["ratio"] = row["after"]["ops"] / row["before"]["ops"]
        out[name] = row
        print(
            f"{name:48s} ops/step {row['before']['ops']:7d} -> "
            f"{row['after']['ops']:7d}, syncs {row['before']['syncs']:3d} -> "
            f"{row['after']['syncs']:3d}"
        )
    return out


def packed_vs_separate(model_name, k, batch, rounds, fields=None):
    """Operations and time per step: k separate steps against one packed step."""
    config = RunConfig(model=model_name, **(fields or {}))
    configs = [RunConfig(**{**config.to_dict(), "seed": s}) for s in range(k)]
    classes = 10
    x, y, batches = _data(8 * batch, classes, batch)
    _, _, packed_batches = _data(8 * batch, classes, batch, k=k)
    extra = build_loss(config)
    separate = [build_model(c, 3, classes, check=False) for c in configs]
    packed = build_packed(configs, 3, classes)
    opts = [optimizer(m, "fused") for m in separate]
    popt = optimizer(packed, "fused")
    ops_one = per_step_ops(separate[0], opts[0], extra, x, y, batches)
    ops_packed = per_step_ops(packed, popt, extra, x, y, packed_batches)
    # the same pack across Table 2's rates: each run's step rescaled to its own
    rates = [TABLE2_LRS[r % len(TABLE2_LRS)] for r in range(k)]
    across = build_packed(
        [dataclasses.replace(c, lr=lr) for c, lr in zip(configs, rates, strict=True)],
        3,
        classes,
    )
    aopt = optimizer(across, "fused")
    scale_steps(aopt, across, [lr / rates[0] for lr in rates])
    ops_across = per_step_ops(across, aopt, extra, x, y, packed_batches)

    def seq_step():
        for m, o in zip(separate, opts, strict=True):
            train_epoch(m, o, x, y, batches[:1], extra)

    def packed_step():
        train_epoch(packed, popt, x, y, packed_batches[:1], extra)

    seq_step(), packed_step()  # warm-up
    t_seq, t_packed = [], []
    for _ in range(rounds):
        for f, store in ((seq_step, t_seq), (packed_step, t_packed)):
            t0 = time.process_time()
            f()
            store.append(time.process_time() - t0)
    row = {
        "k": k,
        "batch": batch,
        "ops_per_step_one_run": summary(ops_one)["ops"],
        "ops_per_step_k_separate": k * summary(ops_one)["ops"],
        "ops_per_step_packed": summary(ops_packed)["ops"],
        "ops_per_step_packed_across_rates": summary(ops_across)["ops"],
        "cpu_s_k_sequential_steps": sorted(t_seq)[len(t_seq) // 2],
        "cpu_s_packed_step": sorted(t_packed)[len(t_packed) // 2],
        "packed_over_sequential": median_paired_ratio(t_packed, t_seq),
        "rounds": rounds,
    }
    print(
        f"{model_name:16s} k={k}: ops/step {row['ops_per_step_k_separate']} "
        f"separate -> {row['ops_per_step_packed']} packed "
        f"({row['ops_per_step_packed_across_rates']} across rates); time packed / "
        "sequential "
        f"{row['packed_over_sequential']:.2f}"
    )
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="seconds: a smoke test")
    p.add_argument("--out", default=str(Path(__file__).parent / "results/step.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        names = ["baseline", "filter penalty", "exact QR + swish"]
        counts = {"small-cnn": count_settings("small-cnn", 2, names)}
        packing = {"small-cnn": packed_vs_separate("small-cnn", 2, 8, 2)}
    else:
        counts = {
            "large-cnn-code": count_settings(
                "large-cnn-code", 2, [n for n in SETTINGS if "authors" not in n]
            ),
            "small-cnn-v2": count_settings(
                "small-cnn-v2", 2, [n for n in SETTINGS if "authors" in n]
            ),
        }
        packing = {
            "small-cnn": packed_vs_separate("small-cnn", a.k, 50, a.rounds),
            "large-cnn-code": packed_vs_separate(
                "large-cnn-code", a.k, 50, max(3, a.rounds // 2)
            ),
        }
    result = {
        **metadata(),
        "quick": a.quick,
        "loadavg": loadavg(),
        "ops_per_step": counts,
        "packed": packing,
    }
    write_results(a.out, result)
    return result


if __name__ == "__main__":
    main()
