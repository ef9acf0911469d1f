"""The Table 2 study (Section 5): its grid of runs, sweeps over them (sharded, claimed,
failures isolated), and the table that aggregates their results.

* :class:`Table2Grid` and :func:`table2_configs` list the runs of Table 2 (datasets x
  learning rates x {baseline, penalty} x seeds, plus the exactly orthogonal + swish row
  and, optionally, its controls); :func:`shard` splits them across machines.
* :func:`sweep` runs a list of them: finished runs are skipped, partial ones resumed,
  runs another process has claimed left to it, and a run that raises is recorded
  (``RUN_ID.failed.json``, with its traceback) while the sweep goes on.
* :func:`table2` / :func:`format_table` aggregate results into Table 2's layout (mean ±
  std over seeds), refusing to average runs of different commits, precisions or torch
  versions unless told to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..data import DATASETS, TABLE2_DATASETS, download_dataset
from ..filters import EXACT
from ..models import ACTIVATIONS, MODELS, can_pack
from ..orthogonal import PENALTIES
from ..pack import free_memory, pack_size
from ..records import now, write_json_atomic
from .config import BY_PROTOCOL, ORTHOGONALITY, PROTOCOLS, TABLE2_LRS, RunConfig
from .frame import option
from .runner import (
    RunClaimedError,
    Runtime,
    data_key,
    load_data,
    pack_key,
    resolve_device,
    run,
    run_memory,
    run_packed,
)
from .store import FAILED_FORMAT, failed_path, run_status

__all__ = [
    "METRICS",
    "PROVENANCE",
    "SUBSET_STUDY",
    "MixedRunsError",
    "Table2Grid",
    "download",
    "format_table",
    "packs",
    "parse_shard",
    "record_failure",
    "setting_of",
    "shard",
    "subset_study",
    "sweep",
    "table2",
    "table2_configs",
]

METRICS = ("final_test_acc", "best_test_acc", "last_test_acc")
#: What the runs averaged in one cell of the table must share.
PROVENANCE = ("git_commit", "precision", "torch")


@dataclass(frozen=True)
class Table2Grid:
    """The runs of Table 2 (Section 5) beyond what each run's :class:`RunConfig` says.
    Fields left at None take the protocol's value (:data:`PROTOCOLS`, ``grid``)."""

    datasets: tuple = option(
        tuple(sorted(TABLE2_DATASETS)),
        "comma-separated datasets",
        DATASETS,
        kind="names",
    )
    lrs: tuple = option(TABLE2_LRS, "comma-separated learning rates", kind="floats")
    seeds: tuple = option(
        tuple(range(5)), "a seed count (5: seeds 0-4) or a list (0,3,7)", kind="seeds"
    )
    penalty: str | None = option(
        None,
        "penalty of the Ortho rows: filters (paper), templates (authors' code)",
        PENALTIES,
        filled=BY_PROTOCOL,
    )
    exact: bool = option(True, "the exactly orthogonal + swish row")
    exact_model: str | None = option(
        None, "network of the exact row (default: version 2 of --model)", MODELS
    )
    exact_activation: str | None = option(
        None, "activation of the exact row", ACTIVATIONS, filled=BY_PROTOCOL
    )
    exact_method: str | None = option(
        None,
        "qr: the same function as Gram-Schmidt (gs), faster",
        EXACT,
        filled=BY_PROTOCOL,
    )
    exact_datasets: tuple | None = option(
        None, "default: cifar100 if swept, else the first", DATASETS, kind="names"
    )
    exact_lrs: tuple | None = option(
        None,
        "learning rates of the exact row (if the protocol has none: --lrs)",
        kind="floats",
        filled=BY_PROTOCOL,
    )
    exact_epochs: int | None = option(
        None,
        "epochs of the exact row (if the protocol has none: --epochs)",
        filled=BY_PROTOCOL,
    )
    exact_reference: bool = option(
        False, "also the exact row's network with ReLU and no orthogonality"
    )
    exact_control: bool | None = option(
        None,
        "the 2x2 control of the exact row: {its activation, ReLU} x {exact, none}",
        filled=BY_PROTOCOL,
    )

    def resolved(self, protocol: str) -> Table2Grid:
        preset = PROTOCOLS[protocol].grid
        return dataclasses.replace(
            self,
            **{k: v for k, v in preset.items() if getattr(self, k) is None},
        )


