"""Training study of the chapter "Beyond the paper" (book/beyond.md): β-VQ and
Tsallis-VQ activations.

The paper's Section 6 conjectures that β-VQ versions of leaky-ReLU, the absolute value
and other convex piecewise-affine activations "could outperform" swish, and proposes
other entropy penalties. This script trains one small CNN (the same for every arm) with
each activation, on scikit-learn's digits and on the CIFAR-10 subset, for several seeds
with the same budget per arm, and writes one JSON file per run into book/results/beyond/
(atomically). A run whose file exists with the same configuration is skipped; a file
with a different configuration is never overwritten unless --force.

    .venv/bin/python experiments/beyond.py run   [--datasets digits cifar10] [--arms
    ...] [--seeds 0 1 2] .venv/bin/python experiments/beyond.py bench [--datasets digits
    cifar10]   # cost per training step .venv/bin/python experiments/beyond.py summary
    # table of the stored runs

Budget used for the committed results: see book/beyond.md (about half an hour on 2 CPU
cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from smaso.activations import (
    BetaVQAbs,
    BetaVQLeakyReLU,
    BetaVQMaxout,
    BetaVQReLU,
    TsallisVQReLU,
)
from smaso.data import cifar10_subset, digits
from smaso.train import fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "book" / "results" / "beyond"
SCHEMA = 1

#: Per dataset: the network widths and the training budget (identical for every arm).
DATASETS = {
    "digits": dict(
        widths=[16, 32, 64], epochs=20, lr=3e-3, batch_size=64, dtype="float64"
    ),
    "cifar10": dict(
        widths=[16, 32, 64], epochs=6, lr=3e-3, batch_size=64, dtype="float32"
    ),
}

#: Arm name -> (description, constructor taking the number of channels). Learnable β is per channel.
ARMS = {
    "relu": ("ReLU (hard VQ, beta = 1)", lambda c: nn.ReLU()),
    "silu": ("SiLU (soft VQ, beta fixed at 1/2)", lambda c: nn.SiLU()),
    "swish": (
        "swish = beta-VQ ReLU, learnable beta (init 1/2)",
        lambda c: BetaVQReLU(c),
    ),
    "bvq-leaky": (
        "beta-VQ leaky-ReLU (slope 0.1), learnable beta (init 1/2)",
        lambda c: BetaVQLeakyReLU(0.1, c),
    ),
    "bvq-abs": (
        "beta-VQ absolute value x tanh(eta x), learnable beta (init 1/2)",
        lambda c: BetaVQAbs(c),
    ),
    "bvq-maxout3": (
        "beta-VQ learned convex max-affine, R = 3 pieces per channel, learnable beta "
        "(init 1/2)",
        lambda c: BetaVQMaxout(c, pieces=3),
    ),
    "hardswish": (
        "hard-swish (Gini-VQ ReLU, beta fixed at 1/4)",
        lambda c: nn.Hardswish(),
    ),
    "gini-relu": (
        "Gini-VQ ReLU (alpha = 2), learnable beta (init 1/4: hard-swish)",
        lambda c: TsallisVQReLU(c, alpha=2.0, beta_init=0.25),
    ),
    "entmax15-relu": (
        "Tsallis-VQ ReLU (alpha = 1.5), learnable beta (init 1/2)",
        lambda c: TsallisVQReLU(c, alpha=1.5, beta_init=0.5),
    ),
}


def small_cnn(
    arm: str, in_channels: int, num_classes: int, widths=(16, 32, 64)
) -> nn.Sequential:
    """The study's network: 3 × (3x3 conv, activation), max-pooling after the first two, global average pooling, linear."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {sorted(ARMS)}")
    make = ARMS[arm][1]
    w1, w2, w3 = widths
    return nn.Sequential(
        nn.Conv2d(in_channels, w1, 3, padding=1),
        make(w1),
        nn.MaxPool2d(2),
        nn.Conv2d(w1, w2, 3, padding=1),
        make(w2),
        nn.MaxPool2d(2),
        nn.Conv2d(w2, w3, 3, padding=1),
        make(w3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(w3, num_classes),
    )


def beta_layers(model: nn.Module) -> list[nn.Module]:
    """The activation modules of ``model`` that have a learnable β (in order)."""
    return [m for m in model.modules() if hasattr(m, "rho") and m.rho.requires_grad]


def load_data(dataset: str):
    """The dataset as TensorData in the study's dtype."""
    dtype = getattr(torch, DATASETS[dataset]["dtype"])
    if dataset == "digits":
        return digits(dtype=dtype)
    if dataset == "cifar10":
        return cifar10_subset(dtype=dtype)
    raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")


def config_of(dataset: str, arm: str, seed: int) -> dict:
    """Everything that determines a run (a stored run with an equal config is the same run)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {sorted(ARMS)}")
    return {
        "schema": SCHEMA,
        "dataset": dataset,
        "arm": arm,
        "arm_description": ARMS[arm][0],
        "seed": seed,
        "model": "small_cnn",
        **DATASETS[dataset],
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
    model = small_cnn(
        arm, data.x_train.shape[1], data.num_classes, config["widths"]
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
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    return {"config": config, "result": result, "env": env}


def result_path(outdir: Path, dataset: str, arm: str, seed: int) -> Path:
    return Path(outdir) / f"{dataset}-{arm}-seed{seed}.json"


def write_atomic(path: Path, obj: dict) -> None:
    """Write JSON to ``path`` via a temporary file in the same folder and os.replace (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def existing_status(path: Path, config: dict) -> str:
    """'missing', 'same' (a stored run with this config) or 'different' (a stored file that is another run)."""
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
    """Every stored run in ``outdir`` (files named DATASET-ARM-seedN.json), sorted by name."""
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
    cfg = DATASETS[dataset]
    data = load_data(dataset)
    x, y = data.x_train[: cfg["batch_size"]], data.y_train[: cfg["batch_size"]]
    dtype = getattr(torch, cfg["dtype"])
    models = {}
    for arm in arms:
        torch.manual_seed(0)
        model = small_cnn(arm, x.shape[1], data.num_classes, cfg["widths"]).to(dtype)
        models[arm] = (model, torch.optim.Adam(model.parameters(), lr=cfg["lr"]))

    def step(model, opt):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for model, opt in models.values():  # warm-up
        for _ in range(3):
            step(model, opt)
    times = {arm: [] for arm in arms}
    for _ in range(rounds):
        for arm, (model, opt) in models.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step(model, opt)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run", "bench", "summary"])
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS)
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
            write_atomic(path, out)
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
        write_atomic(path, out)
        print(
            f"[{i}/{len(plan)}] {path.name}: test acc {out['result']['test_acc']:.4f} "
            f"in {out['result']['wall_s']:.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
