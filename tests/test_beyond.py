"""Tests of the "Beyond the paper" activations (BetaVQMaxout, TsallisVQReLU) and of
the activation study (smaso.experiment.activation_study)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from smaso.activations import (
    BetaVQMaxout,
    BetaVQReLU,
    TsallisVQReLU,
    convex_maso,
    scalar_beta_maso,
)
from smaso.data import TensorData
from smaso.experiment import activation_study as beyond
from smaso.experiment.frame import ResultsError, config_to_dict
from smaso.models import study_cnn
from smaso.records import write_json_atomic
from smaso.tsallis import scalar_tsallis_maso

ROOT = Path(__file__).resolve().parents[1]
D64 = torch.float64


def _maxout(C=3, R=4, alpha=1.0, seed=0):
    m = BetaVQMaxout(C, pieces=R, alpha=alpha).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.slopes.copy_(torch.randn(C, R, generator=g, dtype=D64))
        m.offsets.copy_(torch.randn(C, R, generator=g, dtype=D64))
        m.rho.copy_(torch.randn(C, generator=g, dtype=D64))
    return m


# --------------------------------------------------------------------------------------
# BetaVQMaxout


def test_maxout_init_is_relu_when_hard():
    m = BetaVQMaxout(5, pieces=4).double()
    x = torch.randn(2, 5, 3, 3, dtype=D64)
    assert torch.equal(m.hard(x), x.relu())
    assert torch.allclose(m.beta, torch.full((5,), 0.5, dtype=D64))


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
def test_maxout_is_the_beta_vq_of_its_pieces(alpha):
    m = _maxout(alpha=alpha)
    x = torch.randn(4, 3, 5, 2, dtype=D64)
    y = m(x)
    for c in range(3):
        A, B = convex_maso(m.slopes[c].detach(), m.offsets[c].detach())
        beta = m.beta[c].item()
        ref = (
            scalar_beta_maso(A, B, x[:, c], beta)
            if alpha == 1.0
            else scalar_tsallis_maso(A, B, x[:, c], beta, alpha)
        )
        assert torch.allclose(y[:, c], ref, atol=1e-12)
    assert m(x[:, :, 0, 0]).shape == (4, 3)  # (N, C) inputs too


def test_maxout_limits_and_convexity():
    m = _maxout()
    x = (
        torch.linspace(-4, 4, 801, dtype=D64)
        .view(1, 1, -1)
        .expand(1, 3, -1)
        .contiguous()
    )
    with torch.no_grad():
        m.rho.fill_(40.0)  # beta -> 1: the hard VQ
    assert torch.allclose(m(x), m.hard(x), atol=1e-9)
    h = m.hard(x)[0]
    assert (h[:, 2:] - 2 * h[:, 1:-1] + h[:, :-2] >= -1e-12).all()  # max-affine: convex
    with torch.no_grad():
        m.rho.fill_(-40.0)  # beta -> 0: the mean of the pieces (linear)
    assert torch.allclose(m(x), m.scores(x).mean(2), atol=1e-9)


def test_maxout_gradcheck_and_learnable():
    m = _maxout(C=2, R=3)
    x = torch.randn(2, 2, 3, dtype=D64, requires_grad=True)
    params = (m.slopes, m.offsets, m.rho)
    assert torch.autograd.gradcheck(
        lambda x, a, b, r: _functional_maxout(x, a, b, r, 1.0), (x, *params)
    )
    assert torch.autograd.gradcheck(
        lambda x, a, b, r: _functional_maxout(x, a, b, r, 1.5), (x, *params)
    )
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        "slopes",
        "offsets",
        "rho",
    }
    assert not BetaVQMaxout(2, learnable=False).rho.requires_grad


def _functional_maxout(x, a, b, r, alpha):
    m = BetaVQMaxout(a.shape[0], pieces=a.shape[1], alpha=alpha).double()
    del m.slopes, m.offsets, m.rho
    m.slopes, m.offsets, m.rho = a, b, r
    return m(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_channels=None), "num_channels"),
        (dict(num_channels=0), "num_channels"),
        (dict(num_channels=2, pieces=1), "pieces"),
        (dict(num_channels=2, alpha=0.5), "alpha"),
        (dict(num_channels=2, beta_init=1.0), "beta_init"),
    ],
)
def test_maxout_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BetaVQMaxout(**kwargs)


def test_maxout_wrong_channels():
    with pytest.raises(ValueError, match="channels"):
        BetaVQMaxout(3)(torch.randn(2, 4, 5))


# --------------------------------------------------------------------------------------
# TsallisVQReLU


def test_tsallis_relu_starts_as_hard_swish_and_alpha_one_is_swish():
    x = torch.randn(3, 4, 5, 5, dtype=D64)
    assert torch.allclose(TsallisVQReLU(4).double()(x), F.hardswish(x), atol=1e-14)
    assert torch.allclose(
        TsallisVQReLU(4, alpha=1.0, beta_init=0.3).double()(x),
        BetaVQReLU(4, beta_init=0.3).double()(x),
        atol=1e-14,
    )
    m = TsallisVQReLU(4, alpha=1.5, beta_init=0.5).double()
    assert torch.allclose(m(x)[x >= 2], x[x >= 2]) and (m(x)[x <= -2] == 0).all()


def test_tsallis_relu_gradcheck_and_errors():
    m = TsallisVQReLU(2, alpha=1.5, beta_init=0.4).double()
    x = torch.randn(3, 2, 4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    m(x).sum().backward()
    assert m.rho.grad is not None and m.rho.grad.shape == (2,)
    with pytest.raises(ValueError, match="alpha"):
        TsallisVQReLU(alpha=0.0)
    with pytest.raises(ValueError, match="channels"):
        TsallisVQReLU(3)(torch.randn(2, 4))
    assert "alpha=2.0" in repr(TsallisVQReLU())


# --------------------------------------------------------------------------------------
# the activation study


def test_every_arm_builds_and_runs():
    x = torch.randn(2, 1, 8, 8)
    for arm in beyond.ARMS:
        model = study_cnn(10, 1, arm)
        assert model(x).shape == (2, 10)
        n_beta = len(beyond.beta_layers(model))
        assert n_beta == (0 if arm in ("relu", "silu", "hardswish") else 3), arm
    with pytest.raises(ValueError, match="activation must be one of"):
        study_cnn(10, 1, "tanh")
    with pytest.raises(ValueError, match="dataset must be one of"):
        beyond.ActivationRun("mnist", "relu", 0)
    with pytest.raises(ValueError, match="arm must be one of"):
        beyond.ActivationRun("digits", "tanh", 0)


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 8, 8, generator=g, dtype=D64)
    y = torch.randint(0, 3, (48,), generator=g)
    return TensorData(x[:32], y[:32], x[32:], y[32:], 3)


def test_run_one_records_beta_trajectory():
    config = beyond.ActivationRun("digits", "bvq-maxout3", 0, epochs=2)
    out = beyond.run_one(config, data=_tiny_data())
    assert out["config"] == config_to_dict(config)
    assert out["config"]["widths"] == [16, 32, 64] and out["config"]["lr"] == 3e-3
    res = out["result"]
    assert len(res["history"]) == 2 and 0 <= res["test_acc"] <= 1
    assert len(res["beta_per_epoch"]) == 3 and [
        len(b) for b in res["beta_per_epoch"][0]
    ] == [16, 32, 64]
    assert res["beta_per_epoch"][0][0][0] == 0.5 and len(res["maxout_pieces"]) == 3
    again = beyond.run_one(config, data=_tiny_data())
    assert again["result"]["history"] == res["history"]  # seeded: reproducible


def test_results_are_written_atomically_and_never_overwritten(tmp_path, capsys):
    run = beyond.ActivationRun("digits", "relu", 0)
    config, study = config_to_dict(run), beyond.STUDY
    path = study.path(run, tmp_path)
    assert path.name == "digits-relu-seed0.json"
    assert study.status(run, tmp_path) == "missing"
    write_json_atomic(path, {"config": config, "result": {"test_acc": 0.5}})
    assert study.status(run, tmp_path) == "same"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    # a stored run with the same config is skipped (no training happens: the file is
    # unchanged)
    before = path.read_text()
    assert (
        beyond.main(
            [
                "run",
                "--datasets",
                "digits",
                "--arms",
                "relu",
                "--seeds",
                "0",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert path.read_text() == before and "skipped" in capsys.readouterr().out
    # a different stored result is refused without --force
    other = dict(config, lr=1.0)
    write_json_atomic(
        path, {"config": other, "result": {"test_acc": 0.1}}, overwrite=True
    )
    assert study.status(run, tmp_path) == "different"
    with pytest.raises(FileExistsError, match="holds another run"):
        study.save(run, {"config": config}, tmp_path)
    with pytest.raises(ResultsError, match="another configuration"):
        study.finished(run, tmp_path)
    before = path.read_text()
    assert (
        beyond.main(
            [
                "run",
                "--datasets",
                "digits",
                "--arms",
                "relu",
                "--seeds",
                "0",
                "--out",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert path.read_text() == before and "refusing" in capsys.readouterr().err
    path.write_text("{not json")
    assert study.status(run, tmp_path) == "different"
    with pytest.raises(ResultsError, match="corrupt"):
        study.load(tmp_path)


def test_summarize():
    runs = [
        {
            "config": config_to_dict(beyond.ActivationRun("digits", "swish", s)),
            "result": {
                "test_acc": a,
                "beta_per_epoch": [[[0.5, 0.5]], [[b, b]]],
                "wall_s": 1.0,
            },
        }
        for s, a, b in ((0, 0.9, 0.6), (1, 0.8, 0.4), (2, 0.7, 0.5))
    ]
    row = beyond.summarize(runs)["digits", "swish"]
    assert row["n"] == 3 and row["accs"] == [0.9, 0.8, 0.7]
    assert row["mean"] == pytest.approx(0.8) and row["std"] == pytest.approx(0.1)
    assert row["beta_final"] == [pytest.approx(0.5)]


def test_committed_results_are_consistent():
    results = beyond.STUDY.load()
    if not results:
        pytest.skip("no committed results in book/results/beyond")
    seen = {}
    for r in results:
        c = r["config"]
        run = beyond.ActivationRun(c["dataset"], c["arm"], c["seed"])
        assert beyond.STUDY.status(run) == "same", f"stale result {c}"
        assert len(r["result"]["history"]) == c["epochs"]
        seen.setdefault((c["dataset"], c["arm"]), set()).add(c["seed"])
    for key, seeds in seen.items():
        assert len(seeds) >= 3, key


def test_the_old_script_path_still_runs_the_study():
    """experiments/beyond.py is a shim over the package's study (same results)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "beyond.py"), "summary"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "digits   swish" in out.stdout
