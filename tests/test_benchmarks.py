"""Tests for the benchmarks' shared helpers (benchmarks/common.py), the quick mode of
the Cholesky-QR benchmark (benchmarks/cholqr.py): its candidates against
:func:`smaso.orthogonal.qr_rows` and ``torch.linalg.qr``, and the JSON it writes, and
the activations benchmark (benchmarks/activations.py): its runs on the CPU and on CUDA,
a tiny run on the CPU, and the stored results the book and the README quote.
The timings themselves are not checked here (speed is for the benchmarks to measure)."""

import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_benchmark

from smaso.orthogonal import qr_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


load = load_benchmark


common = load("common")
cholqr = load("cholqr")
activations = load("activations")


def test_metadata_holds_what_the_stored_results_record():
    meta = common.metadata()
    assert tuple(meta) == common.METADATA_KEYS
    assert meta["torch"] == torch.__version__ and meta["threads"] == (
        torch.get_num_threads()
    )
    assert meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert meta["cpu"] and meta["date"].endswith("+00:00")
    assert "threads" not in common.metadata(threads=False)
    # every environment key a stored result holds is one metadata() writes
    for name, per_run_threads in [
        ("activations", True),
        ("orthogonal", False),
        ("orthoconv", False),
    ]:
        stored = json.loads((RESULTS / f"{name}.json").read_text())
        env = set(stored) & set(common.METADATA_KEYS)
        assert env >= {"torch", "machine", "cpu_count"}, name
        assert env <= set(common.metadata(threads=not per_run_threads)), name


def test_paired_ratio_median_against_numpy():
    a = [3.0, 1.0, 8.0, 2.5, 9.0, 4.0]
    b = [1.5, 2.0, 2.0, 0.5, 3.0, 8.0]
    assert common.paired_ratios(a, b) == [2.0, 0.5, 4.0, 5.0, 3.0, 0.5]
    assert common.median_paired_ratio(a, b) == pytest.approx(
        np.median(np.array(a) / np.array(b))
    )
    # the paired median is not the ratio of the medians
    assert common.median_paired_ratio(a, b) != pytest.approx(
        statistics.median(a) / statistics.median(b)
    )
    assert common.median_paired_ratio(a[:5], b[:5]) == 3.0  # odd count: middle one
    with pytest.raises(ValueError, match="equally long"):
        common.paired_ratios(a, b[:-1])
    with pytest.raises(ValueError, match="positive"):
        common.paired_ratios([1.0], [0.0])


def test_timed_measures_wall_and_cpu_time():
    wall, cpu = common.timed(lambda: sum(i * i for i in range(200_000)))
    assert wall > 0 and cpu > 0


