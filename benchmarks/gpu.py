"""The one GPU check of the Table 2 pipeline (Section 5): everything that needs a GPU,
in one command, within 8 minutes on one H100, with one JSON of results.

    .venv/bin/python benchmarks/gpu.py                  # on a machine with CUDA
    .venv/bin/python benchmarks/gpu.py --device cpu --quick   # the smoke test, seconds

1. The CUDA tests (``pytest -m cuda``; skipped without CUDA, and by ``--no-tests``).
2. The time of one training step of every kind of run in the Table 2 grids of both
   protocols (``smaso.experiment.table2_configs``: baseline, the filter penalty, the
   authors' template penalty with 10 and 100 classes, the exact rows and their
   controls), in float32 and under bf16 autocast, alone and packed ``--pack`` runs
   together (smaso.pack), plus the paper's literal Gram-Schmidt loop; on CIFAR-shaped
   tensors already on the device. The step is the pipeline's own
   (``smaso.train.train_epoch`` with the runner's model, loss and optimiser).
3. A few epochs of the exact + swish run (and its ReLU twin) through the pipeline
   (``smaso.experiment.run``) on the CIFAR-10 subset (``../shared/data``, or
   ``--subset``) when it is there; nothing is downloaded.
4. From the measured steps, the projected hours of each full grid (step time x steps
   per epoch x epochs, summed over the runs), with the runs alone and packed.

Writes ``benchmarks/results/gpu.json`` (``--out``; the previous file kept as .bak).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import metadata, write_results
from smaso.data import DATASETS, find_cifar10_subset
from smaso.experiment import (
    RunConfig,
    build_loss,
    build_optimizer,
    build_training_model,
    run,
    table2_configs,
)
from smaso.experiment.runner import effective_precision
from smaso.train import train_epoch

ROOT = Path(__file__).resolve().parents[1]

#: Training images per dataset (torchvision's training splits).
TRAIN_IMAGES = {"svhn": 73257, "cifar10": 50000, "cifar100": 50000}

#: The fields of a config that decide what one training step computes.
STEP_FIELDS = (
    "dataset",
    "model",
    "activation",
    "orthogonality",
    "lam",
    "batch_size",
    "bn_momentum",
    "conv_bias",
    "bn_last",
    "apodize",
    "orthogonal_dense",
    "optimizer",
    "dtype",
)


def step_kind(config: RunConfig) -> tuple:
    return tuple(getattr(config, f) for f in STEP_FIELDS)


def grids(quick: bool) -> dict[str, list[RunConfig]]:
    """The Table 2 grid of each protocol (quick: the smallCNN, one seed, one rate)."""
    if quick:
        opts = dict(model="small-cnn", seeds=(0, 1), lrs=(1e-3,), datasets=("cifar10",))
        return {p: table2_configs(protocol=p, **opts) for p in ("paper", "authors")}
    return {p: table2_configs(protocol=p) for p in ("paper", "authors")}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(configs, device, precision, steps, warmup, images) -> float:
    """Seconds per optimiser step of ``configs`` (one run, or several packed) on
    random CIFAR-shaped data on ``device``: the median over ``steps`` timed steps."""
    c = configs[0]
    classes = DATASETS[c.dataset].num_classes
    cfg = dataclasses.replace(c, precision=precision)
    prec = effective_precision(cfg, device)
    autocast = torch.bfloat16 if prec == "bf16-autocast" else None
    model = build_training_model(configs, 3, classes).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, classes, (images,), generator=g).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    shape = (c.batch_size,) if len(configs) == 1 else (len(configs), c.batch_size)
    idx = torch.randint(0, images, shape, generator=g).to(device)
    extra = build_loss(c)
    opt, sched = build_optimizer(c, model)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        train_epoch(model, opt, x, y, [idx], extra, autocast, None, sched)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_steps(grid_configs, device, pack, steps, warmup, images, log):
    """Step time of every kind of run of the grids: fp32 and bf16, alone and packed."""
    kinds = {}
    for configs in grid_configs.values():
        for c in configs:
            kinds.setdefault(step_kind(c), c)
    # the paper's literal Gram-Schmidt loop, on the exact row's network if there is one
    exact = [c for c in kinds.values() if c.orthogonality in ("qr", "gs-unnormalised")]
    base = exact[0] if exact else next(iter(kinds.values()))
    gs = dataclasses.replace(base, orthogonality="gs")
    kinds[step_kind(gs)] = gs
    out = {}
    precisions = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
    for kind, c in kinds.items():
        row = {"config": {f: getattr(c, f) for f in STEP_FIELDS}}
        for prec in precisions:
            alone = time_step([c], device, prec, steps, warmup, images)
            row[f"{prec}_s"] = alone
            if pack > 1:
                configs = [dataclasses.replace(c, seed=s) for s in range(pack)]
                packed = time_step(configs, device, prec, steps, warmup, images)
                row[f"{prec}_packed{pack}_s"] = packed
                row[f"{prec}_packed_per_run_s"] = packed / pack
        out["|".join(map(str, kind))] = row
        log(
            f"{c.model:18s} {c.activation:15s} {c.orthogonality:16s} "
            f"{DATASETS[c.dataset].num_classes:3d} classes: "
            + ", ".join(
                f"{k} {v * 1e3:.1f} ms" for k, v in row.items() if k != "config"
            )
        )
    return out


def project(grid_configs, steps_measured, prec, pack, images=None) -> dict:
    """Projected hours of each grid from the measured step times: per run, epochs x
    (training images // batch) steps x its kind's step time (``pack``: per run in a
    pack)."""
    out = {}
    for name, configs in grid_configs.items():
        hours = {"alone": 0.0, "packed": 0.0}
        steps_total = 0
        for c in configs:
            row = steps_measured["|".join(map(str, step_kind(c)))]
            n = images if images is not None else TRAIN_IMAGES[c.dataset]
            steps = c.epochs * (n // c.batch_size)
            steps_total += steps
            hours["alone"] += steps * row[f"{prec}_s"] / 3600
            key = f"{prec}_packed_per_run_s"
            hours["packed"] += steps * row.get(key, row[f"{prec}_s"]) / 3600
        out[name] = {"runs": len(configs), "steps": steps_total, **hours}
    return out


def cuda_tests(log) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
         "tests"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr[-300:]]
    log(f"CUDA tests: {tail[0]}")
    return {
        "returncode": proc.returncode,
        "summary": tail[0],
        "s": time.perf_counter() - t0,
    }


def pipeline_epochs(device, epochs, subset, quick, log) -> dict:
    """A few epochs of the exact + swish run and its ReLU twin through the pipeline, on
    the CIFAR-10 subset."""
    grid = table2_configs(
        datasets=("cifar10-subset",),
        seeds=(0,),
        lrs=(1e-3,),
        exact_datasets=("cifar10-subset",),
        exact_epochs=epochs,
        exact_reference=True,
        **({"model": "small-cnn"} if quick else {}),
        **({"limit_train": 200, "limit_test": 100} if quick else {}),
    )
    exact = [c for c in grid if c.model.endswith("-v2")]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in exact:
            r = run(
                c,
                tmp,
                log=None,
                device=str(device),
                subset_path=subset,
                save_model=False,
            )
            out[c.run_id()] = {
                "activation": c.activation,
                "orthogonality": c.orthogonality,
                "test_acc": [h["test_acc"] for h in r["history"]],
                "orthogonality_error": [
                    h.get("orthogonality_error") for h in r["history"]
                ],
                "epoch_s": [h["epoch_s"] for h in r["history"]],
                "precision": r["precision"],
            }
            log(
                f"{c.activation:6s} {c.orthogonality:5s}: test acc per epoch "
                + " ".join(f"{a:.3f}" for a in out[c.run_id()]["test_acc"])
            )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="a smoke test: seconds")
    p.add_argument("--pack", type=int, default=5, help="runs per packed network")
    p.add_argument("--steps", type=int, default=None, help="timed steps per kind")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the exact run")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA tests")
    p.add_argument("--subset", default=None, help="cifar10-subset.npz")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu.json"))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; use --device cpu --quick for the smoke test")
    log = print
    t_start = time.perf_counter()
    result = {**metadata(), "device": str(device), "quick": a.quick}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        result["device_name"] = torch.cuda.get_device_name(device)
    if device.type == "cuda" and not a.no_tests:
        result["cuda_tests"] = cuda_tests(log)
    configs = grids(a.quick)
    steps = a.steps or (1 if a.quick else 10)
    images = 64 if a.quick else 5000
    pack = 2 if a.quick else a.pack
    result["steps"] = measure_steps(configs, device, pack, steps, 1, images, log)
    prec = "bf16" if device.type == "cuda" else "fp32"
    result["projection"] = {
        "precision": prec,
        "pack": pack,
        "hours": project(configs, result["steps"], prec, pack),
    }
    for name, h in result["projection"]["hours"].items():
        log(
            f"projected {name} grid: {h['runs']} runs, {h['steps'] / 1e6:.1f} M steps: "
            f"{h['alone']:.2f} h alone, {h['packed']:.2f} h packed by {pack} ({prec})"
        )
    try:
        subset = str(find_cifar10_subset(a.subset))
    except FileNotFoundError as e:
        log(f"no CIFAR-10 subset ({e}); the pipeline epochs are skipped")
        subset = None
    if subset is not None:
        epochs = a.epochs or (1 if a.quick else 5)
        result["pipeline"] = pipeline_epochs(device, epochs, subset, a.quick, log)
    result["wall_s"] = time.perf_counter() - t_start
    write_results(a.out, result)
    log(f"gpu check: {result['wall_s']:.0f} s, results in {a.out}")
    return result


if __name__ == "__main__":
    main()
