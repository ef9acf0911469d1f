"""Tests for smaso.experiment: run configs and protocols, one run (results JSON,
checkpoints, resume after a kill), bad inputs, sweeps (shards, claims, failures) and
the Table 2 aggregation. Real data: scikit-learn's digits."""

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
from helpers import SMALL_DIGITS, cli_args, smaso_command, strip, tiny
from torch.nn.utils import parametrize

from smaso.data import load
from smaso.experiment import (
    PAPER_TABLE2,
    CheckpointError,
    MixedRunsError,
    ResultsError,
    RunClaimedError,
    RunConfig,
    checkpoint_path,
    claim,
    claim_path,
    failed_path,
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
pytestmark = pytest.mark.usefixtures("one_thread")


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
    with pytest.raises(ValueError, match="unknown RunConfig fields"):
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


def killed_after_epoch(cfg, out_dir, n):
    """Run ``cfg`` into ``out_dir`` with a checkpoint after every epoch, killed once
    epoch ``n`` has finished (and been checkpointed)."""

    def kill(epoch, model, rec):
        if epoch == n:
            raise Killed

    with pytest.raises(Killed):
        run(cfg, out_dir, log=None, on_epoch=kill, checkpoint_every=0)


def test_a_single_run_checkpoint_of_the_old_format_resumes(tmp_path):
    """Checkpoints have one format (``configs``/``histories``, a list of one for a
    single run); one written before, with ``config``/``history``, still resumes."""
    cfg = tiny(epochs=3)
    whole = run(cfg, tmp_path / "whole", log=None)
    killed_after_epoch(cfg, tmp_path / "k", 1)
    ckpt = checkpoint_path(tmp_path / "k", cfg)
    state = torch.load(ckpt, weights_only=True)
    assert len(state["configs"]) == 1 and len(state["histories"]) == 1
    state["config"], state["history"] = (
        state.pop("configs")[0],
        state.pop("histories")[0],
    )
    torch.save(state, ckpt)  # as the runner wrote a single run's checkpoint before
    resumed = run(cfg, tmp_path / "k", log=None)
    assert resumed["resumes"] == [1]
    assert strip(resumed["history"]) == strip(whole["history"])


def test_resume_after_a_kill_loses_at_most_one_epoch(tmp_path):
    cfg = tiny(epochs=4)
    whole = run(cfg, tmp_path / "whole", log=None)
    killed_after_epoch(cfg, tmp_path / "k", 2)
    assert not result_path(tmp_path / "k", cfg).exists()
    assert load_checkpoint(checkpoint_path(tmp_path / "k", cfg))["epoch"] == 2

    def kill_in_epoch_3(i, seen=[]):  # noqa: B006 (counts calls across calls)
        seen.append(i)
        if len(seen) == 3:
            raise Killed

    with pytest.raises(Killed):
        run(
            cfg, tmp_path / "k", log=None, on_batch=kill_in_epoch_3, checkpoint_every=0
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
    """SIGKILL a CLI run between checkpoints: the checkpoint (written atomically)
    still loads."""
    out = tmp_path / "out"
    cmd = smaso_command(
        "run",
        *cli_args(
            **SMALL_DIGITS,
            epochs=500,
            threads=1,
            checkpoint_every=0,
            out=out,
            quiet=True,
        ),
    )
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    cfg = RunConfig(**SMALL_DIGITS, epochs=500)
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
    assert state["epoch"] >= 1 and len(state["histories"][0]) == state["epoch"]
    assert run_status(out, cfg) == "partial" and not result_path(out, cfg).exists()


def test_corrupt_files_raise_clear_errors_and_are_kept(tmp_path):
    cfg = tiny(epochs=1)
    ckpt = checkpoint_path(tmp_path, cfg)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x80\x02 truncated")
    with pytest.raises(CheckpointError, match=r"cannot be read.*left in place"):
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
    """The mixed-precision path (the default on CUDA) exercised on the CPU: it trains,
    in bf16 autocast."""
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

        def se(a, b, lr=lr):
            return np.hypot(a[lr]["std"], b[lr]["std"]) / np.sqrt(3)

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


# --------------------------------------------------------------------------------------
# run identity, protocols, precision


def test_run_ids_of_the_stored_study_are_stable():
    """Fields added to RunConfig after the first results format enter a run's name only
    when they differ from the paper protocol: the stored runs keep their names."""
    stored = {
        "activation": "relu",
        "balanced": True,
        "batch_size": 50,
        "bn_momentum": 0.1,
        "dataset": "cifar10-subset",
        "dtype": "float32",
        "epochs": 10,
        "lam": 0.0,
        "limit_test": None,
        "limit_train": None,
        "lr": 0.0001,
        "model": "small-cnn-v2",
        "orthogonality": "none",
        "precision": "auto",
        "preprocess": "authors",
        "seed": 0,
        "upsample": 1,
    }
    c = RunConfig.from_dict(stored)
    assert c.run_id() == "cifar10-subset_small-cnn-v2_relu_none_lr0.0001_s0_7f02d714"
    assert c.protocol == "paper" and c.optimizer == "adam" and c.apodize is False
    a = RunConfig.from_dict({**stored, "protocol": "authors"})
    assert a.run_id() != c.run_id() and a.optimizer == "adam-no-bias-correction"
    assert RunConfig.from_dict(a.to_dict()) == a


def test_authors_protocol_presets():
    a = dict(protocol="authors")
    assert RunConfig(model="large-cnn-code", **a).bn_last is False  # v1 only
    assert RunConfig(model="large-cnn-code-v2", **a).bn_last is True
    assert (
        RunConfig(**a).conv_bias is False and RunConfig(**a).orthogonal_dense is False
    )
    assert RunConfig(model="small-cnn-v2", orthogonality="gs", **a).apodize is True
    assert RunConfig(model="small-cnn-v2", **a).apodize is False  # exact runs only
    assert (
        RunConfig(model="large-cnn-code-v2", orthogonality="gs", **a).apodize is False
    )
    assert RunConfig(optimizer="adam", **a).optimizer == "adam"  # explicit wins
    with pytest.raises(ValueError, match="protocol"):
        RunConfig(protocol="folklore")
    with pytest.raises(ValueError, match="conv_bias"):
        RunConfig(conv_bias="yes")
    grid = table2_configs(["cifar100"], seeds=[0], protocol="authors")
    pen = [c for c in grid if c.orthogonality in ("filters", "templates")]
    assert {c.orthogonality for c in pen} == {"templates"}
    exact = [c for c in grid if c.model == "large-cnn-code-v2"]
    # the 2x2 control at the Gram-Schmidt runs' rates and length
    assert {(c.activation, c.orthogonality) for c in exact} == {
        ("relu", "none"),
        ("swish-softplus", "none"),
        ("relu", "gs-unnormalised"),
        ("swish-softplus", "gs-unnormalised"),
    }
    assert {c.lr for c in exact} == {1e-3, 2e-4} and {c.epochs for c in exact} == {100}
    small = table2_configs(["digits"], seeds=[0], protocol="authors", model="small-cnn")
    assert {c.lr for c in small if c.model == "small-cnn-v2"} == {5e-3, 1e-3, 2e-4}
    assert all(c.protocol == "authors" and not c.orthogonal_dense for c in exact)
    paper = table2_configs(["cifar100"], seeds=[0])
    assert len(paper) == 3 * 2 + 3 and {c.protocol for c in paper} == {"paper"}


def test_authors_protocol_run_trains_what_it_says(tmp_path):
    """An authors'-protocol exact run: Adam without bias correction, unnormalised
    Gram-Schmidt on apodised convolutions only, the softplus swish."""
    cfg = tiny(
        model="small-cnn-v2",
        upsample=3,
        activation="swish-softplus",
        orthogonality="gs-unnormalised",
        protocol="authors",
        epochs=2,
    )
    assert cfg.apodize and not cfg.orthogonal_dense
    seen = {}

    def look(epoch, model, rec):
        if epoch == 1:  # (no checkpoint after the last epoch: the results follow)
            seen["lr"] = load_checkpoint(checkpoint_path(tmp_path, cfg))
        seen["model"] = model

    r = run(cfg, tmp_path, log=None, on_epoch=look, checkpoint_every=0)
    assert all(h["orthogonality_error"] < 1e-10 for h in r["history"])  # cosines
    groups = seen["lr"]["optimizer"]["param_groups"]
    steps = cfg.limit_train // cfg.batch_size
    from smaso.train import no_bias_correction_factor

    assert groups[0]["lr"] == pytest.approx(
        cfg.lr * no_bias_correction_factor(steps), rel=1e-12
    )
    model = seen["model"]
    assert not parametrize.is_parametrized(model[-1], "weight")  # dense left alone
    names = [type(p).__name__ for p in model[0].parametrizations.weight]
    assert names == ["Apodize", "UnnormalisedGramSchmidt"]
    assert r["history"][-1]["eta_mean"] > 0


def test_resume_under_another_precision_is_refused(tmp_path):
    cfg = tiny(epochs=3)
    killed_after_epoch(cfg, tmp_path, 1)
    ckpt = checkpoint_path(tmp_path, cfg)
    state = load_checkpoint(ckpt)
    assert (state["precision"], state["device_type"]) == ("float64", "cpu")
    state["precision"], state["device_type"] = "bf16-autocast", "cuda"
    torch.save(state, ckpt)  # as if the first epoch had run on a GPU ("auto": bf16)
    with pytest.raises(CheckpointError, match="mix two precisions"):
        run(cfg, tmp_path, log=None)
    assert ckpt.exists()  # left in place


# --------------------------------------------------------------------------------------
# sweeps: failures, claims, the table's provenance check, download


def test_sweep_records_a_failed_run_and_goes_on(tmp_path, monkeypatch):
    from smaso.experiment import runner

    configs = [tiny(epochs=1, seed=s) for s in (0, 1, 2)]
    real = runner.build_model

    def build(config, *a, **k):
        if config.seed == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(config, *a, **k)

    monkeypatch.setattr(runner, "build_model", build)
    lines = []
    results = sweep(configs, tmp_path, log=lines.append, epoch_lines=False)
    assert [r["seed"] for r in results] == [0, 2]  # the failure did not stop the shard
    bad = failed_path(tmp_path, configs[1])
    rec = json.loads(bad.read_text())
    assert "out of memory" in rec["error"] and "in build" in rec["traceback"]
    assert run_status(tmp_path, configs[1]) == "failed"
    assert len(load_results(tmp_path)) == 2  # failure records are not results
    assert any("FAILED" in s for s in lines)
    lines.clear()
    sweep(configs, tmp_path, log=lines.append, epoch_lines=False)  # not retried
    assert any("failed before" in s for s in lines) and bad.exists()
    # a diverged run (NaN loss) is a failure too
    monkeypatch.setattr(runner, "build_model", real)
    real_read = runner.TrainStep.read

    def nan_read(self):
        return dict(real_read(self), loss=float("nan"))

    monkeypatch.setattr(runner.TrainStep, "read", nan_read)
    sweep([tiny(epochs=1, seed=3)], tmp_path, log=None)
    rec = json.loads(failed_path(tmp_path, tiny(epochs=1, seed=3)).read_text())
    assert "diverged" in rec["error"]
    monkeypatch.setattr(runner.TrainStep, "read", real_read)
    results = sweep(configs, tmp_path, log=None, retry_failed=True)
    assert len(results) == 3 and not bad.exists()  # retried, record removed


def test_claims_keep_other_processes_off_and_stale_ones_are_taken_over(tmp_path):
    cfg = tiny(epochs=1)
    held = claim(tmp_path, cfg)
    assert held is not None and run_status(tmp_path, cfg) == "todo"  # ours
    path = claim_path(tmp_path, cfg)
    body = json.loads(path.read_text())
    # another live process holds it: refused
    body["owner"] = f"some-other-host:{os.getpid()}"
    path.write_text(json.dumps(body))
    assert claim(tmp_path, cfg) is None and run_status(tmp_path, cfg) == "claimed"
    with pytest.raises(RunClaimedError):
        run(cfg, tmp_path, log=None)
    # ... until it has been silent for stale_after seconds
    old = time.time() - 3 * 3600
    os.utime(path, (old, old))
    assert run_status(tmp_path, cfg) == "todo"
    taken = claim(tmp_path, cfg)
    assert taken is not None and taken.held() and not held.held()
    taken.release()
    # a dead process of this host: taken over at once
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
    )
    import socket

    body["owner"] = f"{socket.gethostname()}:{int(proc.stdout)}"
    path.write_text(json.dumps(body))
    assert claim(tmp_path, cfg) is not None


def test_two_concurrent_sweeps_never_train_the_same_run(tmp_path):
    """Two processes sweep the same runs into one folder at the same time: each run is
    trained once, by one of them (claim files), and every run finishes."""
    args = smaso_command(
        "sweep",
        "table2",
        *cli_args(
            datasets="digits",
            lrs="1e-3,5e-4,1e-4",
            seeds=2,
            model="small-cnn",
            no_exact=True,
            upsample=2,
            limit_train=300,
            limit_test=50,
            epochs=2,
            threads=1,
            bn_momentum=0.1,
            out=tmp_path,
        ),
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trained = [
        {line.split(":")[0] for line in out.splitlines() if ": done, final" in line}
        for out, _ in outs
    ]
    results = load_results(tmp_path)
    assert len(results) == 12
    assert not trained[0] & trained[1]  # no run trained twice
    assert trained[0] | trained[1] == {r["run_id"] for r in results}
    assert not list((tmp_path / "claims").glob("*.claim"))  # all released


def test_table_refuses_to_average_mixed_runs(tmp_path, capsys):
    from smaso.__main__ import main

    def fake(seed, acc, commit="abc", precision="float32"):
        cfg = RunConfig(dataset="cifar10", seed=seed)
        return {
            "config": cfg.to_dict(),
            "final_test_acc": acc,
            "best_test_acc": acc,
            "last_test_acc": acc,
            "git_commit": commit,
            "precision": precision,
            "torch": torch.__version__,
        }

    same = [fake(0, 0.8), fake(1, 0.82)]
    assert table2(same)[0]["cells"][1e-3]["n"] == 2
    mixed = [
        fake(0, 0.8),
        fake(1, 0.82, precision="bf16-autocast"),
        fake(2, 0.8, "def"),
    ]
    with pytest.raises(MixedRunsError) as e:
        table2(mixed)
    msg = str(e.value)
    assert "precision differs (float32 x2, bf16-autocast x1)" in msg
    assert "git_commit differs (abc x2, def x1)" in msg and "lr 0.001" in msg
    assert table2(mixed, allow_mixed=True)[0]["cells"][1e-3]["n"] == 3
    # the ± convention: sample std (ddof 1) or the authors' population std (ddof 0)
    cell0 = table2(same, ddof=0)[0]["cells"][1e-3]
    assert cell0["std"] == pytest.approx(1.0) and table2(same)[0]["cells"][1e-3][
        "std"
    ] == pytest.approx(2**0.5)
    out = tmp_path / "mixed"
    for r in mixed:
        c = RunConfig.from_dict(r["config"])
        full = {
            **r,
            "format": "smaso-run/1",
            "run_id": c.run_id(),
            "seed": c.seed,
            "history": [],
            "wall_s": 0.0,
            "device": "cpu",
        }
        write_json_atomic(result_path(out, c), full)
    assert main(["table", str(out)]) == 2
    assert "refusing to average" in capsys.readouterr().err
    assert main(["table", str(out), "--allow-mixed", "--ddof", "0"]) == 0
    assert "80.7 ± 0.9 (3)" in capsys.readouterr().out


def test_download_fetches_each_torchvision_dataset_once(tmp_path, monkeypatch):
    from smaso.__main__ import main
    from smaso.experiment import study

    fetched = []

    def fake(name, root=None):
        fetched.append((name, root))
        return [tmp_path / name / "file"]

    monkeypatch.setattr(study, "download_dataset", fake)
    argv = ["download", "--datasets", "cifar10,digits,cifar10,svhn"]
    assert main([*argv, "--data-root", str(tmp_path)]) == 0
    assert fetched == [("cifar10", str(tmp_path)), ("svhn", str(tmp_path))]


AUTHORS_STUDY = STUDY / "authors"


@pytest.mark.skipif(
    not AUTHORS_STUDY.is_dir(), reason="the stored authors'-protocol study is absent"
)
def test_stored_authors_subset_study_and_its_2x2_control():
    """The subset-scale study under the authors' protocol (book/results/experiments/
    authors): what it ran, and what its 2x2 control says (differences of means over 3
    seeds, with the standard error of the difference)."""
    from smaso.experiment import subset_study

    results = load_results(AUTHORS_STUDY)
    assert {r["run_id"] for r in results} == {
        c.run_id() for c in subset_study("authors")
    }
    rows = {r["setting"]: r["cells"] for r in table2(results)}  # no mixed provenance
    exact = [r for r in results if r["config"]["orthogonality"] == "gs-unnormalised"]
    assert all(
        r["config"]["apodize"] and not r["config"]["orthogonal_dense"] for r in exact
    )
    assert max(h["orthogonality_error"] for r in exact for h in r["history"]) < 1e-5
    tag = "[small-cnn-v2, authors]"
    cell = {
        ("relu", "none"): rows[f"baseline {tag}"],
        ("swish", "none"): rows[f"no orthogonality + swish-softplus {tag}"],
        ("relu", "gs"): rows[f"exact orthogonal (gs-unnormalised) {tag}"],
        ("swish", "gs"): rows[
            f"exact orthogonal (gs-unnormalised) + swish-softplus {tag}"
        ],
    }

    def diff(a, b, lr):
        ca, cb = cell[a][lr], cell[b][lr]
        se = np.hypot(ca["std"] / np.sqrt(ca["n"]), cb["std"] / np.sqrt(cb["n"]))
        return (ca["mean"] - cb["mean"]) / se

    # swish alone (no orthogonality) is within 2 standard errors of ReLU at every rate
    assert all(
        abs(diff(("swish", "none"), ("relu", "none"), lr)) < 2
        for lr in cell[("relu", "none")]
    )
    # Gram-Schmidt's effect depends on the rate: it helps at 5e-3, hurts at 2e-4
    assert diff(("relu", "gs"), ("relu", "none"), 5e-3) > 2
    assert diff(("relu", "gs"), ("relu", "none"), 2e-4) < -2
    assert diff(("swish", "gs"), ("swish", "none"), 2e-4) < -2
    assert all(abs(diff(a, ("relu", "none"), 1e-3)) < 2 for a in cell)
    # the authors' protocol (Adam without bias correction) trains the penalty script's
    # smallCNN baseline higher than the paper protocol at every shared rate
    paper = {r["setting"]: r["cells"] for r in table2(load_results(STUDY))}
    p, a = paper["baseline [small-cnn]"], rows["baseline [small-cnn, authors]"]
    assert all(a[lr]["mean"] - p[lr]["mean"] > 2 for lr in (1e-3, 5e-4, 1e-4))


def test_records_is_the_ground_floor():
    """smaso.records writes files and records provenance without loading the Table 2
    pipeline; the convolution study, the activation study and the benchmarks use it."""
    import subprocess
    import sys

    code = (
        "import sys, smaso.records as r, smaso.experiment.convstudy; "
        "print('smaso.experiment.runner' in sys.modules, sorted(r.provenance()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    assert out[0] == "False", "importing smaso.records or convstudy loads the pipeline"
    for key in ("date", "torch", "python", "smaso", "git_commit", "cpu", "threads"):
        assert repr(key) in out[1]
