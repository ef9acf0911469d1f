"""The one GPU check of the Table 2 pipeline (Section 5): everything that needs a GPU,
in one command that always finishes (about 7 minutes on one H100/H200), with one JSON
of results rewritten after every item.

    python benchmarks/gpu.py                              # on a machine with CUDA
    python benchmarks/gpu.py --device cpu --quick         # the smoke test, seconds

Every item is isolated: an error or an out-of-memory is recorded with its message, the
memory is freed, and the check goes on; the JSON (``--out``) is rewritten after each
item, with the peak GPU memory of each. ``--budget SECONDS`` stops measuring when it is
spent (the default fits 6 minutes), then projects from what was measured.

1. The CUDA tests: ``pytest -o addopts="" -m cuda`` on the test files that hold them
   (a GPU machine may have pytest but not nbval, jupytext or Playwright).
2. The β-VQ activations against their PyTorch peers, CUDA events
   (``benchmarks/activations.py --cuda``), when that benchmark is there.
3. The time of one training step (``smaso.train.TrainStep``, the pipeline's own) of
   every kind of run in the Table 2 grids of both protocols
   (``smaso.experiment.table2_configs``), under bf16 autocast (and float32), captured
   in a CUDA graph and eager, alone and packed ``--pack`` runs together
   (:mod:`smaso.pack`), on CIFAR-shaped tensors on the device; the exact + swish step
   against the baseline step.
4. Packing against its peer: the baseline step captured with ``--max-pack`` runs
   packed across Table 2's learning rates and seeds (each run its own rate,
   :func:`smaso.pack.scale_steps`), and ``--pack`` processes sharing the GPU, each
   training its own run; and per kind, one run's step memory and the pack size a
   sweep would take from it (``smaso.experiment.runner.run_memory``).
5. A few epochs of the exact + swish run and its ReLU twin through the pipeline
   (``smaso.experiment.run``) on the CIFAR-10 subset (``--subset``), when it is there.
6. The projected hours of each grid (step time x steps per epoch x epochs, summed over
   the runs), alone and packed, from the faster of graph and eager per kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import metadata, write_results
from smaso.data import DATASETS, TensorData, find_cifar10_subset
from smaso.experiment import (
    TABLE2_LRS,
    RunConfig,
    build_loss,
    build_optimizer,
    build_training_model,
    run,
    table2_configs,
)
from smaso.experiment.runner import autocast_dtype, effective_precision, run_memory
from smaso.pack import free_memory, pack_size
from smaso.train import GRAPH_WARMUP, TrainStep

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


def kind_key(config: RunConfig) -> str:
    return "|".join(map(str, step_kind(config)))


def grids(quick: bool) -> dict[str, list[RunConfig]]:
    """The Table 2 grid of each protocol (quick: the smallCNN, one seed, one rate)."""
    if quick:
        opts = dict(model="small-cnn", seeds=(0, 1), lrs=(1e-3,), datasets=("cifar10",))
        return {p: table2_configs(protocol=p, **opts) for p in ("paper", "authors")}
    return {p: table2_configs(protocol=p) for p in ("paper", "authors")}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Check:
    """The items of the check: each isolated, the JSON rewritten after each, a time
    budget for the measurements."""

    def __init__(self, out, result, device, budget, fail=(), log=print):
        self.out, self.result, self.device = Path(out), result, device
        self.budget, self.fail, self.log = budget, set(fail), log
        self.t0 = time.perf_counter()
        self.first_write = True
        result.setdefault("items", {})
        self.write()  # before any item: a bad --out fails at once, a crash leaves JSON

    def spent(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget

    def write(self):
        self.result["wall_s"] = time.perf_counter() - self.t0
        write_results(self.out, self.result, keep_previous=self.first_write, quiet=True)
        self.first_write = False

    def item(self, name, fn, *args, timed=True):
        """Run ``fn(*args)``; its value (or its error) recorded under ``name``."""
        if timed and self.spent():
            self.result["items"][name] = {"status": "skipped: budget spent"}
            self.result["budget_spent"] = True
            return None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        rec = {}
        value = None
        try:
            if name in self.fail:
                raise RuntimeError(f"forced failure of {name} (--fail)")
            value = fn(*args)
            rec["status"] = "ok"
        except Exception as e:  # OOM included: recorded, the check goes on
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            rec["traceback"] = traceback.format_exc()[-2000:]
            self.log(f"{name}: {rec['error'][:200]}")
        rec["s"] = time.perf_counter() - t0
        if self.device.type == "cuda":
            rec["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        _free(self.device)
        self.result["items"][name] = rec
        self.write()
        return value


def _step_setup(configs, device, precision, images, graph, chunk=None):
    c = configs[0]
    classes = DATASETS[c.dataset].num_classes
    cfg = dataclasses.replace(c, precision=precision)
    prec = effective_precision(cfg, device)
    autocast = autocast_dtype(prec)
    model = build_training_model(configs, 3, classes).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, classes, (images,), generator=g).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    shape = (c.batch_size,) if len(configs) == 1 else (len(configs), c.batch_size)
    idx = torch.randint(0, images, shape, generator=g).to(device)
    opt, sched = build_optimizer(configs, model, capturable=graph)
    extra = build_loss(configs, chunk, next(model.parameters()))
    mode = "on" if graph else "off"
    step = TrainStep(model, opt, x, y, extra, autocast, sched, mode)
    return step, idx


def time_step(configs, device, precision, steps, images, graph=False, chunk=None):
    """Seconds per optimiser step of ``configs`` (one run, or several packed) on
    random CIFAR-shaped data on ``device``, the step captured in a CUDA graph
    (``graph``) or eager: ``steps`` steps timed together after the warm-up. ``chunk``:
    classes per pass of the template penalty (the ``template_chunk`` option)."""
    step, idx = _step_setup(configs, device, precision, images, graph, chunk)
    step.reset()
    for _ in range(GRAPH_WARMUP + 2):
        step(idx)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(idx)
    _sync(device)
    out = {"s": (time.perf_counter() - t0) / steps}
    if graph:
        out["captured"] = step.graph is not None
        out["graph_error"] = step.graph_error
        out["optimizer_in_graph"] = step.optimizer_in_graph
    return out


def step_kinds(grid_configs) -> dict[str, RunConfig]:
    """One config of every kind of step in the grids, plus the paper's literal
    Gram-Schmidt loop on the exact row's network."""
    kinds = {}
    for configs in grid_configs.values():
        for c in configs:
            kinds.setdefault(kind_key(c), c)
    exact = [c for c in kinds.values() if c.orthogonality in ("qr", "gs-unnormalised")]
    base = exact[0] if exact else next(iter(kinds.values()))
    gs = dataclasses.replace(base, orthogonality="gs")
    kinds[kind_key(gs)] = gs
    return kinds


