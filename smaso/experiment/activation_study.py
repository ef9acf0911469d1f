"""The activation study of chapter 7 ("Beyond the paper", book/beyond.md): β-VQ and
Tsallis-VQ activations trained side by side.

The paper's Section 6 conjectures that β-VQ versions of leaky-ReLU, the absolute value
and other convex piecewise-affine activations "could outperform" swish, and proposes
other entropy penalties. This study trains one small CNN
(:func:`smaso.models.study_cnn`, the same for every arm) with each activation of
:data:`ARMS` (entries of :data:`smaso.models.ACTIVATIONS`), on scikit-learn's digits and
on the CIFAR-10 subset, for several seeds with the same budget per arm, with
:func:`smaso.train.fit`. It writes
one JSON file per run into ``book/results/beyond/`` with the experiments' one atomic
writer (:func:`smaso.experiment.write_json_atomic`). A run whose file exists with the
same configuration is skipped; a file with a different configuration is never
overwritten unless ``--force``.

    python -m smaso activations run [--datasets digits cifar10] [--arms ...]
    python -m smaso activations bench [--datasets digits cifar10]  # cost per step
    python -m smaso activations summary                       # table of stored runs

Budget used for the committed results: see book/beyond.md (about half an hour on 2 CPU
cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..activations import BetaVQMaxout
from ..data import cifar10_subset, digits
from ..models import ACTIVATIONS, study_cnn
from ..records import book_results, provenance, write_json_atomic
from ..train import fit, train_epoch

__all__ = [
    "ARMS",
    "BUDGETS",
    "RESULTS",
    "bench",
    "beta_layers",
    "config_of",
    "existing_status",
    "load_data",
    "load_results",
    "main",
    "result_path",
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


def load_data(dataset: str):
    """The dataset as TensorData in the study's dtype."""
    dtype = getattr(torch, BUDGETS[dataset]["dtype"])
    if dataset == "digits":
        return digits(dtype=dtype)
    if dataset == "cifar10":
        return cifar10_subset(dtype=dtype)
    raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(BUDGETS)}")


def config_of(dataset: str, arm: str, seed: int) -> dict:
    """Everything that determines a run (a stored run with an equal config is the
    same run)."""
    if dataset not in BUDGETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(BUDGETS)}")
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {sorted(ARMS)}")
    return {
        "schema": SCHEMA,
        "dataset": dataset,
        "arm": arm,
        "arm_description": ARMS[arm][0],
        "seed": seed,
        "model": "small_cnn",
        **BUDGETS[dataset],
    }


def _round(values, nd=6):
    return [round(float(v), nd) for v in values]


def run_one(dataset: str, arm: str, seed: int, data=None, progress=False) -> dict:
    """Train one arm on one dataset with one seed; return {config, result, env} (what
    the JSON file holds).

    The seed sets the weight initialisation (torch.manual_seed) and the data order
    (fit's seed). The result holds the per-epoch history, the final test accuracy, the
    learned β per layer and channel after every epoch (epoch 0 = initial),
    BetaVQMaxout's learned pieces, and the wall time.
    """
    config = config_of(dataset, arm, seed)
    data = load_data(dataset) if data is None else data
    dtype = getattr(torch, config["dtype"])
    torch.manual_seed(seed)
    model = study_cnn(
        data.num_classes, data.x_train.shape[1], arm, config["widths"]
    ).to(dtype)
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
        epochs=config["epochs"],
        lr=config["lr"],
        batch_size=config["batch_size"],
        seed=seed,
        on_epoch=on_epoch,
        progress=False,
    )
    wall = time.perf_counter() - t0
    steps = config["epochs"] * -(-len(data.x_train) // config["batch_size"])
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
        "steps": steps,
    }
    return {"config": config, "result": result, "env": provenance()}


def result_path(outdir: Path, dataset: str, arm: str, seed: int) -> Path:
    return Path(outdir) / f"{dataset}-{arm}-seed{seed}.json"


def existing_status(path: Path, config: dict) -> str:
    """'missing', 'same' (a stored run with this config) or 'different' (a stored
    file that is another run)."""
    if not path.exists():
        return "missing"
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "different"
    return (
        "same" if stored.get("config") == config and "result" in stored else "different"
    )


def load_results(outdir: Path = RESULTS) -> list[dict]:
    """Every stored run in ``outdir`` (files named DATASET-ARM-seedN.json), sorted by
    name."""
    return [
        json.loads(p.read_text()) for p in sorted(Path(outdir).glob("*-seed*.json"))
    ]


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smaso activations", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["run", "bench", "summary"])
    parser.add_argument(
        "--datasets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS)
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite stored results whose configuration differs",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.command == "summary":
        for (dataset, arm), row in summarize(load_results(args.out)).items():
            betas = " ".join(f"{b:.2f}" for b in row["beta_final"])
            print(
                f"{dataset:8s} {arm:14s} n={row['n']} acc {row['mean']:.4f} ± "
                f"{row['std']:.4f}  beta {betas}"
            )
        return 0

    if args.command == "bench":
        for dataset in args.datasets:
            out = bench(dataset, args.arms)
            path = args.out / f"cost-{dataset}.json"
            if path.exists() and not args.force:
                print(f"{path} exists; pass --force to replace it", file=sys.stderr)
                return 1
            write_json_atomic(path, out, overwrite=True)
            print(json.dumps(out["ms_per_step"]), flush=True)
        return 0

    # run: refuse up front if any planned run would overwrite a different stored result
    plan = [(d, a, s) for d in args.datasets for s in args.seeds for a in args.arms]
    clashes = [
        result_path(args.out, *p)
        for p in plan
        if existing_status(result_path(args.out, *p), config_of(*p)) == "different"
    ]
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
    for i, (dataset, arm, seed) in enumerate(plan, 1):
        path = result_path(args.out, dataset, arm, seed)
        if existing_status(path, config_of(dataset, arm, seed)) == "same":
            print(f"[{i}/{len(plan)}] {path.name}: done already, skipped", flush=True)
            continue
        if dataset not in data_cache:
            data_cache[dataset] = load_data(dataset)
        print(f"[{i}/{len(plan)}] {dataset} {arm} seed {seed} ...", flush=True)
        out = run_one(
            dataset, arm, seed, data_cache[dataset], progress=dataset != "digits"
        )
        write_json_atomic(path, out, overwrite=True)
        print(
            f"[{i}/{len(plan)}] {path.name}: test acc {out['result']['test_acc']:.4f} "
            f"in {out['result']['wall_s']:.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
