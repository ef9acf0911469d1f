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


def _pack(config, k):
    """``config`` alone, or a pack of ``k`` runs of it with their own seeds, learning
    rates and penalty weights."""
    if k == 1:
        return [config]
    d = config.to_dict()
    return [
        RunConfig(**{**d, "seed": s, "lr": 1e-3 * (s + 1), "lam": s + 1.0})
        for s in range(k)
    ]


def _setup(config, k, device="cpu"):
    """A step's pieces for ``config`` alone, or for a pack of ``k`` runs of it."""
    configs = _pack(config, k)
    model = build_training_model(configs, 3, 10).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 24, 24, generator=g).to(device)
    y = (torch.arange(64) % 10).to(device)
    shape = (4,) if k == 1 else (k, 4)
    batches = [torch.randint(0, 64, shape, generator=g).to(device) for _ in range(4)]
    opt, sched = build_optimizer(configs, model)
    extra = build_loss(configs, like=next(model.parameters()))
    return model, opt, sched, extra, x, y, batches


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


#: Both protocols: the authors' runs step with Adam without bias correction (a
#: scheduler on the host) and their own sampling.
PROTOCOL_SETTINGS = [
    (s, k, proto)
    for s in SETTINGS
    for k in (1, 2)
    for proto in ("paper", "authors")
    if s != "exact GS loop" and not (s == "authors' exact row" and proto == "paper")
]


@pytest.mark.parametrize("setting, k, protocol", PROTOCOL_SETTINGS)
def test_no_tensor_created_or_moved_inside_a_step(setting, k, protocol):
    """What a CUDA graph replays must not depend on the host: inside a step the
    package's code creates no tensor (no factory op) and moves none to the device."""
    config = RunConfig(**{**SETTINGS[setting], "protocol": protocol})
    model, opt, sched, extra, x, y, batches = _setup(config, k)
    train_epoch(model, opt, x, y, batches[:1], extra, None, None, sched)
    with step.OpCounter() as one:
        train_epoch(model, opt, x, y, batches[:1], extra, None, None, sched)
    with step.OpCounter() as two:
        train_epoch(model, opt, x, y, batches[:2], extra, None, None, sched)
    per_step = two.ops.copy()
    per_step.subtract(one.ops)
    assert step.created(+per_step) == {}
    # the counter sees what it looks for: the epoch's own accumulators
    assert any("train.py" in w for w in step.created(one.ops))


def test_the_created_check_sees_the_old_hamming_window(monkeypatch):
    """Before: the apodised layers built their Hamming window on the host, in every
    forward pass, and moved it to the device."""
    from smaso import filters

    config = RunConfig(**SETTINGS["authors' exact row"])
    model, opt, _, extra, x, y, batches = _setup(config, 1)
    monkeypatch.setattr(filters.Apodize, "forward", lambda m, w: filters.apodize(w))
    ops = step.per_step_ops(model, opt, extra, x, y, batches)
    made = step.created(ops)
    assert sum(v for w, v in made.items() if "hamming_window" in w) == 3 * 2
    assert sum(v for w, v in made.items() if "_to_copy" in w) == 3


