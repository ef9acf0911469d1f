"""Table 2 at full scale (smaso.experiment.fullscale) on results folders written by the
pipeline itself: real tiny runs (the smallCNN, 1 epoch, a few hundred random images of
each dataset's shape and classes) of the Table 2 grid under both protocols.

The cells are checked against the JSON files read directly and averaged with numpy,
the tests against statsmodels' Welch test and Holm correction, and the chapter's
full-scale cell is executed with SMASO_TABLE2_RESULTS pointing at the folders.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jupytext
import numpy as np
import pytest
import torch
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttest_ind

from smaso.data import DATASETS, TensorData
from smaso.experiment import (
    NO_FULL_SCALE,
    PAPER_GS_SWISH_CIFAR100,
    PAPER_TABLE2,
    TABLE2_RESULTS_ENV,
    MixedRunsError,
    ResultsError,
    full_scale_report,
    render_full_scale,
    run,
    table2_configs,
    table2_results_folders,
)

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2]
LRS = [1e-3]


def tiny_data(name, per_class, seed):
    """Random images of ``name``'s shape and classes, each class shifted a little."""
    C = DATASETS[name].num_classes
    g = torch.Generator().manual_seed(seed)

    def split(k):
        y = torch.arange(C).repeat(k)
        shift = 0.3 * (y % 5).float()[:, None, None, None]
        return torch.randn(len(y), 3, 32, 32, generator=g) + shift, y

    return TensorData(*split(per_class), *split(1), C)


