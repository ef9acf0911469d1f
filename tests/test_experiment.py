"""Tests for smaso.experiment: run configs, one run (results JSON, checkpoints, resume
after a
kill), bad inputs, sweeps, shards and the Table 2 aggregation. Real data: scikit-learn's digits."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smaso.data import load
from smaso.experiment import (
    PAPER_TABLE2,
    CheckpointError,
    ResultsError,
    RunConfig,
    checkpoint_path,
    format_table,
    load_checkpoint,
    load_result,
    load_results,
    load_trained_model,
    model_path,
    orthogonality_error,
    parse_shard,
    result_path,
    run,
    run_status,
    shard,
    sweep,
    table2,
    table2_configs,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("train_s", "epoch_s")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    """Digits at 16x16, the first 300 training and 100 test images, smallCNN, float64."""
    base = dict(
        dataset="digits",
        model="small-cnn",
        epochs=3,
        upsample=2,
        limit_train=300,
        limit_test=100,
        dtype="float64",
        bn_momentum=0.1,
    )
    base.update(kw)
    return RunConfig(**base)


def strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


class Killed(Exception):
    pass


def test_run_config_validation_and_ids():
    c = RunConfig(dataset="cifar100")
    assert (
        c.batch_size == 100 and RunConfig(dataset="svhn").batch_size == 50
    )  # the authors' batch sizes
    assert RunConfig(lam=5.0).lam == 0.0  # no penalty: lam cannot tell runs apart
    assert RunConfig(orthogonality="filters", lam=2).lam == 2.0
    assert c.run_id() == RunConfig(dataset="cifar100").run_id()
    assert c.run_id() != RunConfig(dataset="cifar100", seed=1).run_id()
    assert RunConfig.from_dict(c.to_dict()) == c
    bad = [
        (dict(orthogonality="filters", lam=-1.0), "lam"),
        (dict(dataset="mnist"), "dataset"),
        (dict(model="resnet"), "model"),
        (dict(lr=0), "lr"),
        (dict(epochs=0), "epochs"),
        (dict(activation="tanh"), "activation"),
        (dict(seed=-1), "seed"),
        (dict(precision="fp8"), "precision"),
        (dict(bn_momentum=2.0), "bn_momentum"),
        (dict(batch_size=0), "batch_size"),
    ]
    for kw, field in bad:
        with pytest.raises(ValueError, match=field):
            RunConfig(**kw)
    with pytest.raises(ValueError, match="unknown run config fields"):
        RunConfig.from_dict({"dataset": "cifar10", "colour": "red"})


def test_run_learns_writes_results_and_skips_when_finished(tmp_path):
    cfg = tiny(epochs=3, limit_train=None, limit_test=None, dtype="float32")
    r = run(cfg, tmp_path, log=None)
    assert r["final_test_acc"] > 0.6  # chance is 0.1
    assert [h["epoch"] for h in r["history"]] == [1, 2, 3]
    for key in (
        "config",
        "seed",
        "history",
        "wall_s",
        "device",
        "torch",
        "git_commit",
        "started",
        "finished",
        "num_parameters",
        "best_test_acc",
        "epoch_s_mean",
    ):
        assert key in r
    assert (
        r["torch"] == torch.__version__
        and r["device"] == "cpu"
        and r["config"] == cfg.to_dict()
    )
    assert r["final_test_acc"] == pytest.approx(
        sum(h["test_acc"] for h in r["history"][-3:]) / 3
    )
    on_disk = load_result(result_path(tmp_path, cfg))
    assert on_disk == json.loads(json.dumps(r))  # JSON round trip
    assert (
        not checkpoint_path(tmp_path, cfg).exists()
        and model_path(tmp_path, cfg).exists()
    )
    model = load_trained_model(tmp_path, cfg, in_channels=1)
    x = load("digits", upsample=2).x_test
    assert (
        model(x).argmax(1) == load("digits").y_test
    ).double().mean() == pytest.approx(r["last_test_acc"])
    called = []
    again = run(cfg, tmp_path, log=None, on_epoch=lambda *a: called.append(a))
    assert (
        again == on_disk and not called
    )  # finished: nothing trained, nothing overwritten


def test_resume_after_a_kill_loses_at_most_one_epoch(tmp_path):
    cfg = tiny(epochs=4)
    whole = run(cfg, tmp_path / "whole", log=None)

    def kill_after_epoch_2(epoch, model, rec):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        run(cfg, tmp_path / "k", log=None, on_epoch=kill_after_epoch_2)
    assert not result_path(tmp_path / "k", cfg).exists()
    assert load_checkpoint(checkpoint_path(tmp_path / "k", cfg))["epoch"] == 2

    def kill_in_epoch_3(i, seen=[]):
        seen.append(i)
        if len(seen) == 3:
            raise Killed

    with pytest.raises(Killed):
        run(
            cfg, tmp_path / "k", log=None, on_batch=kill_in_epoch_3
        )  # resumes at epoch 3, dies inside it
    assert (
        load_checkpoint(checkpoint_path(tmp_path / "k", cfg))["epoch"] == 2
    )  # lost: the epoch in progress
    resumed = run(cfg, tmp_path / "k", log=None)
    assert strip(resumed["history"]) == strip(
        whole["history"]
    )  # the same numbers as an uninterrupted run
    # (the second resume wrote no checkpoint before it died, so only the first is on
    # record)
    assert (
        resumed["resumes"] == [2]
        and resumed["final_test_acc"] == whole["final_test_acc"]
    )


def test_a_real_kill_leaves_a_readable_checkpoint(tmp_path):
    """SIGKILL a CLI run between checkpoints: the checkpoint (written atomically) still loads."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "smaso",
        "run",
        "--dataset",
        "digits",
        "--model",
        "small-cnn",
        "--upsample",
        "2",
        "--limit-train",
        "200",
        "--limit-test",
        "50",
        "--epochs",
        "500",
        "--threads",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    cfg = RunConfig(
        dataset="digits",
        model="small-cnn",
        upsample=2,
        limit_train=200,
        limit_test=50,
        epochs=500,
    )
    ckpt = checkpoint_path(out, cfg)
    deadline = time.time() + 60
    while (
        time.time() < deadline
        and proc.poll() is None
        and not (ckpt.exists() and load_checkpoint(ckpt)["epoch"] >= 1)
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    state = load_checkpoint(ckpt)
    assert state["epoch"] >= 1 and len(state["history"]) == state["epoch"]
    assert run_status(out, cfg) == "partial" and not result_path(out, cfg).exists()


def test_corrupt_files_raise_clear_errors_and_are_kept(tmp_path):
    cfg = tiny(epochs=1)
    ckpt = checkpoint_path(tmp_path, cfg)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x80\x02 truncated")
    with pytest.raises(CheckpointError, match="cannot be read.*left in place"):
        run(cfg, tmp_path, log=None)
    assert ckpt.read_bytes() == b"\x80\x02 truncated"
    ckpt.unlink()
    res = result_path(tmp_path, cfg)
    res.write_text('{"format": "smaso-run/1", "hist')
    with pytest.raises(ResultsError, match="corrupt"):
        run(cfg, tmp_path, log=None)
    with pytest.raises(ResultsError, match="corrupt"):
        load_results(tmp_path)
    assert res.read_text() == '{"format": "smaso-run/1", "hist'
    other = run(tiny(epochs=1, seed=1), tmp_path / "o", log=None)
    res.write_text(
        json.dumps(other)
    )  # a finished run of another config under this run's name
    with pytest.raises(ResultsError, match="another configuration"):
        run(cfg, tmp_path, log=None)
    with pytest.raises(FileExistsError, match="not overwriting"):
        write_json_atomic(res, {"x": 1})
    assert json.loads(res.read_text()) == json.loads(json.dumps(other))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_exact_orthogonal_swish_run_stays_orthogonal(tmp_path):
    r = run(
        tiny(
            model="small-cnn-v2",
            upsample=3,
            activation="swish",
            orthogonality="qr",
            epochs=2,
        ),
        tmp_path,
        log=None,
    )
    assert all(h["orthogonality_error"] < 1e-10 for h in r["history"])  # float64
    assert (
        all(h["eta_mean"] > 0 for h in r["history"])
        and r["history"][0]["filters_cos2"][1] < 1e-20
    )
    model = load_trained_model(
        tmp_path, RunConfig.from_dict(r["config"]), in_channels=1
    )
    assert orthogonality_error(model) < 1e-10


def test_table2_configs_shards_and_sweep(tmp_path):
    full = table2_configs()
    assert (
        len(full) == 3 * 3 * 2 * 5 + 3 * 5
    )  # Table 2 and the exactly orthogonal + swish row on CIFAR-100
    exact = [c for c in full if c.orthogonality == "qr"]
    assert {c.dataset for c in exact} == {"cifar100"} and {c.model for c in exact} == {
        "large-cnn-code-v2"
    }
    assert all(c.activation == "swish" for c in exact)
    assert {(c.orthogonality, c.lam) for c in full} == {
        ("none", 0.0),
        ("filters", 1.0),
        ("qr", 0.0),
    }
    assert len({c.run_id() for c in full}) == len(full)
    parts = [shard(full, i, 4) for i in range(4)]
    assert sorted(c.run_id() for p in parts for c in p) == sorted(
        c.run_id() for c in full
    )
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    assert parse_shard(
        "slurm", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    ) == (3, 4)
    for bad in ("4/4", "x", "1/0", "slurm"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad, {})
    configs = table2_configs(
        ["digits"],
        lrs=[1e-3],
        seeds=[0],
        model="small-cnn",
        epochs=1,
        exact_reference=True,
        upsample=3,
        limit_train=200,
        limit_test=50,
        bn_momentum=0.1,
    )
    assert len(configs) == 4
    lines = []
    results = sweep(configs, tmp_path, log=lines.append, epoch_lines=False)
    assert len(results) == 4 and any("4 to train" in s for s in lines)
    lines.clear()
    sweep(configs, tmp_path, log=lines.append)
    assert any("4 finished already, 0 to train" in s for s in lines)
    rows = table2(load_results(tmp_path))
    assert [r["setting"] for r in rows] == [
        "baseline [small-cnn]",
        "Ortho (penalty filters, λ=1) [small-cnn]",
        "baseline [small-cnn-v2]",
        "exact orthogonal (qr) + swish [small-cnn-v2]",
    ]


def test_table2_aggregation():
    def fake(orth, lr, seed, acc):
        cfg = RunConfig(dataset="cifar10", orthogonality=orth, lr=lr, seed=seed)
        return {
            "config": cfg.to_dict(),
            "final_test_acc": acc,
            "best_test_acc": acc + 0.01,
            "last_test_acc": acc,
        }

    results = [fake("none", 1e-3, s, a) for s, a in enumerate([0.80, 0.81, 0.79])]
    results += [fake("filters", 1e-3, 0, 0.84), fake("none", 1e-4, 0, 0.76)]
    rows = table2(results)
    assert [r["setting"] for r in rows] == [
        "baseline [large-cnn-code]",
        "Ortho (penalty filters, λ=1) [large-cnn-code]",
    ]
    cell = rows[0]["cells"][1e-3]
    assert (
        cell["n"] == 3
        and cell["mean"] == pytest.approx(80.0)
        and cell["std"] == pytest.approx(1.0)
    )
    assert rows[1]["cells"][1e-3]["std"] == 0.0 and 1e-4 not in rows[1]["cells"]
    text = format_table(rows, lrs=[1e-3, 5e-4, 1e-4])
    assert (
        "| cifar10 baseline [large-cnn-code] | 80.0 ± 1.0 (3) | – | 76.0 ± 0.0 (1) |"
        in text
    )
    assert table2(results, "best_test_acc")[0]["cells"][1e-3]["mean"] == pytest.approx(
        81.0
    )
    with pytest.raises(ValueError, match="metric"):
        table2(results, "worst")
    assert PAPER_TABLE2[("cifar10", "ortho")][1e-3] == (84.0, 0.3)


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    """The mixed-precision path (the default on CUDA) exercised on the CPU: it trains, in bf16 autocast."""
    r = run(tiny(epochs=2, dtype="float32", precision="bf16"), tmp_path, log=None)
    assert (
        r["precision"] == "bf16-autocast"
        and r["history"][-1]["train_loss"] < r["history"][0]["train_loss"] + 0.5
    )
    assert all(np.isfinite(h["test_loss"]) for h in r["history"])


STUDY = ROOT / "book" / "results" / "experiments"


@pytest.mark.skipif(
    not STUDY.is_dir(), reason="the stored subset-scale study is not in this checkout"
)
def test_stored_subset_study_backs_the_chapter():
    """The claims book/experiments.md makes about the stored CIFAR-10-subset study."""
    results = load_results(STUDY)
    assert len(results) == 36 and {r["config"]["dataset"] for r in results} == {
        "cifar10-subset"
    }
    rows = {r["setting"]: r["cells"] for r in table2(results)}
    base, pen = (
        rows["baseline [small-cnn]"],
        rows["Ortho (penalty filters, λ=1) [small-cnn]"],
    )
    ref, exact = (
        rows["baseline [small-cnn-v2]"],
        rows["exact orthogonal (qr) + swish [small-cnn-v2]"],
    )
    for lr in (1e-3, 5e-4, 1e-4):
        assert all(c[lr]["n"] == 3 for c in (base, pen, ref, exact))
        se = lambda a, b: np.hypot(a[lr]["std"], b[lr]["std"]) / np.sqrt(3)
        assert pen[lr]["mean"] - base[lr]["mean"] < -2 * se(
            pen, base
        )  # the penalty costs accuracy here
        assert abs(exact[lr]["mean"] - ref[lr]["mean"]) <= 1.5 * se(
            exact, ref
        )  # exact + swish ~ ReLU
    ex = [r for r in results if r["config"]["orthogonality"] == "qr"]
    assert max(h["orthogonality_error"] for r in ex for h in r["history"]) < 1e-5
    pens = [r for r in results if r["config"]["orthogonality"] == "filters"]
    assert all(
        r["history"][-1]["filters_cos2"][1] < 1e-4 for r in pens
    )  # conv2 made orthogonal
