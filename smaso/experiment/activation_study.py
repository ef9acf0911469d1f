"""The activation study of chapter 7 ("Beyond the paper", book/beyond.md): β-VQ and
Tsallis-VQ activations trained side by side.

The paper's Section 6 conjectures that β-VQ versions of leaky-ReLU, the absolute value
and other convex piecewise-affine activations "could outperform" swish, and proposes
other entropy penalties. This study trains one small CNN
(:func:`smaso.models.study_cnn`, the same for every arm) with each activation of
:data:`ARMS` (entries of :data:`smaso.models.ACTIVATIONS`), on scikit-learn's digits and
on the CIFAR-10 subset, for several seeds with the same budget per arm, with
:func:`smaso.train.fit`. A run is an :class:`ActivationRun`; the study is a
:class:`smaso.experiment.frame.Study` over it (:data:`STUDY`), one JSON file per run
in ``book/results/beyond/``. A run whose file exists with the same configuration is
skipped; a file with a different configuration is never overwritten unless
``--force``. The command line is derived from :class:`ActivationRun`:

    python -m smaso activations run [--datasets digits,cifar10] [--arms ...] [--seeds 3]
    python -m smaso activations bench [--datasets digits,cifar10]  # cost per step
    python -m smaso activations summary                       # table of stored runs

Budget used for the committed results: see book/beyond.md (about half an hour on 2 CPU
cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..activations import BetaVQMaxout
from ..checks import choice, nonneg_int, positive_int
from ..data import cifar10_subset, load
from ..models import ACTIVATIONS, study_cnn
from ..records import book_results, provenance, write_json_atomic
from ..train import fit, train_epoch
from .frame import Study, add_options, config_to_dict, grid, option

__all__ = [
    "ARMS",
    "BUDGETS",
    "RESULTS",
    "SOURCES",
    "STUDY",
    "ActivationRun",
    "bench",
    "beta_layers",
    "load_data",
    "main",
    "parser",
    "run_one",
    "summarize",
]

RESULTS = book_results("beyond")
SCHEMA = 1

#: Per dataset of the study: the network widths and the training budget (identical for
#: every arm). What each dataset is, is :data:`smaso.data.DATASETS`.
BUDGETS = {
    "digits": dict(
        widths=[16, 32, 64], epochs=20, lr=3e-3, batch_size=64, dtype="float64"
    ),
    "cifar10": dict(
        widths=[16, 32, 64], epochs=6, lr=3e-3, batch_size=64, dtype="float32"
    ),
}

#: The study's arms: activation name -> (description, factory of the channel count).
ARMS = {
    name: ACTIVATIONS[name]
    for name in (
        "relu",
        "silu",
        "swish",
        "bvq-leaky",
        "bvq-abs",
        "bvq-maxout3",
        "hardswish",
        "gini-relu",
        "entmax15-relu",
    )
}


def beta_layers(model: nn.Module) -> list[nn.Module]:
    """The activation modules of ``model`` that have a learnable β (in order)."""
    return [m for m in model.modules() if hasattr(m, "rho") and m.rho.requires_grad]


#: The study's dataset names -> their entries of :data:`smaso.data.DATASETS` (the
#: study's "cifar10" is the CIFAR-10 subset).
SOURCES = {"digits": "digits", "cifar10": "cifar10-subset"}


def load_data(dataset: str):
    """The dataset (:data:`SOURCES`) as TensorData in the study's dtype: the digits in
    [0, 1]; the subset standardised per channel in that dtype (as the stored runs were
    trained; :func:`smaso.data.load` standardises in float64)."""
    choice("dataset", dataset, SOURCES)
    dtype = getattr(torch, BUDGETS[dataset]["dtype"])
    if SOURCES[dataset] == "cifar10-subset":
        return cifar10_subset(dtype=dtype)
    return load(SOURCES[dataset], preprocess="none", dtype=dtype)


def _budget(field_name):
    return option(None, f"{field_name} (same for every arm)", filled="the dataset's")


@dataclass(frozen=True)
class ActivationRun:
    """Everything that determines one run of the study (Section 6's conjecture): a
    stored run with an equal config is the same run. Bad values raise ``ValueError``
    naming the field.

    Args:
        dataset: "digits" or "cifar10" (the CIFAR-10 subset; :data:`SOURCES`).
        arm: the activation of every layer, a key of :data:`ARMS`.
        seed: the seed of the initial weights and of the batch order.
        widths, epochs, lr, batch_size, dtype: the budget, the same for every arm;
            None: the dataset's (:data:`BUDGETS`).
        model, arm_description, schema: set by the study (recorded in the file).

    Example:
        >>> from smaso.experiment.activation_study import ActivationRun
        >>> ActivationRun("digits", "bvq-abs", seed=2).epochs
        20
    """

    dataset: str = option("digits", "dataset", tuple(BUDGETS), row=True)
    arm: str = option("relu", "activation of every layer", tuple(ARMS), row=True)
    seed: int = option(0, "seed of the weights and of the batch order", row=True)
    widths: tuple | None = option(
        None, "channels of the three convolutions", kind="ints", filled="the dataset's"
    )
    epochs: int | None = _budget("epochs")
    lr: float | None = _budget("Adam learning rate")
    batch_size: int | None = _budget("batch size")
    dtype: str | None = option(
        None, "weights and images", ("float32", "float64"), filled="the dataset's"
    )
    model: str = "small_cnn"
    arm_description: str | None = None
    schema: int = SCHEMA

    def __post_init__(self):
        choice("dataset", self.dataset, BUDGETS)
        choice("arm", self.arm, ARMS)
        nonneg_int("seed", self.seed)
        for name, value in BUDGETS[self.dataset].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "arm_description", ARMS[self.arm][0])
        for name in ("epochs", "batch_size"):
            positive_int(name, getattr(self, name))

    def run_id(self) -> str:
        return f"{self.dataset}-{self.arm}-seed{self.seed}"


#: The study's stored runs: ``RESULTS/DATASET-ARM-seedN.json``.
STUDY = Study(ActivationRun, RESULTS, pattern="*-seed*.json")


def _round(values, nd=6):
    return [round(float(v), nd) for v in values]


def run_one(config: ActivationRun, data=None, progress=False) -> dict:
    """Train one arm on one dataset with one seed (``config``); return {config,
    result, env} (what the JSON file holds).

    The seed sets the weight initialisation (torch.manual_seed) and the data order
    (fit's seed). The result holds the per-epoch history, the final test accuracy, the
    learned β per layer and channel after every epoch (epoch 0 = initial),
    BetaVQMaxout's learned pieces, and the wall time.
    """
    c = config
    data = load_data(c.dataset) if data is None else data
    torch.manual_seed(c.seed)
    model = study_cnn(data.num_classes, data.x_train.shape[1], c.arm, list(c.widths))
    model = model.to(getattr(torch, c.dtype))
    layers = beta_layers(model)
    betas = [[_round(m.beta.detach()) for m in layers]]

    def on_epoch(epoch, m):
        betas.append([_round(layer.beta.detach()) for layer in layers])
        if progress:
            print(f"    epoch {epoch}", flush=True)
        return {}

    t0 = time.perf_counter()
    history = fit(
        model,
        data,
        epochs=c.epochs,
        lr=c.lr,
        batch_size=c.batch_size,
        seed=c.seed,
        on_epoch=on_epoch,
        progress=False,
    )
    wall = time.perf_counter() - t0
    pieces = [
        {
            "slopes": [_round(r) for r in m.slopes.detach()],
            "offsets": [_round(r) for r in m.offsets.detach()],
        }
        for m in model.modules()
        if isinstance(m, BetaVQMaxout)
    ]
    result = {
        "history": [{k: round(float(v), 6) for k, v in h.items()} for h in history],
        "test_acc": history[-1]["test_acc"],
        "beta_per_epoch": betas,
        "maxout_pieces": pieces,
        "wall_s": round(wall, 2),
        "steps": c.epochs * -(-len(data.x_train) // c.batch_size),
    }
    return {"config": config_to_dict(c), "result": result, "env": provenance()}


def summarize(results: list[dict]) -> dict:
    """{(dataset, arm): {n, mean, std, accs, beta_final (mean per layer over seeds),
    wall_s}} of the stored runs.

    ``std`` is the sample standard deviation over seeds (0 for a single run).
    """
    groups: dict = {}
    for r in results:
        c = r["config"]
        groups.setdefault((c["dataset"], c["arm"]), []).append(r)
    table = {}
    for key, runs in sorted(groups.items()):
        accs = [
            r["result"]["test_acc"]
            for r in sorted(runs, key=lambda r: r["config"]["seed"])
        ]
        final = [r["result"]["beta_per_epoch"][-1] for r in runs]
        beta_final = [
            statistics.fmean(statistics.fmean(f[layer]) for f in final)
            for layer in range(len(final[0]))
        ]
        table[key] = {
            "n": len(accs),
            "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accs": accs,
            "beta_final": beta_final,
            "wall_s": statistics.fmean(r["result"]["wall_s"] for r in runs),
        }
    return table


def bench(dataset: str, arms, rounds: int = 7, steps: int = 5) -> dict:
    """Cost per training step (forward, backward, Adam) of each arm's network,
    interleaved over arms.

    Each round times ``steps`` steps of every arm on the same batch; the result is the
    median over rounds, in ms, and the ratio to ReLU measured in the same process.
    """
    cfg = BUDGETS[dataset]
    data = load_data(dataset)
    x, y = data.x_train[: cfg["batch_size"]], data.y_train[: cfg["batch_size"]]
    dtype = getattr(torch, cfg["dtype"])
    models = {}
    for arm in arms:
        torch.manual_seed(0)
        model = study_cnn(data.num_classes, x.shape[1], arm, cfg["widths"]).to(dtype)
        models[arm] = (model, torch.optim.Adam(model.parameters(), lr=cfg["lr"]))

    batch = torch.arange(len(y))
    for model, opt in models.values():  # warm-up
        train_epoch(model, opt, x, y, [batch] * 3)
    times = {arm: [] for arm in arms}
    for _ in range(rounds):
        for arm, (model, opt) in models.items():
            t0 = time.perf_counter()
            train_epoch(model, opt, x, y, [batch] * steps)  # steps on the same batch
            times[arm].append((time.perf_counter() - t0) / steps * 1e3)
    ms = {arm: statistics.median(t) for arm, t in times.items()}
    ref = ms.get("relu")
    return {
        "dataset": dataset,
        "batch_size": cfg["batch_size"],
        "dtype": cfg["dtype"],
        "widths": cfg["widths"],
        "rounds": rounds,
        "steps_per_round": steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ms_per_step": {a: round(v, 3) for a, v in ms.items()},
        "ratio_to_relu": {a: round(v / ref, 3) for a, v in ms.items()} if ref else None,
    }


def parser() -> argparse.ArgumentParser:
    """The study's command line, derived from :class:`ActivationRun`."""
    p = argparse.ArgumentParser(
        prog="python -m smaso activations", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("command", choices=["run", "bench", "summary"])
    add_options(p, dataclasses.fields(ActivationRun), rows=True)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite stored results whose configuration differs",
    )
    return p


def _summary(out) -> int:
    for (dataset, arm), row in summarize(STUDY.load(out)).items():
        betas = " ".join(f"{b:.2f}" for b in row["beta_final"])
        print(
            f"{dataset:8s} {arm:14s} n={row['n']} acc {row['mean']:.4f} ± "
            f"{row['std']:.4f}  beta {betas}"
        )
    return 0


def _bench(args) -> int:
    for dataset in getattr(args, "datasets", BUDGETS):
        out = bench(dataset, getattr(args, "arms", ARMS))
        path = args.out / f"cost-{dataset}.json"
        if path.exists() and not args.force:
            print(f"{path} exists; pass --force to replace it", file=sys.stderr)
            return 1
        write_json_atomic(path, out, overwrite=True)
        print(json.dumps(out["ms_per_step"]), flush=True)
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "summary":
        return _summary(args.out)
    if args.command == "bench":
        return _bench(args)
    plan = grid(ActivationRun, args, dict(seed=(0, 1, 2)))  # datasets, arms: all
    clashes = STUDY.clashes(plan, args.out)
    if clashes and not args.force:
        print(
            "refusing to overwrite stored results with a different configuration "
            "(pass --force):",
            file=sys.stderr,
        )
        for c in clashes:
            print(f"  {c}", file=sys.stderr)
        return 1
    data_cache = {}
    for i, config in enumerate(plan, 1):
        path = STUDY.path(config, args.out)
        if STUDY.status(config, args.out) == "same":
            print(f"[{i}/{len(plan)}] {path.name}: done already, skipped", flush=True)
            continue
        if config.dataset not in data_cache:
            data_cache[config.dataset] = load_data(config.dataset)
        print(f"[{i}/{len(plan)}] {config.run_id()} ...", flush=True)
        out = run_one(config, data_cache[config.dataset], config.dataset != "digits")
        STUDY.save(config, out, args.out, force=True)
        print(
            f"[{i}/{len(plan)}] {path.name}: test acc {out['result']['test_acc']:.4f} "
            f"in {out['result']['wall_s']:.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