def write_runs(out, configs):
    data = {
        "svhn": tiny_data("svhn", 10, 1),
        "cifar10": tiny_data("cifar10", 10, 2),
        "cifar100": tiny_data("cifar100", 1, 3),
    }
    for c in configs:
        assert data[c.dataset].num_classes == DATASETS[c.dataset].num_classes
        run(
            c,
            out,
            data=data[c.dataset],
            log=None,
            device="cpu",
            threads=1,
            save_model=False,
        )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two results folders, as a user would pass them: the paper's protocol (every
    dataset, the exact row with its ReLU twin) and the authors' (CIFAR-100 with the
    2x2 control of the exact row; the filter penalty, the template penalty costs 100
    backward passes a step on CIFAR-100)."""
    root = tmp_path_factory.mktemp("fullscale")
    common = dict(lrs=LRS, seeds=SEEDS, model="small-cnn", epochs=1, batch_size=10)
    paper = table2_configs(
        ["cifar10", "cifar100", "svhn"], exact_reference=True, **common
    )
    authors = table2_configs(
        ["cifar100"],
        protocol="authors",
        penalty="filters",
        exact_lrs=LRS,
        exact_epochs=1,
        **common,
    )
    write_runs(root / "paper", paper)
    write_runs(root / "authors", authors)
    return root / "paper", root / "authors"


def raw_runs(folder):
    """The run JSONs of ``folder``, read without the package."""
    return [
        json.loads(p.read_text())
        for p in sorted(Path(folder).glob("*.json"))
        if not p.name.endswith(".failed.json")
    ]


def values_of(runs, **where):
    return [
        100 * r["final_test_acc"]
        for r in runs
        if all(r["config"][k] == v for k, v in where.items())
    ]


def test_cells_match_the_json_files(folders):
    report = full_scale_report(folders)
    assert report["runs"] == 3 * 8 + 3 * 6
    paper, authors = report["studies"]
    assert (paper["protocol"], authors["protocol"]) == ("paper", "authors")
    (table,) = paper["tables"]
    assert table["seeds"] == SEEDS and table["settings"] == ["baseline", "filters"]
    runs = raw_runs(folders[0])
    for ds in ("svhn", "cifar10", "cifar100"):
        for s, orth in (("baseline", "none"), ("filters", "filters")):
            v = values_of(runs, dataset=ds, orthogonality=orth, model="small-cnn")
            cell = table["cells"][ds, s, 1e-3]
            assert cell["ours"]["n"] == len(v) == len(SEEDS)
            assert cell["ours"]["mean"] == pytest.approx(np.mean(v), abs=1e-9)
            assert cell["ours"]["std"] == pytest.approx(np.std(v, ddof=1), abs=1e-9)
            paper_cell = PAPER_TABLE2[ds, "baseline" if s == "baseline" else "ortho"]
            assert cell["paper"] == paper_cell[1e-3]
            assert cell["diff"] == pytest.approx(np.mean(v) - paper_cell[1e-3][0])
    # the two other rates of the paper were not run: missing, never filled in
    missing = {(ds, s, lr) for ds, s, lr in table["missing"]}
    assert missing == {
        (ds, s, lr)
        for ds in ("svhn", "cifar10", "cifar100")
        for s in ("baseline", "filters")
        for lr in (5e-4, 1e-4)
    }
    assert all(table["cells"][k]["ours"] is None for k in missing)
    assert table["incomplete"] == []
    # the authors' protocol: ddof 0, the exact row's 2x2 control
    (ex,) = authors["exact"]
    assert ex["control"] and ex["dataset"] == "cifar100"
    assert ex["rows"] == [
        "ReLU",
        "swish-softplus",
        "gs-unnormalised + ReLU",
        "gs-unnormalised + swish-softplus",
    ]
    runs = raw_runs(folders[1])
    v = values_of(runs, activation="swish-softplus", orthogonality="gs-unnormalised")
    cell = ex["cells"]["gs-unnormalised + swish-softplus", 1e-3]
    assert cell["ours"]["std"] == pytest.approx(np.std(v, ddof=0), abs=1e-9)
    assert cell["diff"] == pytest.approx(np.mean(v) - PAPER_GS_SWISH_CIFAR100)
    assert ex["cells"]["ReLU", 1e-3]["paper"] is None
    # the paper protocol's exact row with its ReLU twin only (--exact-reference)
    (ex_paper,) = paper["exact"]
    assert not ex_paper["control"]
    assert ex_paper["rows"] == ["ReLU", "qr + swish"]


def test_tests_match_statsmodels(folders):
    report = full_scale_report(folders)
    n_tests = 0
    for st in report["studies"]:
        for part in st["tables"] + st["exact"]:
            pairs = {}
            for key in part["tests"]:
                if part in st["tables"]:
                    ds, pen, lr = key
                    a, b = (ds, pen, lr), (ds, "baseline", lr)
                    pairs[key] = part["cells"][a]["ours"], part["cells"][b]["ours"]
                    continue
                name, lr = key
                best = part["best_table2"]["ours"]
                rows = {
                    "gs-unnormalised, with ReLU": ("gs-unnormalised + ReLU", "ReLU"),
                    "gs-unnormalised, with swish-softplus": (
                        "gs-unnormalised + swish-softplus",
                        "swish-softplus",
                    ),
                    "swish-softplus, no gs-unnormalised": ("swish-softplus", "ReLU"),
                    "qr + swish - ReLU": ("qr + swish", "ReLU"),
                }
                x = part["cells"][part["exact_row"], lr]["ours"]
                if name == "exact - best Table 2":
                    pairs[key] = x, best
                else:
                    a, b = rows[name]
                    pairs[key] = (
                        part["cells"][a, lr]["ours"],
                        part["cells"][b, lr]["ours"],
                    )
            for key, (x, y) in pairs.items():
                t = part["tests"][key]
                assert t["diff"] == pytest.approx(np.mean(x["values"]) - y["mean"])
                _, p, df = ttest_ind(x["values"], y["values"], usevar="unequal")
                assert t["p"] == pytest.approx(p, rel=1e-9)
                assert t["df"] == pytest.approx(df, rel=1e-9)
            if pairs:
                ps = [t["p"] for t in part["tests"].values()]
                ref = multipletests(ps, method="holm")[1]
                assert [t["holm"] for t in part["tests"].values()] == pytest.approx(ref)
            n_tests += len(pairs)
    assert n_tests >= 6  # most cells of the tiny runs have a spread over seeds
    ex = report["studies"][1]["exact"][0]
    table = report["studies"][1]["tables"][0]
    cifar100 = [
        v["ours"]["mean"]
        for (ds, _, _), v in table["cells"].items()
        if ds == "cifar100" and v["ours"] is not None
    ]
    assert ex["best_table2"]["ours"]["mean"] == max(cifar100)


def test_incomplete_cells_and_bad_folders(folders, tmp_path):
    paper = tmp_path / "paper"
    shutil.copytree(folders[0], paper)
    gone = next(paper.glob("svhn_small-cnn_relu_none_lr0.001_s1_*.json"))
    gone.unlink()
    (table,) = full_scale_report([paper])["studies"][0]["tables"]
    assert table["incomplete"] == [("svhn", "baseline", 1e-3)]
    assert table["cells"]["svhn", "baseline", 1e-3]["ours"]["seeds"] == [0, 2]
    text = render_full_scale(full_scale_report([paper]))
    assert "fewer than the 3 seeds found" in text and "SVHN baseline 0.001" in text
    # one run from another commit: refused, naming what differs
    mixed = tmp_path / "mixed"
    shutil.copytree(folders[1], mixed)
    f = next(mixed.glob("cifar100_small-cnn-v2_relu_none_*_s0_*.json"))
    r = json.loads(f.read_text())
    r["git_commit"] = "0" * 40
    f.write_text(json.dumps(r))
    with pytest.raises(MixedRunsError, match="git_commit"):
        full_scale_report([folders[0], mixed])
    assert full_scale_report([mixed], allow_mixed=True)["runs"] == 18
    # a folder without runs, a missing folder, a run in two folders, a subset run
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match=f"no finished runs.*{tmp_path / 'empty'}"):
        full_scale_report([folders[0], tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        full_scale_report([tmp_path / "nowhere"])
    with pytest.raises(ResultsError, match="is in both"):
        full_scale_report([folders[0], paper])
    subset = tmp_path / "subset"
    (c,) = [
        c
        for c in table2_configs(
            ["cifar10-subset"],
            lrs=LRS,
            seeds=[0],
            model="small-cnn",
            epochs=1,
            batch_size=10,
        )
        if c.orthogonality == "none" and c.model == "small-cnn"
    ]
    run(c, subset, data=tiny_data("cifar10", 10, 4), log=None, save_model=False)
    with pytest.raises(ResultsError, match=r"not a full-scale.*cifar10-subset"):
        full_scale_report([subset])
    # a second batch size for one cell of the table: ambiguous, refused
    (c,) = [
        c
        for c in table2_configs(
            ["cifar10"], lrs=LRS, seeds=[0], model="small-cnn", epochs=1, batch_size=20
        )
        if c.orthogonality == "none" and c.model == "small-cnn"
    ]
    run(c, paper, data=tiny_data("cifar10", 10, 2), log=None, save_model=False)
    with pytest.raises(ResultsError, match="two different configurations"):
        full_scale_report([paper])


def test_environment_variable():
    assert table2_results_folders({}) is None
    assert table2_results_folders({TABLE2_RESULTS_ENV: ""}) is None
    env = {TABLE2_RESULTS_ENV: os.pathsep.join(["/a/paper", "/b/authors", ""])}
    assert table2_results_folders(env) == [Path("/a/paper"), Path("/b/authors")]


def test_rendered_text(folders):
    text = render_full_scale(full_scale_report(folders))
    lines = text.splitlines()
    assert max(map(len, lines)) <= 88
    for head in ("=== paper protocol", "=== authors protocol", "missing cells"):
        assert head in text
    # one line per Table 2 cell, the paper's numbers beside ours
    cifar10 = [ln for ln in lines if ln.startswith("CIFAR-10 ")]
    assert len(cifar10) == 2 * 2 * 3  # both protocols show the whole grid
    assert "80.3 ± 0.4" in next(ln for ln in cifar10 if "baseline" in ln)
    assert sum("gs-unnormalised + swish-softplus" in ln for ln in lines) >= 3


def chapter_cells():
    nb = jupytext.read(ROOT / "book" / "experiments.md")
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    (full,) = [s for s in code if "table2_results_folders()" in s]
    # hidden cells: the check of a report, and the glue of its count
    (check,) = [s for s in code if "def check_full_scale" in s]
    (glued,) = [s for s in code if 'glue("exp_fs_runs"' in s]
    return code[0] + "\n" + check, full + "\n" + glued


def test_the_chapter_cell_runs_with_and_without_results(folders, monkeypatch):
    """The chapter's imports and its full-scale cell, executed as the book runs them:
    without SMASO_TABLE2_RESULTS (the stored output) and with it."""
    imports, cell = chapter_cells()
    glued = {}
    torch_threads = torch.get_num_threads()
    for env in (None, os.pathsep.join(map(str, folders))):
        if env is None:
            monkeypatch.delenv(TABLE2_RESULTS_ENV, raising=False)
        else:
            monkeypatch.setenv(TABLE2_RESULTS_ENV, env)
        ns = {}
        exec(imports, ns)
        ns["glue"] = lambda k, v, display=True: glued.__setitem__(k, v)
        printed = ns["printed"] = []
        exec("def print(*a, **k):\n    printed.append(' '.join(map(str, a)))", ns)
        exec(cell, ns)
        if env is None:
            assert printed == [NO_FULL_SCALE] and glued["exp_fs_runs"] == "no"
        else:
            assert printed == [render_full_scale(full_scale_report(folders))]
            assert glued["exp_fs_runs"] == "42"
    torch.set_num_threads(torch_threads)
