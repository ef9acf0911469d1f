"""The training step without host synchronisations, and the GPU check script.

On the CPU the step's ATen operations are inspected (benchmarks/step.py's counter):
no operation that reads a device value on the host may run per step, in any Table 2
setting, alone or packed; the check that caught the exact layers' per-forward rank
test (before the change) is shown to fire. With CUDA, the same steps run under
``torch.cuda.set_sync_debug_mode("error")``. benchmarks/gpu.py runs in its
``--device cpu --quick`` mode and its projection is recomputed from its own JSON."""

import json
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

from smaso.experiment import (
    RunConfig,
    build_loss,
    build_model,
    build_optimizer,
    build_training_model,
)
from smaso.train import train_epoch

ROOT = Path(__file__).resolve().parents[1]


load = load_benchmark


step = load("step")
gpu = load("gpu")

SETTINGS = {
    "baseline": dict(model="small-cnn"),
    "filter penalty": dict(model="small-cnn", orthogonality="filters"),
    "template penalty": dict(model="small-cnn", orthogonality="templates"),
    "exact QR + swish": dict(
        model="small-cnn-v2", orthogonality="qr", activation="swish"
    ),
    "exact GS loop": dict(model="small-cnn-v2", orthogonality="gs"),
    "authors' exact row": dict(
        model="small-cnn-v2",
        orthogonality="gs-unnormalised",
        activation="swish-softplus",
        protocol="authors",
    ),
}


def _setup(config, k, device="cpu"):
    configs = [RunConfig(**{**config.to_dict(), "seed": s}) for s in range(k)]
    model = build_training_model(configs, 3, 10).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 24, 24, generator=g).to(device)
    y = (torch.arange(64) % 10).to(device)
    shape = (4,) if k == 1 else (k, 4)
    batches = [torch.randint(0, 64, shape, generator=g).to(device) for _ in range(4)]
    opt, sched = build_optimizer(config, model)
    return model, opt, sched, build_loss(config), x, y, batches


@pytest.mark.parametrize(
    "setting, k",
    # (the Gram-Schmidt loop packed: ~60 000 operations a step, a minute here)
    [(s, k) for s in SETTINGS for k in (1, 2) if (s, k) != ("exact GS loop", 2)],
)
def test_no_host_sync_in_a_training_step(setting, k):
    config = RunConfig(**SETTINGS[setting])
    model, opt, _, extra, x, y, batches = _setup(config, k)
    ops = step.per_step_ops(model, opt, extra, x, y, batches)
    assert sum(ops.values()) > 20  # the counter sees the step
    syncs = {op: n for op, n in ops.items() if op in step.SYNC_OPS}
    assert syncs == {}, syncs


def test_the_sync_check_sees_a_per_forward_rank_check():
    """Before: the exact layers checked their rank in every forward pass."""
    config = RunConfig(**SETTINGS["exact QR + swish"])
    model = build_model(config, 3, 10, check=True)  # the checking parametrisation
    _, _, _, extra, x, y, batches = _setup(config, 1)
    opt = torch.optim.Adam(model.parameters())
    ops = step.per_step_ops(model, opt, extra, x, y, batches)
    # three reads per exact layer: finite inputs, finite norms, none below tolerance
    assert ops["aten._local_scalar_dense"] == 3 * 4


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("setting", SETTINGS)
def test_no_host_sync_on_cuda(setting, k):
    config = RunConfig(**SETTINGS[setting])
    model, opt, sched, extra, x, y, batches = _setup(config, k, "cuda")
    model = model.to(memory_format=torch.channels_last)
    train_epoch(model, opt, x, y, batches[:1], extra, None, None, sched)  # warm-up
    n = len(batches)

    def strict(i):  # steps 2 .. n-1 under "error"; the epoch's read-out after it
        torch.cuda.set_sync_debug_mode("error" if i < n - 1 else "default")

    try:
        for autocast in (None, torch.bfloat16):
            torch.cuda.set_sync_debug_mode("default")
            train_epoch(model, opt, x, y, batches, extra, autocast, strict, sched)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_gpu_check_runs_on_the_cpu_in_quick_mode(tmp_path):
    out = tmp_path / "gpu.json"
    r = gpu.main(["--device", "cpu", "--quick", "--no-tests", "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored["quick"] and stored["device"] == "cpu"
    grids = gpu.grids(quick=True)
    kinds = {"|".join(map(str, gpu.step_kind(c))) for g in grids.values() for c in g}
    assert kinds <= set(stored["steps"])  # every kind of run of both grids is timed
    assert any("|gs|" in k for k in stored["steps"])  # and the Gram-Schmidt loop
    for row in stored["steps"].values():
        assert row["fp32_s"] > 0 and row["fp32_packed_per_run_s"] > 0
    # the projection, recomputed from the stored step times
    for name, configs in grids.items():
        hours = 0.0
        for c in configs:
            t = stored["steps"]["|".join(map(str, gpu.step_kind(c)))]["fp32_s"]
            hours += c.epochs * (gpu.TRAIN_IMAGES[c.dataset] // c.batch_size) * t / 3600
        got = stored["projection"]["hours"][name]
        assert got["runs"] == len(configs)
        assert got["alone"] == pytest.approx(hours, rel=1e-9)
    assert r["projection"] == stored["projection"]
    if "pipeline" in stored:  # the CIFAR-10 subset is there
        for run in stored["pipeline"].values():
            assert len(run["test_acc"]) == 1