@pytest.mark.parametrize("setting", ["baseline", "exact QR + swish"])
def test_a_step_changes_no_python_state(setting):
    """A captured step replays kernels only: nothing it reads on the host may change
    from step to step (the optimiser's hyperparameters; the step's own fields). The
    authors' Adam changes its learning rate and eps on the host every step, so its
    optimiser steps outside the graph."""
    from smaso.train import TrainStep

    config = RunConfig(**SETTINGS[setting])
    model, opt, sched, extra, x, y, batches = _setup(config, 1)
    ts = TrainStep(model, opt, x, y, extra, None, sched)
    assert ts.optimizer_in_graph is False  # on the CPU Adam is not capturable

    def host_state():
        groups = [
            {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
        ]
        fields = {k: v for k, v in vars(ts).items() if not isinstance(v, torch.Tensor)}
        fields.pop("seen"), fields.pop("batches"), fields.pop("eager_steps")
        return repr(groups), repr(sorted(fields.items(), key=lambda kv: kv[0]))

    ts(batches[0])
    before = host_state()
    for idx in batches[1:]:
        ts(idx)
    assert host_state() == before
    authors = RunConfig(**{**SETTINGS[setting], "protocol": "authors"})
    model, opt, sched, extra, x, y, batches = _setup(authors, 1)
    assert sched is not None
    assert not TrainStep(model, opt, x, y, extra, None, sched).optimizer_in_graph


def test_batches_have_static_shapes_but_the_last_shuffled_one():
    """One captured graph serves every full batch: the authors' class-balanced batches
    are all full; shuffled batches (the paper's protocol) end with a smaller one, which
    the step runs eagerly."""
    from smaso.data import epoch_batches

    y = torch.arange(103) % 10
    balanced = epoch_batches(y, 10, 0, 0, balanced=True, num_classes=10)
    assert {tuple(b.shape) for b in balanced} == {(10,)} and len(balanced) == 10
    shuffled = epoch_batches(y, 10, 0, 0)
    assert [tuple(b.shape) for b in shuffled] == [(10,)] * 10 + [(3,)]


def test_cuda_graph_option_is_checked():
    from smaso.experiment import Runtime
    from smaso.train import TrainStep

    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        Runtime(cuda_graph="yes")
    config = RunConfig(**SETTINGS["baseline"])
    model, opt, sched, extra, x, y, _ = _setup(config, 1)
    with pytest.raises(ValueError, match="cuda_graph must be one of auto, on, off"):
        TrainStep(model, opt, x, y, cuda_graph="yes")
    with pytest.raises(ValueError, match="needs data on a CUDA device"):
        TrainStep(model, opt, x, y, extra, None, sched, cuda_graph="on")
    assert not TrainStep(model, opt, x, y, cuda_graph="auto").use_graph


def _graph_vs_eager(config, k, graph):
    """Six steps (two epochs of three, the last batch of each smaller) with or without
    a CUDA graph: the metrics, the final weights, and the step."""
    from smaso.train import TrainStep

    configs = _pack(config, k)
    model = build_training_model(configs, 3, 10).cuda()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 24, 24, generator=g).cuda()
    y = (torch.arange(64) % 10).cuda()
    shape = (4,) if k == 1 else (k, 4)
    small = (2,) if k == 1 else (k, 2)
    opt, sched = build_optimizer(configs, model, capturable=True)
    extra = build_loss(configs, like=next(model.parameters()))
    ts = TrainStep(model, opt, x, y, extra, None, sched, "on" if graph else "off")
    out = []
    for _ in range(3):
        batches = [torch.randint(0, 64, shape, generator=g).cuda() for _ in range(3)]
        batches.append(torch.randint(0, 64, small, generator=g).cuda())
        out.append(ts.epoch(batches))
    weights = [p.detach().clone() for p in model.parameters()]
    return out, weights, ts


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("setting", [s for s in SETTINGS if s != "exact GS loop"])
def test_cuda_graph_step_equals_the_eager_step(setting, k):
    torch.backends.cudnn.deterministic = True
    try:
        config = RunConfig(**SETTINGS[setting])
        eager, w_eager, _ = _graph_vs_eager(config, k, graph=False)
        captured, w_graph, ts = _graph_vs_eager(config, k, graph=True)
    finally:
        torch.backends.cudnn.deterministic = False
    assert ts.graph is not None, ts.graph_error
    assert ts.optimizer_in_graph == (config.optimizer == "adam")
    for a, b in zip(eager, captured, strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(w_eager, w_graph, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.cuda
def test_a_step_that_cannot_be_captured_runs_eagerly():
    from smaso.train import TrainStep

    config = RunConfig(**SETTINGS["baseline"])
    model = build_model(config, 3, 10, check=False).cuda()
    model.register_forward_hook(lambda m, i, o: o * float(o.sum() > -1e30))  # a sync
    x = torch.randn(64, 3, 24, 24, device="cuda")
    y = (torch.arange(64) % 10).cuda()
    opt, sched = build_optimizer(config, model, capturable=True)
    lines = []
    ts = TrainStep(model, opt, x, y, None, None, sched, "on", lines.append)
    batches = [torch.randint(0, 64, (4,), device="cuda") for _ in range(6)]
    tr = ts.epoch(batches)
    assert ts.graph is None and ts.graph_error and len(lines) == 1
    assert lines[0].startswith("CUDA graph not used") and tr["loss"] > 0


@pytest.mark.cuda
def test_the_pipeline_trains_with_a_cuda_graph_and_resumes(tmp_path):
    """A run with the captured step, killed after its first epoch and resumed, gives
    the numbers of an uninterrupted one."""
    from helpers import run_killed_after, tiny

    from smaso.experiment import run

    cfg = tiny(epochs=2)
    lines = []
    full = run(cfg, tmp_path / "a", log=lines.append, device="cuda", cuda_graph="on")
    assert not any("CUDA graph not used" in s for s in lines)

    run_killed_after(run, cfg, tmp_path / "b", 1, device="cuda")
    resumed = run(cfg, tmp_path / "b", log=None, device="cuda", cuda_graph="on")
    assert resumed["resumes"] == [1]
    a = [h["test_acc"] for h in full["history"]]
    b = [h["test_acc"] for h in resumed["history"]]
    assert a == pytest.approx(b, abs=0.02)


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
    kinds = {gpu.kind_key(c) for g in grids.values() for c in g}
    assert kinds <= set(stored["steps"])  # every kind of run of both grids is timed
    assert any("|gs|" in k for k in stored["steps"])  # and the Gram-Schmidt loop
    for row in stored["steps"].values():
        assert row["fp32_eager"]["s"] > 0 and row["fp32_eager_packed2"]["per_run_s"] > 0
    assert all(i["status"] == "ok" for i in stored["items"].values())
    # the projection, recomputed from the stored step times
    for name, configs in grids.items():
        hours = 0.0
        for c in configs:
            t = stored["steps"][gpu.kind_key(c)]["fp32_eager"]["s"]
            hours += c.epochs * (gpu.TRAIN_IMAGES[c.dataset] // c.batch_size) * t / 3600
        got = stored["projection"]["hours"][name]
        assert got["runs"] == len(configs) and got["missing_kinds"] == []
        assert got["alone"] == pytest.approx(hours, rel=1e-9)
    assert r["projection"] == stored["projection"]
    # the template penalty's step in chunks of classes, alone and packed
    chunked = stored["template_chunked"]
    assert chunked["chunk"] == 10 and chunked["alone"]["s"] > 0
    assert chunked["packed2"]["per_run_s"] > 0
    if "pipeline" in stored:  # the CIFAR-10 subset is there
        for run in stored["pipeline"].values():
            assert len(run["test_acc"]) == 1


def test_gpu_check_isolates_a_failing_item_and_keeps_to_its_budget(tmp_path):
    out = tmp_path / "gpu.json"
    grids = gpu.grids(quick=True)
    bad = gpu.kind_key(grids["paper"][0])
    args = ["--device", "cpu", "--quick", "--no-tests", "--out", str(out)]
    gpu.main([*args, "--fail", f"step {bad}", "--subset", str(tmp_path / "none")])
    stored = json.loads(out.read_text())
    item = stored["items"][f"step {bad}"]
    assert item["status"] == "error" and "forced failure" in item["error"]
    assert bad not in stored["steps"] and len(stored["steps"]) >= 3  # the others
    assert bad in stored["projection"]["hours"]["paper"]["missing_kinds"]
    # a spent budget: nothing more is measured, what there is is written and projected
    gpu.main([*args, "--budget", "0", "--subset", str(tmp_path / "none")])
    stored = json.loads(out.read_text())
    assert stored["budget_spent"] and stored["steps"] == {}
    assert all(i["status"].startswith("skipped") for i in stored["items"].values())
    assert stored["projection"]["hours"]["paper"]["alone"] == 0.0
    assert out.with_suffix(".json.bak").exists()  # the previous run's file kept