def measure_kind(c, device, pack, steps, images, precisions, log) -> dict:
    """One kind's step, per precision: eager and (CUDA) captured, alone and packed."""
    row = {"config": {f: getattr(c, f) for f in STEP_FIELDS}}
    modes = (False, True) if device.type == "cuda" else (False,)
    for prec in precisions:
        for graph in modes:
            tag = f"{prec}_{'graph' if graph else 'eager'}"
            row[tag] = time_step([c], device, prec, steps, images, graph)
            if pack > 1:
                configs = [dataclasses.replace(c, seed=s) for s in range(pack)]
                t = time_step(configs, device, prec, steps, images, graph)
                t["per_run_s"] = t["s"] / pack
                row[f"{tag}_packed{pack}"] = t
    log(
        f"{c.model:18s} {c.activation:15s} {c.orthogonality:16s} "
        f"{DATASETS[c.dataset].num_classes:3d} classes: "
        + ", ".join(
            f"{k} {v['s'] * 1e3:.2f} ms" for k, v in row.items() if k != "config"
        )
    )
    return row


def template_chunked(c, device, pack, steps, images, prec, chunk) -> dict:
    """The template-penalty step of ``c`` with ``chunk`` classes per pass, alone and
    packed by ``pack``, each with its peak device memory: what the chunk saves in
    memory, against what it costs in time (the unchunked step is ``c``'s kind)."""
    row = {"chunk": chunk}
    graph = device.type == "cuda"
    for k in (1, pack):
        configs = [dataclasses.replace(c, seed=s) for s in range(k)]
        if graph:
            torch.cuda.reset_peak_memory_stats(device)
        t = time_step(configs, device, prec, steps, images, graph, chunk)
        t["per_run_s"] = t["s"] / k
        if graph:
            t["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["alone" if k == 1 else f"packed{k}"] = t
        _free(device)
    return row


def across_rates(c, k: int) -> list[RunConfig]:
    """The runs of ``c``'s structure in Table 2's grid, up to ``k``: every rate of
    :data:`TABLE2_LRS` for seeds 0, 1, ... (the pack a sweep trains on CUDA)."""
    runs = [
        dataclasses.replace(c, lr=lr, seed=s)
        for s in range(-(-k // len(TABLE2_LRS)))
        for lr in TABLE2_LRS
    ]
    return runs[:k]


def pack_memory(kinds, device, images, cap, log) -> dict:
    """Per kind: the memory of one run's step (:func:`smaso.experiment.runner.
    run_memory`, on CIFAR-shaped data) and the pack size a sweep would choose from it
    (:func:`smaso.pack.pack_size`, up to ``cap``)."""
    out = {}
    for key, c in kinds.items():
        classes = DATASETS[c.dataset].num_classes
        g = torch.Generator().manual_seed(0)
        x = torch.randn(images, 3, 32, 32, generator=g)
        y = (
            torch.arange(images) % classes
        )  # (enough of each class for balanced batches)
        data = TensorData(x, y, x[:10], y[:10], classes)
        per = run_memory(c, data, device)
        free = free_memory(device)
        out[key] = {"run_mib": per / 2**20, "free_gib": free / 2**30}
        out[key]["pack"] = pack_size(per, free, cap)
        log(
            f"{c.model:18s} {c.orthogonality:16s} {classes:3d} classes: one run "
            f"{per / 2**20:8.1f} MiB, packs of {out[key]['pack']}"
        )
        _free(device)
    return out


def best_s(row, prec, packed: int | None = None) -> float | None:
    """The faster of graph and eager for ``prec`` (per run when ``packed``)."""
    got = []
    for mode in ("graph", "eager"):
        key = f"{prec}_{mode}" + (f"_packed{packed}" if packed else "")
        if key in row:
            got.append(row[key]["per_run_s"] if packed else row[key]["s"])
    return min(got) if got else None


def project(grid_configs, steps_measured, prec, pack) -> dict:
    """Projected hours of each grid from the measured step times: per run, epochs x
    (training images // batch) steps x its kind's step time (the faster of graph and
    eager; ``packed``: per run in a pack of ``pack``). Kinds not measured (an error,
    or the budget spent) are listed, and their runs left out of the hours."""
    out = {}
    for name, configs in grid_configs.items():
        hours = {"alone": 0.0, "packed": 0.0}
        steps_total, missing = 0, set()
        for c in configs:
            row = steps_measured.get(kind_key(c))
            alone = best_s(row, prec) if row else None
            if alone is None:
                missing.add(kind_key(c))
                continue
            packed = best_s(row, prec, pack) if pack > 1 else None
            steps = c.epochs * (TRAIN_IMAGES[c.dataset] // c.batch_size)
            steps_total += steps
            hours["alone"] += steps * alone / 3600
            hours["packed"] += steps * (packed if packed is not None else alone) / 3600
        out[name] = {
            "runs": len(configs),
            "steps": steps_total,
            **hours,
            "missing_kinds": sorted(missing),
        }
    return out


def cuda_test_files() -> list[str]:
    return sorted(
        str(f.relative_to(ROOT))
        for f in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.cuda" in f.read_text()
    )


def cuda_tests(timeout, log) -> dict:
    files = cuda_test_files()
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-m", "cuda", "-q"]
    cmd += ["-p", "no:cacheprovider", "-p", "no:nbval", *files]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"CUDA tests still running after {timeout} s") from e
    lines = proc.stdout.strip().splitlines()
    log(f"CUDA tests: {lines[-1] if lines else proc.stderr[-300:]}")
    failed = [s for s in lines if s.startswith(("FAILED", "ERROR"))]
    return {
        "files": files,
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else proc.stderr[-300:],
        "failed": failed,
        "tail": "\n".join(lines[-40:]),
    }


def activations(device, timeout, log) -> dict:
    """The activations benchmark on CUDA (CUDA events), its JSON returned."""
    script = ROOT / "benchmarks" / "activations.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "activations.json"
        cmd = [sys.executable, str(script), "--devices", "cuda", "--out", str(out)]
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-1000:] or proc.stdout[-1000:])
        log(proc.stdout.strip()[-1500:])
        return json.loads(out.read_text())


def _worker(kind: str, steps: int, images: int, go: str) -> None:
    """One of the peer processes: time ``steps`` captured bf16 steps of ``kind``,
    started when the file ``go`` appears; prints seconds per step."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    c = step_kinds(grids(False))[kind]
    step, idx = _step_setup([c], device, "bf16", images, graph=True)
    for _ in range(GRAPH_WARMUP + 2):
        step(idx)
    _sync(device)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(idx)
    _sync(device)
    print(json.dumps({"s": (time.perf_counter() - t0) / steps}), flush=True)


def peers(kind: str, k: int, steps: int, images: int, timeout: float) -> dict:
    """``k`` processes sharing the GPU, each training its own run of ``kind`` (the
    alternative to packing them): seconds per step of each, started together."""
    with tempfile.TemporaryDirectory() as tmp:
        go = os.path.join(tmp, "go")
        args = [kind, str(steps), str(images), go]
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", *args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(k)
        ]
        try:
            for p in procs:
                if p.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a peer failed: {p.stderr.read()[-500:]}")
            Path(go).touch()
            outs = [p.communicate(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                p.kill()
    per_step = [json.loads(o.strip().splitlines()[-1])["s"] for o, _ in outs]
    return {"k": k, "s": max(per_step), "per_run_s": max(per_step) / k}


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
            lines = []
            r = run(
                c,
                tmp,
                log=lines.append,
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
                "graph_lines": [s for s in lines if "CUDA graph" in s],
            }
            log(
                f"{c.activation:6s} {c.orthogonality:5s}: test acc per epoch "
                + " ".join(f"{a:.3f}" for a in out[c.run_id()]["test_acc"])
            )
    return out


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="a smoke test: seconds")
    p.add_argument("--pack", type=int, default=5, help="runs per packed network")
    p.add_argument("--max-pack", type=int, default=15, help="the largest pack timed")
    p.add_argument(
        "--template-chunk",
        type=int,
        default=10,
        help="classes per pass of the template penalty's chunked step",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per kind")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the exact run")
    p.add_argument("--budget", type=float, default=None, help="seconds of measuring")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA tests")
    p.add_argument("--fail", action="append", default=[], help="force ITEM to fail")
    p.add_argument("--subset", default=None, help="cifar10-subset.npz")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu.json"))
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    p = _parser()
    a = p.parse_args(argv)
    if a.worker:
        kind, steps, images, go = a.worker
        return _worker(kind, int(steps), int(images), go)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("no CUDA device here; use --device cpu --quick for the smoke test")
    log = print
    budget = a.budget if a.budget is not None else (360.0 if cuda else 900.0)
    result = {**metadata(), "device": str(device), "quick": a.quick, "budget_s": budget}
    if cuda:
        torch.backends.cudnn.benchmark = True
        result["device_name"] = torch.cuda.get_device_name(device)
    check = Check(a.out, result, device, budget, a.fail, log)
    if cuda and not a.no_tests:
        result["cuda_tests"] = check.item(
            "cuda tests", cuda_tests, 150, log, timed=False
        )
    if cuda:
        result["activations"] = check.item("activations", activations, device, 90, log)
    configs = grids(a.quick)
    steps = a.steps or (2 if a.quick else 20)
    images = 64 if a.quick else 5000
    pack = 2 if a.quick else a.pack
    precisions = ("bf16", "fp32") if cuda else ("fp32",)
    result["steps"] = {}
    for key, c in step_kinds(configs).items():
        row = check.item(
            f"step {key}", measure_kind, c, device, pack, steps, images, precisions, log
        )
        if row is not None:
            result["steps"][key] = row
    prec = precisions[0]
    tmpl = sorted(  # the template-penalty kind with the most classes
        (c for c in step_kinds(configs).values() if c.orthogonality == "templates"),
        key=lambda c: -DATASETS[c.dataset].num_classes,
    )
    if tmpl:
        result["template_chunked"] = check.item(
            f"template chunk {a.template_chunk}",
            template_chunked,
            *(tmpl[0], device, pack, steps, images, prec, a.template_chunk),
        )
    result["pack_memory"] = check.item(
        "pack memory", pack_memory, step_kinds(configs), device, images, a.max_pack, log
    )
    base = result["steps"].get(kind_key(configs["paper"][0]))
    exact = [
        r
        for r in result["steps"].values()
        if r["config"]["orthogonality"] == "qr" and r["config"]["activation"] == "swish"
    ]
    if base and exact:
        ratio = best_s(exact[0], prec) / best_s(base, prec)
        result["exact_swish_over_baseline"] = ratio
        log(f"exact QR + swish step / baseline step ({prec}): {ratio:.2f}")
    if cuda:
        c = configs["paper"][0]
        big = across_rates(c, a.max_pack)
        result["max_pack"] = check.item(
            f"packed {a.max_pack} across rates",
            *(time_step, big, device, prec, steps, images, True),
        )
        result["peers"] = check.item(
            f"peers {pack}", peers, kind_key(c), pack, 4 * steps, images, 120
        )
    result["projection"] = {
        "precision": prec,
        "pack": pack,
        "hours": project(configs, result["steps"], prec, pack),
    }
    for name, h in result["projection"]["hours"].items():
        log(
            f"projected {name} grid: {h['runs']} runs, {h['steps'] / 1e6:.1f} M steps: "
            f"{h['alone']:.2f} h alone, {h['packed']:.2f} h packed by {pack} ({prec})"
            + (
                f"; not measured: {len(h['missing_kinds'])} kinds"
                if h["missing_kinds"]
                else ""
            )
        )
    check.write()
    try:
        subset = str(find_cifar10_subset(a.subset))
    except FileNotFoundError as e:
        log(f"no CIFAR-10 subset ({e}); the pipeline epochs are skipped")
        subset = None
    if subset is not None:
        epochs = a.epochs or (1 if a.quick else 3)
        result["pipeline"] = check.item(
            "pipeline", pipeline_epochs, device, epochs, subset, a.quick, log
        )
    check.write()
    log(f"gpu check: {result['wall_s']:.0f} s, results in {a.out}")
    return result


if __name__ == "__main__":
    main()