def test_write_results_keeps_the_previous_file(tmp_path, capsys):
    path = tmp_path / "sub" / "r.json"
    common.write_results(path, {"a": 1, "b": [1.5, None]})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5, None]}
    common.write_results(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert json.loads(path.with_suffix(".json.bak").read_text())["a"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json", "r.json.bak"]
    with pytest.raises(TypeError):  # not JSON: nothing moved, nothing left behind
        common.write_results(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json", "r.json.bak"]
    with pytest.raises(ValueError, match=r"a \.json file"):
        common.write_results(tmp_path / "r.txt", {})


def test_cholesky_qr_is_the_sign_fixed_qr(one_thread):
    """Both candidates give the rows of qr_rows (float64, Glorot weights), which are
    those of torch.linalg.qr with R's diagonal made positive, with the same gradient."""
    g = torch.Generator().manual_seed(1)
    for shape in [(64, 288), (27, 96), (192, 1728)]:
        M = cholqr.glorot(*shape, g).requires_grad_(True)
        up = torch.randn(shape, generator=g, dtype=torch.float64)
        Q, R = torch.linalg.qr(M.detach().T)
        ref = (Q * R.diagonal().sign()).T
        grads = []
        for f in (qr_rows, cholqr.cholqr, cholqr.cholqr2):
            M.grad = None
            rows = f(M)
            assert rows.dtype == torch.float64
            assert (rows - ref).abs().max() < 1e-12, (f.__name__, shape)
            (rows * up).sum().backward()
            grads.append(M.grad.clone())
        for gr in grads[1:]:
            assert (gr - grads[0]).abs().max() < 1e-10 * grads[0].abs().max()
    M32 = cholqr.glorot(64, 288, g).float()
    assert cholqr.cholqr(M32).dtype == torch.float32
    with pytest.raises(ValueError, match=r"not positive definite|dependent"):
        cholqr.cholqr(torch.ones(3, 5, dtype=torch.float64))  # rank 1


def test_conditioned_matrices_have_the_condition_number_asked_for():
    g = torch.Generator().manual_seed(0)
    for cond in (1e3, 1e6):
        M = cholqr.conditioned(27, 96, cond, g)
        assert torch.linalg.cond(M).item() == pytest.approx(cond, rel=1e-6)


def test_quick_mode_writes_the_json_with_its_correctness_numbers(tmp_path):
    n = torch.get_num_threads()
    out = tmp_path / "cholqr.json"
    result = cholqr.main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == n  # restored
    stored = json.loads(out.read_text())
    assert stored == json.loads(json.dumps(result))
    for key in ("benchmark", "methods", "ratio", "runs", "accuracy", "networks"):
        assert key in stored
    assert set(common.METADATA_KEYS) - {"threads"} <= set(stored)
    assert stored["quick"] is True and stored["repeats"] == 3
    (run,) = stored["runs"]
    assert run["threads"] == 1 and run["matrices"] and run["networks"]
    for row in run["matrices"] + run["networks"]:
        for m in cholqr.CANDIDATES:
            assert row[f"{m}_cpu_ratio"] > 0 and row[f"{m}_wall_ratio"] > 0
    # every Conv2d/Linear layer of smallCNN v1, in order: (out, fan_in)
    assert stored["networks"]["small_cnn v1"] == [
        [32, 27],
        [64, 288],
        [128, 64],
        [10, 128],
    ]
    acc = {
        (r["weights"], r["dtype"], r["method"], tuple(r["shape"])): r
        for r in stored["accuracy"]
    }
    shapes = {k[3] for k in acc}
    assert shapes == {(27, 32), (64, 288)}
    for s in shapes:
        for m in cholqr.CANDIDATES:
            glo = acc["glorot", "float64", m, s]
            assert glo["max_abs_q_minus_ref"] < 1e-10 and glo["grad_rel_diff"] < 1e-10
            assert acc["glorot", "float32", m, s]["orthogonality"] < 1e-6
            # CholeskyQR2 is orthogonal to working precision at cond 1e6 ...
            assert acc["cond 1e+06", "float64", "cholqr2", s]["orthogonality"] < 1e-13
            assert acc["cond 1e+06", "float32", "cholqr2", s]["orthogonality"] < 1e-6
        # ... one pass is not: it squares the condition number (eps64 * 1e12)
        one = acc["cond 1e+06", "float64", "cholqr", s]
        assert 1e-9 < one["orthogonality"] < 1e-2
        assert acc["cond 1e+06", "float64", "qr_rows", s]["orthogonality"] < 1e-13
        assert acc["cond 1e+08", "float64", "qr_rows", s]["error"] is None


def test_activations_runs_cpu_thread_counts_and_cuda_float32_and_bfloat16(
    monkeypatch, tmp_path
):
    assert activations.plan(["cpu"], [1, 2]) == [
        {"device": "cpu", "dtype": "float32", "threads": 1},
        {"device": "cpu", "dtype": "float32", "threads": 2},
    ]
    cuda = [{"device": "cuda", "dtype": d} for d in ("float32", "bfloat16")]
    assert activations.plan(["cuda"], [1, 2]) == cuda
    with pytest.raises(ValueError, match="cpu and cuda"):
        activations.plan(["mps"], [1])
    assert activations.timer("cpu") is common.timed
    assert activations.timer("cuda") is activations.cuda_timed
    # where CUDA is present, the default runs add CUDA's to the CPU's
    measured = []

    def fake_run(spec, shape, only, repeats):
        measured.append(spec)
        return {"device": spec["device"], "dtype": spec["dtype"], "results": []}

    monkeypatch.setattr(activations, "measure_run", fake_run)
    monkeypatch.setattr(activations, "report", lambda *a: None)
    monkeypatch.setattr(activations.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(activations.native, "parallel_threads", lambda: 2)
    activations.main(["--threads", "1", "2", "--out", str(tmp_path / "a.json")])
    assert measured == activations.plan(["cpu"], [1, 2]) + cuda


def test_activations_times_cuda_between_two_events(monkeypatch):
    """The CUDA clock: the device synchronised, an event recorded before and after the
    step, the time between them (elapsed_time, in ms) in seconds."""
    calls = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.name = f"event {len([c for c in calls if c.startswith('new')])}"
            calls.append("new " + self.name)

        def record(self):
            calls.append("record " + self.name)

        def synchronize(self):
            calls.append("wait for " + self.name)

        def elapsed_time(self, end):
            return 250.0  # ms

    monkeypatch.setattr(activations.torch.cuda, "Event", Event)
    monkeypatch.setattr(
        activations.torch.cuda, "synchronize", lambda: calls.append("sync")
    )
    (seconds,) = activations.cuda_timed(lambda: calls.append("step"))
    assert seconds == 0.25
    assert calls == [
        "new event 0",
        "new event 1",
        "sync",
        "record event 0",
        "step",
        "record event 1",
        "wait for event 1",
    ]


def test_activations_tiny_run_on_the_cpu(tmp_path, restore_threads):
    out = tmp_path / "activations.json"
    args = ["--shape", "2", "4", "6", "6", "--repeats", "2", "--only", "BetaVQReLU"]
    result = activations.main([*args, "--threads", "1", "2", "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored == json.loads(json.dumps(result))
    assert set(common.METADATA_KEYS) - {"threads"} <= set(stored)
    assert [(r["device"], r["threads"]) for r in stored["runs"]] == [
        ("cpu", 1),
        ("cpu", 2),
    ]
    for run in stored["runs"]:
        assert run["clocks"] == ["wall", "cpu"]
        (row,) = run["results"]
        assert row["activation"] == "BetaVQReLU" and row["peer"] == "nn.SiLU"
        for v in row["variants"].values():
            assert v["wall_ratio"] > 0 and v["cpu_ratio"] > 0 and v["wall_peer_ms"] > 0
            assert v["max_rel_err"] < run["tolerance"] == 1e-4


def test_stored_activation_results_have_wall_clock_ratios_at_1_and_2_threads():
    bench = json.loads((RESULTS / "activations.json").read_text())
    cpu = {r["threads"]: r for r in bench["runs"] if r["device"] == "cpu"}
    assert {1, 2} <= set(cpu)
    for run in cpu.values():
        relu = run["results"][0]
        assert (relu["activation"], relu["peer"]) == ("BetaVQReLU", "nn.SiLU")
        for row in run["results"]:
            for v in row["variants"].values():
                assert v["wall_ratio"] > 0 and v["cpu_ratio"] > 0
                assert v["max_rel_err"] < run["tolerance"]


def test_readme_quotes_the_stored_activation_ratios():
    """The README's wall-clock ratios of the default β-VQ ReLU to nn.SiLU are the
    stored ones (to two decimals)."""
    bench = json.loads((RESULTS / "activations.json").read_text())
    stored = {
        r["threads"]: r["results"][0]["variants"]["default"]["wall_ratio"]
        for r in bench["runs"]
        if r["device"] == "cpu"
    }
    readme = (ROOT / "README.md").read_text()
    quoted = re.findall(r"([0-9.]+)x `nn.SiLU` with (\d+) threads?", readme)
    assert quoted, "the README quotes no wall-clock ratio of BetaVQReLU"
    assert {int(t): r for r, t in quoted} == {t: f"{v:.2f}" for t, v in stored.items()}
