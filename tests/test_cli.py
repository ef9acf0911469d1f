"""Tests for the command line ``python -m smaso run | sweep table2 | submit | table |
download`` (called in-process; the module entry point itself runs in
tests/test_experiment.py::test_a_real_kill_leaves_a_readable_checkpoint)."""

import json

import pytest
from helpers import SMALL_DIGITS, cli_args

from smaso.__main__ import main
from smaso.experiment import load_results

TINY = cli_args(**SMALL_DIGITS, epochs=1, threads=1)
SWEEP = [
    "sweep",
    "table2",
    *cli_args(
        datasets="digits",
        lrs="1e-3,1e-4",
        seeds=1,
        model="small-cnn",
        upsample=3,
        limit_train=150,
        limit_test=50,
        epochs=1,
        threads=1,
        bn_momentum=0.1,
    ),
]
pytestmark = pytest.mark.usefixtures("restore_threads")  # main() sets --threads


def test_run_then_skip(tmp_path, capsys):
    assert main(["run", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "final test accuracy" in out
    (res,) = load_results(tmp_path)
    assert res["config"]["dataset"] == "digits" and res["config"]["limit_train"] == 200
    assert main(["run", *TINY, "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (
        "epoch 1/1" not in out and "final test accuracy" in out
    )  # finished already: skipped
    assert len(load_results(tmp_path)) == 1


def test_sweep_shards_list_and_table(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    assert main([*SWEEP, *out, "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert (
        listed[0] == "table2: 6 runs in all; shard 0/1: 6 runs"
    )  # 2 lrs x (baseline, penalty, exact)
    runs = [line.split()[1] for line in listed[1:]]
    assert all(line.startswith("todo") for line in listed[1:])
    halves = []
    for i in range(2):
        assert main([*SWEEP, *out, "--shard", f"{i}/2", "--list"]) == 0
        halves.append(
            [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]
        )
    assert sorted(halves[0] + halves[1]) == sorted(runs) and not set(halves[0]) & set(
        halves[1]
    )
    assert main([*SWEEP, *out, "--shard", "1/2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "3 to train" in text and "epoch 1/1" not in text
    assert main([*SWEEP, *out, "--list"]) == 0
    status = capsys.readouterr().out.splitlines()[1:]
    assert sorted(
        line.split()[1] for line in status if line.startswith("done")
    ) == sorted(halves[1])
    assert main(["table", str(tmp_path), "--json", str(tmp_path / "table.json")]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| Setting | LR = 0.001 | LR = 0.0001 |")
    assert "digits exact orthogonal (qr) + swish [small-cnn-v2]" in table
    rows = json.loads((tmp_path / "table.json").read_text())
    assert sum(c["n"] for r in rows for c in r["cells"].values()) == 3


def test_bad_inputs_give_clear_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["run", "--dataset", "mnist", "--out", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'mnist'" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                *TINY,
                "--orthogonality",
                "filters",
                "--lam",
                "-1",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert (
        "lam (the penalty weight) must be a finite number >= 0"
        in capsys.readouterr().err
    )
    monkeypatch.delenv("SMASO_DATA", raising=False)
    assert (
        main(
            [
                "run",
                "--dataset",
                "svhn",
                "--data-root",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "train_32x32.mat not found" in err and "--download" in err
    )  # offline, download is off by default
    assert (
        main(["sweep", "table2", "--shard", "5/2", "--out", str(tmp_path), "--list"])
        == 2
    )
    assert "0 <= i < n" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert main(["table", str(tmp_path)]) == 2
    assert "broken.json is corrupt" in capsys.readouterr().err
    assert main(["table", str(tmp_path / "absent")]) == 2
    with pytest.raises(SystemExit):
        main(["sweep", "table2", "--seeds", "a,b", "--out", str(tmp_path)])


def test_submit_builds_one_task_per_unfinished_run(tmp_path, capsys):
    """``submit table2`` through submitit's in-process debug executor: one job per run
    not yet finished (the job array itself is tested in tests/test_cluster.py)."""
    pytest.importorskip("submitit")
    args = [a if a != "sweep" else "submit" for a in SWEEP]
    out = ["--out", str(tmp_path), "--cluster", "debug"]
    assert main([*args, *out, "--no-exact", "--lrs", "1e-3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("table2: 2 runs, 2 submitted")


def test_help_comes_from_the_config_fields(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    from smaso.experiment.config import config_fields

    for f in config_fields():
        assert "--" + f.name.replace("_", "-") in text
    assert "penalty weight lambda (paper: 1) (default: 1.0)" in " ".join(text.split())
