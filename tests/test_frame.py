"""The one study frame (smaso.experiment.frame): the three studies' stored runs load
through it, the same-run check tells a stored run of a config from another run, the
writer never replaces another run, and the command lines are derived from the config
dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

import pytest

from smaso.experiment import activation_study, convstudy
from smaso.experiment.config import RunConfig
from smaso.experiment.frame import (
    ResultsError,
    Study,
    add_options,
    config_from_dict,
    config_to_dict,
    grid,
    help_of,
    option,
)
from smaso.experiment.store import TABLE2
from smaso.records import book_results, write_json_atomic


@dataclass(frozen=True)
class Toy:
    """A study config for the tests."""

    arm: str = option("a", "the arm", ("a", "b", "c"), row=True)
    seed: int = option(0, "the seed", row=True)
    lr: float = option(0.1, "the rate")
    widths: tuple = option((4, 8), "widths", kind="ints")
    steps: int | None = option(None, "steps", filled="the arm's")
    note: str = "set by the study"

    def run_id(self):
        return f"toy-{self.arm}-s{self.seed}"


def test_the_three_studies_stored_runs_load_through_the_frame():
    """Each study's committed runs load with Study.load, and each is the same run as
    the config rebuilt from its identifying fields (the budget from the defaults)."""
    table2 = TABLE2.load(book_results("experiments"))
    assert len(table2) >= 27
    for r in table2:
        assert TABLE2.status(RunConfig.from_dict(r["config"]),
                             book_results("experiments")) == "same"  # fmt: skip
    beyond = activation_study.STUDY.load()
    assert len(beyond) == 54
    for r in beyond:
        c = r["config"]
        run = activation_study.ActivationRun(c["dataset"], c["arm"], c["seed"])
        assert activation_study.STUDY.status(run) == "same"
    cnn, den = convstudy.CNN.load(), convstudy.DENOISE.load()
    assert len(cnn) == 12 and len(den) == 10
    for r in cnn:
        run = convstudy.CnnRun(r["config"]["arm"], r["config"]["seed"])
        assert convstudy.CNN.status(run) == "same"
    for r in den:  # stored before `sigmas` was a field: it gets its default
        assert "sigmas" not in r["config"]
        run = convstudy.DenoiseRun(r["config"]["arm"], r["config"]["shrink"])
        assert convstudy.DENOISE.status(run) == "same"


def test_same_run_different_run_and_the_writer(tmp_path):
    study = Study(Toy, tmp_path, pattern="toy-*.json")
    run = Toy("b", 1)
    assert study.path(run).name == "toy-b-s1.json"
    assert study.status(run) == "missing" and study.finished(run) is None
    record = {"config": config_to_dict(run), "acc": 0.5}
    path = study.save(run, record)
    assert json.loads(path.read_text())["config"]["widths"] == [4, 8]
    assert study.status(run) == "same" and study.finished(run)["acc"] == 0.5
    assert study.load() == [record]
    # a stored config without a field added since is completed with its default
    old = {k: v for k, v in config_to_dict(run).items() if k != "note"}
    write_json_atomic(path, {"config": old, "acc": 0.6}, overwrite=True)
    assert study.status(run) == "same"
    # another run under the same name: never returned as this one, never replaced
    other = Toy("b", 1, lr=0.2)
    assert study.status(other) == "different"
    with pytest.raises(ResultsError, match="another configuration"):
        study.finished(other)
    with pytest.raises(FileExistsError, match="holds another run"):
        study.save(other, {"config": config_to_dict(other)})
    assert json.loads(path.read_text())["acc"] == 0.6
    assert study.clashes([run, other, Toy("c", 0)]) == [path]
    study.save(other, {"config": config_to_dict(other), "acc": 0.7}, force=True)
    assert study.finished(other)["acc"] == 0.7
    # unknown fields, a corrupt file, no folder
    write_json_atomic(path, {"config": {"arm": "b", "colour": 1}}, overwrite=True)
    assert study.status(run) == "different"
    path.write_text("{")
    assert study.status(run) == "different"
    with pytest.raises(ResultsError, match="corrupt"):
        study.load()
    with pytest.raises(ValueError, match="no results folder given"):
        Study(Toy).path(run)
    with pytest.raises(FileNotFoundError, match="no results folder"):
        study.load(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"unknown Toy fields: \['colour'\]"):
        config_from_dict(Toy, {"colour": 1})


def test_the_command_line_is_derived_from_the_dataclass():
    p = argparse.ArgumentParser()
    add_options(p, dataclasses.fields(Toy), rows=True)
    flags = {a.dest for a in p._actions}
    assert {"arms", "seeds", "lr", "widths", "steps"} <= flags
    assert "note" not in flags  # set by the study: no option
    a = p.parse_args(["--arms", "a,c", "--seeds", "0,2", "--widths", "2,3"])
    runs = grid(Toy, a, dict(arm=("a", "b", "c"), seed=(0, 1, 2)))
    assert [(r.arm, r.seed) for r in runs] == [("a", 0), ("a", 2), ("c", 0), ("c", 2)]
    assert all(r.widths == (2, 3) and r.lr == 0.1 for r in runs)
    assert len(grid(Toy, p.parse_args([]), dict(arm="ab", seed=(0, 1)))) == 4
    # a row field without given values takes all its choices
    assert [r.arm for r in grid(Toy, p.parse_args([]), dict(seed=(0,)))] == list("abc")
    with pytest.raises(SystemExit):
        p.parse_args(["--arms", "a,z"])  # not a choice
    helps = {f.name: help_of(f) for f in dataclasses.fields(Toy) if f.metadata}
    assert helps["lr"] == "the rate (default: 0.1)"
    assert helps["widths"] == "widths (default: 4,8)"
    assert helps["steps"] == "steps (default: the arm's)"
    # the convolution study's command line: every field of its run is an option
    a = convstudy.parser().parse_args(["cnn", "--arms", "bcop", "--epochs", "2"])
    runs = grid(convstudy.CnnRun, a, dict(arm=convstudy.CNN_ARMS, seed=(0, 1, 2)))
    assert runs == [convstudy.CnnRun("bcop", s, epochs=2) for s in (0, 1, 2)]
    a = convstudy.parser().parse_args(["denoise", "--sigmas", "0.1,0.2"])
    rows = dict(arm=("dct",), shrink=("soft",))
    assert grid(convstudy.DenoiseRun, a, rows)[0].sigmas == (0.1, 0.2)


def test_the_studies_command_lines(tmp_path, capsys):
    """The activation study's CLI plans from ActivationRun's fields: a budget option
    changes the config, so a stored run of the default budget is another run."""
    run = activation_study.ActivationRun("digits", "relu", 0)
    activation_study.STUDY.save(run, {"config": config_to_dict(run)}, tmp_path)
    args = ["run", "--datasets", "digits", "--arms", "relu", "--seeds", "0"]
    assert activation_study.main([*args, "--out", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert activation_study.main([*args, "--epochs", "3", "--out", str(tmp_path)]) == 1
    assert "refusing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convstudy.main(["cnn", "--arms", "gs"])