def table2_configs(
    datasets=Table2Grid.datasets, lrs=TABLE2_LRS, seeds=tuple(range(5)), **options
) -> list[RunConfig]:
    """The runs of Table 2 (Section 5): ``datasets`` x ``lrs`` x {baseline, penalty} x
    ``seeds``, plus (``exact=True``) the exactly orthogonal + swish row of the paragraph
    after it.

    ``options`` are the other fields of :class:`Table2Grid` and any field of
    :class:`RunConfig` but the per-row ones, given to every run (``protocol`` among
    them, which also fills the grid's unset fields). Baseline: ReLU, no penalty.
    Penalty: ``penalty`` with weight ``lam``. Exact row: ``exact_model`` (default:
    version 2 of ``model``, whose layers can all be orthogonal) with
    ``exact_activation`` and ``exact_method`` on ``exact_datasets`` at ``exact_lrs`` for
    ``exact_epochs``; ``exact_reference`` adds that network with ReLU and no
    orthogonality, ``exact_control`` the full 2x2 of {activation, ReLU} x {exact, none}.
    Ordered seed by seed, so that a partial sweep (or shard) holds whole tables for the
    first seeds.
    """
    grid_names = {f.name for f in dataclasses.fields(Table2Grid)}
    row_names = {f.name for f in dataclasses.fields(RunConfig) if f.metadata["row"]}
    bad = set(options) & row_names
    if bad:
        raise ValueError(f"{sorted(bad)} are set per row of the grid, not for all runs")
    grid = Table2Grid(
        tuple(datasets),
        tuple(float(v) for v in lrs),
        tuple(seeds),
        **{k: v for k, v in options.items() if k in grid_names},
    ).resolved(options.get("protocol", "paper"))
    common = {k: v for k, v in options.items() if k not in grid_names}
    if not grid.datasets or not grid.lrs or not grid.seeds:
        raise ValueError("datasets, lrs and seeds must be non-empty")
    if grid.penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {grid.penalty!r}")
    model = common.get("model", RunConfig.model)
    epochs = common.get("epochs", RunConfig.epochs)
    exact_model = grid.exact_model or (
        model + "-v2" if model + "-v2" in MODELS else model
    )
    exact_datasets = grid.exact_datasets or (
        ["cifar100"] if "cifar100" in grid.datasets else list(grid.datasets[:1])
    )
    exact_lrs = grid.exact_lrs
    if callable(exact_lrs):
        exact_lrs = exact_lrs(exact_model)
    exact_lrs = [float(v) for v in (exact_lrs or grid.lrs)]
    exact_common = {
        **common,
        "model": exact_model,
        "epochs": grid.exact_epochs or epochs,
    }
    act, method = grid.exact_activation, grid.exact_method
    if grid.exact_control:
        exact_rows = [("relu", "none"), (act, "none"), ("relu", method), (act, method)]
    elif grid.exact_reference:
        exact_rows = [("relu", "none"), (act, method)]
    else:
        exact_rows = [(act, method)]
    configs = []
    for seed in grid.seeds:
        for ds in grid.datasets:
            for lr in grid.lrs:
                row = dict(common, dataset=ds, lr=lr, seed=seed)
                configs.append(RunConfig(**row))
                configs.append(RunConfig(**row, orthogonality=grid.penalty))
            if grid.exact and ds in exact_datasets:
                for lr in exact_lrs:
                    row = dict(exact_common, dataset=ds, lr=lr, seed=seed)
                    configs += [
                        RunConfig(**row, activation=a, orthogonality=o)
                        for a, o in exact_rows
                    ]
    return configs


# what the subset-scale study's runs share, under both protocols
_SUBSET = dict(
    datasets=["cifar10-subset"],
    seeds=range(3),
    model="small-cnn",
    epochs=10,
    bn_momentum=0.1,
)

#: The subset-scale study of the chapter "Experiments" (book/experiments.md): Table 2's
#: grid on the CIFAR-10 subset (4000 training, 1000 test images) with the smallCNN, 10
#: epochs, seeds 0-2, batch-norm momentum 0.1 (few steps per epoch), the exact row's
#: ReLU twin; per protocol, the folder under ``book/results/`` it is stored in.
SUBSET_STUDY = {
    "paper": ("experiments", dict(_SUBSET, exact_reference=True)),
    "authors": (
        "experiments/authors",
        # the subset's budget for the exact rows, not the Gram-Schmidt runs' 100 epochs
        dict(_SUBSET, exact_epochs=10, protocol="authors"),
    ),
}


def subset_study(
    protocol: str = "paper", penalty: bool | None = None
) -> list[RunConfig]:
    """The runs of the subset-scale study (:data:`SUBSET_STUDY`) under ``protocol``.

    ``penalty``: with the penalty rows (default: for the paper's protocol only). The
    authors' template penalty costs about 25 plain steps per step on a CPU (ten
    backward passes and a double backward), about two CPU-hours for its nine runs here;
    without it the authors' study is its baselines and the 2x2 control of the exact row.
    """
    if protocol not in SUBSET_STUDY:
        raise ValueError(f"protocol must be one of {', '.join(SUBSET_STUDY)}")
    configs = table2_configs(**SUBSET_STUDY[protocol][1])
    if penalty is None:
        penalty = protocol == "paper"
    return [c for c in configs if penalty or c.orthogonality not in PENALTIES]


def parse_shard(text: str | None, environ=None) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> (i, n); ``"slurm"`` reads ``SLURM_ARRAY_TASK_ID``
    (minus ``SLURM_ARRAY_TASK_MIN``) and ``SLURM_ARRAY_TASK_COUNT``; None -> (0, 1)."""
    env = os.environ if environ is None else environ
    if text is None:
        return 0, 1
    if text == "slurm":
        try:
            i = int(env["SLURM_ARRAY_TASK_ID"]) - int(
                env.get("SLURM_ARRAY_TASK_MIN", 0)
            )
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError) as e:
            raise ValueError(
                "--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT "
                f"({e})"
            ) from None
    else:
        try:
            a, b = text.split("/")
            i, n = int(a), int(b)
        except ValueError:
            raise ValueError(
                f"shard must look like i/n (e.g. 0/4) or be 'slurm', got {text!r}"
            ) from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard i/n needs 0 <= i < n, got {i}/{n}")
    return i, n


def shard(configs, index: int, count: int) -> list:
    """Shard ``index`` of ``count``: every ``count``-th config from ``index``. The
    shards are disjoint and together hold every config, and each gets a mix of datasets
    and settings."""
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"shard needs 0 <= index < count, got {index}/{count}")
    return list(configs)[index::count]


def record_failure(out_dir, config: RunConfig, error: BaseException) -> None:
    """Write ``RUN_ID.failed.json``: the run, the error and its traceback (replacing an
    earlier failure record of the same run)."""
    write_json_atomic(
        failed_path(out_dir, config),
        {
            "format": FAILED_FORMAT,
            "run_id": config.run_id(),
            "config": config.to_dict(),
            "error": f"{type(error).__name__}: {error}",
            "traceback": "".join(traceback.format_exception(error)),
            "host": socket.gethostname(),
            "time": now(),
        },
        overwrite=True,
    )


def packs(configs, status: dict, size) -> list[list[RunConfig]]:
    """``configs`` in units of training: runs of one structure that differ only in
    their seed, learning rate or penalty weight (:func:`smaso.experiment.runner.
    pack_key`), still to train from scratch (``status`` "todo", or "failed" when
    retried), grouped by up to ``size`` (an int, or a function of a config giving its
    structure's) in the order they come (:func:`smaso.experiment.run_packed`); every
    other run alone."""
    limit = size if callable(size) else (lambda c: size)
    units, open_ = [], {}
    for c in configs:
        if status[c.run_id()] not in ("todo", "retry") or not can_pack(c.model):
            units.append([c])
            continue
        key = pack_key(c)
        unit = open_.get(key)
        # (the size is asked for once a structure has a second run to pack)
        if unit is None or len(unit) >= limit(c):
            unit = open_[key] = []
            units.append(unit)
        unit.append(c)
    return units


def sweep(
    configs,
    out_dir,
    *,
    log: Callable[[str], None] | None = print,
    epoch_lines: bool = True,
    retry_failed: bool = False,
    **runtime,
) -> list[dict]:
    """Run ``configs`` into ``out_dir`` (:func:`run`); the results of the finished
    ones, in order.

    Finished runs are skipped and partial ones resumed; each dataset is loaded once.
    Runs of one structure that differ in their seed, learning rate or penalty weight
    train together as one packed network (:func:`smaso.experiment.run_packed`; the
    ``pack`` runtime option, by default all of them on CUDA and none on the CPU; see
    :func:`packs`); a pack that fails is retried
    run by run. A run claimed by another live process (another shard) is left to it. A
    run that raises (a divergence, out of memory, ...) gets a failure record
    (``RUN_ID.failed.json``, with the traceback) and the sweep goes on; failed runs are
    retried by a later sweep only with ``retry_failed``. ``runtime`` goes to
    :func:`run` (the fields of :class:`~smaso.experiment.runner.Runtime`). Prints
    progress: which run, how many are left, and an estimate of the time left from the
    epochs trained so far (``epoch_lines=False``: no per-epoch lines).
    """
    configs = list(configs)
    rt = Runtime(**runtime)
    dev = resolve_device(rt.device)
    status = {c.run_id(): run_status(out_dir, c) for c in configs}
    todo = [c for c in configs if status[c.run_id()] != "done"]
    state = _Sweep(out_dir, len(configs), sum(c.epochs for c in todo), log, rt)
    state.say(
        f"sweep: {len(configs)} runs, {len(configs) - len(todo)} finished already, "
        f"{len(todo)} to train"
    )
    if retry_failed:
        status = {k: "retry" if v == "failed" else v for k, v in status.items()}
    cap = (
        rt.pack if rt.pack is not None else (len(configs) if dev.type == "cuda" else 1)
    )
    runtime = dict(runtime, log=log if epoch_lines else None)
    k = 0
    for unit in packs(configs, status, 1 if cap == 1 else state.fit(cap, dev)):
        k += len(unit)
        state.unit(unit, k, status[unit[0].run_id()], dev, runtime)
    results = [state.done[c.run_id()] for c in configs if c.run_id() in state.done]
    state.say(
        f"sweep: done, {len(results)} runs finished, {len(state.failed)} failed, "
        f"{len(state.others)} left to other processes, "
        f"{(time.perf_counter() - state.t0) / 60:.1f} min"
    )
    return results


class _Sweep:
    """What a sweep keeps between its packs: the finished, failed and other processes'
    runs, the dataset in memory, and the epochs trained and left (for the estimate of
    the time left)."""

    def __init__(self, out_dir, n, epochs_left, log, rt):
        self.out_dir, self.n, self.epochs_left, self.rt = out_dir, n, epochs_left, rt
        self.say = log or (lambda s: None)
        self.done, self.failed, self.others, self.cache = {}, [], [], {}
        self.t0, self.trained = time.perf_counter(), 0

    def count(self, epoch, model, rec):
        k = len(rec) if isinstance(rec, list) else 1
        self.trained += k
        self.epochs_left -= k

    def unit(self, unit, k, st, dev, runtime):
        """Skip, report or train one pack (``unit``) whose first run's status is
        ``st``; a failed pack is retried run by run, a failed run recorded."""
        rid, n = unit[0].run_id(), self.n
        if st == "done":
            self.done[rid] = run(unit[0], self.out_dir, log=None)
            return
        if st == "failed":
            self.say(f"[{k}/{n}] {rid}: failed before (see its .failed.json)")
            self.failed.append(rid)
            self.epochs_left -= unit[0].epochs
            return
        try:
            self.train(unit, k, dev, runtime)
        except RunClaimedError as e:
            self.say(f"[{k}/{n}] {e}")
            self.others += [c.run_id() for c in unit]
        except Exception as e:  # one run's failure must not stop the shard
            if len(unit) == 1:
                record_failure(self.out_dir, unit[0], e)
                self.say(f"[{k}/{n}] {rid} FAILED: {type(e).__name__}: {e}")
                self.failed.append(rid)
                return
            self.say(f"[{k}/{n}] the pack failed ({type(e).__name__}: {e}); run by run")
            for c in unit:
                self.unit([c], k, "retry", dev, runtime)

    def data(self, c, dev):
        """The dataset of ``c`` on ``dev``, loaded once (one kept in memory)."""
        key = (*data_key(c), str(dev))
        if key not in self.cache:
            self.cache.clear()
            self.cache[key] = load_data(c, dev, self.rt)
        return self.cache[key]

    def fit(self, cap, dev):
        """The pack size of a config's structure: up to ``cap`` runs, as many as fit
        in 80 % of ``dev``'s free memory, from one run's step measured once per
        structure (:func:`smaso.pack.pack_size`)."""
        sizes = {}

        def size(c):
            key = pack_key(c)
            if key not in sizes:
                per = run_memory(c, self.data(c, dev), dev, self.rt.template_chunk)
                free = free_memory(dev)
                sizes[key] = pack_size(per, free, cap)
                self.say(
                    f"packs of up to {sizes[key]} runs for {c.run_id()}'s structure: "
                    f"one run's step holds {per / 2**20:.0f} MiB, "
                    f"{free / 2**30:.1f} GiB free (cap {cap})"
                )
            return sizes[key]

        return size

    def train(self, unit, k, dev, runtime):
        c = unit[0]
        data = self.data(c, dev)
        rate = (time.perf_counter() - self.t0) / self.trained if self.trained else None
        eta = f", about {rate * self.epochs_left / 60:.0f} min left" if rate else ""
        what = c.run_id() if len(unit) == 1 else f"{len(unit)} packed runs"
        self.say(f"[{k}/{self.n}] {what} ({self.epochs_left} epochs to go{eta})")
        before = self.epochs_left
        try:
            rs = run_packed(
                unit, self.out_dir, data=data, on_epoch=self.count, **runtime
            )
            self.done.update((r["run_id"], r) for r in rs)
        finally:  # a resumed or failed run trained fewer epochs than it counted for
            self.epochs_left = before - sum(c.epochs for c in unit)


def download(datasets, root=None, log: Callable[[str], None] | None = print) -> None:
    """Fetch the torchvision datasets among ``datasets`` into the data root once
    (:func:`smaso.data.download_dataset`), before the shards of a sweep start."""
    for name in dict.fromkeys(datasets):
        if DATASETS[name].files is None:
            continue
        files = download_dataset(name, root)
        if log:
            log(f"{name}: {len(files)} files in {files[0].parent}")


# --------------------------------------------------------------------------------------
# tables


class MixedRunsError(ValueError):
    """Runs that would be averaged in one cell come from different commits, precisions
    or torch versions."""


def setting_of(config: dict) -> str:
    """The row label of a config within its dataset: "baseline", "Ortho (penalty ...)",
    "exact ...", with the network (and the protocol, if not the paper's)."""
    act = "" if config["activation"] == "relu" else f" + {config['activation']}"
    o = config["orthogonality"]
    if o == "none":
        s = "baseline" if not act else f"no orthogonality{act}"
    elif o in PENALTIES:
        s = f"Ortho (penalty {o}, λ={config['lam']:g}){act}"
    else:
        s = f"exact orthogonal ({o}){act}"
    protocol = config.get("protocol", "paper")
    tag = "" if protocol == "paper" else f", {protocol}"
    return f"{s} [{config['model']}{tag}]"


def _check_provenance(label, lr, runs):
    """Which of :data:`PROVENANCE` differ among ``runs`` (one cell), as text."""
    out = []
    for key in PROVENANCE:
        values = [r.get(key) for r in runs]
        if len(set(map(str, values))) > 1:
            counts = {str(v): values.count(v) for v in dict.fromkeys(values)}
            out.append(
                f"{label} at lr {lr:g}: {key} differs ("
                + ", ".join(f"{v} x{n}" for v, n in counts.items())
                + ")"
            )
    return out


def table2(
    results,
    metric: str = "final_test_acc",
    ddof: int = 1,
    allow_mixed: bool = False,
) -> list[dict]:
    """Aggregate results into Table 2's layout: one row per dataset and setting (every
    config field but ``lr`` and ``seed``), one cell per learning rate with the mean and
    standard deviation over seeds of ``metric`` in percent (``ddof=1``: the sample
    standard deviation, 0 for a single seed; the authors' plot script uses ``ddof=0``),
    and the seed count.

    The runs of a cell must share their git commit, effective precision and torch
    version (:data:`PROVENANCE`); otherwise :class:`MixedRunsError` says which cells
    differ in what, unless ``allow_mixed``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    groups = {}
    for r in results:
        c = RunConfig.from_dict(r["config"]).to_dict()
        lr = c.pop("lr")
        c.pop("seed")
        key = json.dumps(c, sort_keys=True)
        groups.setdefault(key, {"config": c, "cells": {}})["cells"].setdefault(
            lr, []
        ).append(r)
    rows, mixed = [], []
    for g in groups.values():
        c = g["config"]
        label = f"{c['dataset']} {setting_of(c)}"
        cells = {}
        for lr, runs in sorted(g["cells"].items(), reverse=True):
            mixed += _check_provenance(label, lr, runs)
            v = [100 * r[metric] for r in runs]
            cells[lr] = {
                "mean": float(np.mean(v)),
                "std": float(np.std(v, ddof=ddof)) if len(v) > ddof else 0.0,
                "n": len(v),
                "values": v,
            }
        rows.append(
            {
                "dataset": c["dataset"],
                "setting": setting_of(c),
                "config": c,
                "cells": cells,
            }
        )
    if mixed and not allow_mixed:
        raise MixedRunsError(
            "refusing to average runs that differ in "
            + "/".join(PROVENANCE)
            + " (allow it with allow_mixed=True, CLI --allow-mixed):\n  "
            + "\n  ".join(mixed)
        )
    order = {
        name: list(reg) for name, reg in (("dataset", DATASETS), ("model", MODELS))
    }
    rows.sort(
        key=lambda r: (
            order["dataset"].index(r["dataset"]),
            order["model"].index(r["config"]["model"]),
            ORTHOGONALITY.index(r["config"]["orthogonality"]),
            r["setting"],
        )
    )
    return rows


def format_table(rows, lrs=None, fmt: str = "markdown") -> str:
    """Table 2's layout as text: a row per setting, a column per learning rate, cells
    "mean ± std (n)"."""
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be markdown or text, got {fmt!r}")
    if lrs is None:
        lrs = sorted({lr for r in rows for lr in r["cells"]}, reverse=True)
    head = ["Setting"] + [f"LR = {lr:g}" for lr in lrs]
    body = []
    for r in rows:
        cells = []
        for lr in lrs:
            c = r["cells"].get(lr)
            cells.append(f"{c['mean']:.1f} ± {c['std']:.1f} ({c['n']})" if c else "–")
        body.append([f"{r['dataset']} {r['setting']}", *cells])
    if fmt == "markdown":
        lines = [
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def fmt_row(x):
        return "  ".join(
            s.ljust(w) if i == 0 else s.rjust(w)
            for i, (s, w) in enumerate(zip(x, widths, strict=True))
        )

    return "\n".join([fmt_row(head)] + [fmt_row(b) for b in body])
