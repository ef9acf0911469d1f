"""Table 2 (Section 5) at full scale: the runs of ``python -m smaso sweep table2``,
read back from their folders and set beside the paper's numbers.

The chapter "Experiments" runs Table 2's protocol at subset scale on a CPU; the full
grid (SVHN, CIFAR-10, CIFAR-100, the largeCNN, 120 epochs, 5 seeds) needs a GPU. Whoever
ran it points the book at the results folder(s) with the environment variable
:data:`TABLE2_RESULTS_ENV` (``SMASO_TABLE2_RESULTS``: one or more folders separated by
``os.pathsep``, e.g. one per protocol), and the chapter shows:

* every cell of Table 2 (dataset x {baseline, Ortho} x learning rate): mean ± std over
  seeds and the seed count, the paper's mean ± std, and ours minus the paper's; cells
  with no run are listed as missing, never filled in;
* the exactly orthogonal + swish row on CIFAR-100 against the paper's single run
  (61.2 %, Section 5 after Table 2) and, when the sweep ran it (``--exact-control``, on
  by default under ``--protocol authors``), its 2x2 control {swish, ReLU} x {exact,
  none};
* the checks of the subset section: Welch's t-test of each difference with Holm's
  correction per family (:func:`smaso.stats.welch_family`): Ortho - baseline at each
  dataset and rate; the effects of the 2x2; and the exact row against the best Table 2
  cell of its dataset, the comparison behind the paper's gain.

:func:`full_scale_report` computes all of it, :func:`render_full_scale` prints it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..data import DATASETS, TABLE2_DATASETS
from ..filters import EXACT
from ..orthogonal import PENALTIES
from ..stats import welch_family
from .config import (
    PAPER_GS_SWISH_CIFAR100,
    PAPER_TABLE2,
    PROTOCOLS,
    TABLE2_LRS,
)
from .store import ResultsError, load_results
from .study import METRICS, PROVENANCE, MixedRunsError, table2

__all__ = [
    "NO_FULL_SCALE",
    "TABLE2_DATASETS",
    "TABLE2_RESULTS_ENV",
    "full_scale_report",
    "load_full_scale",
    "render_full_scale",
    "table2_results_folders",
]

#: The environment variable naming the folders of the full-scale runs.
TABLE2_RESULTS_ENV = "SMASO_TABLE2_RESULTS"
#: What the chapter prints when no full-scale results are given.
NO_FULL_SCALE = (
    f"no full-scale results given ({TABLE2_RESULTS_ENV} is not set); see the README"
)
_NAMES = {name: d.display for name, d in DATASETS.items()}
# fields that do not tell a Table 2 row from the exact rows of the same study: the
# per-row ones, the dataset's batch size, and what the protocol fills in per run
_ROW_FIELDS = {"dataset", "batch_size", "activation", "orthogonality", "lam"} | set(
    PROTOCOLS["paper"].run
)


def table2_results_folders(environ: Mapping | None = None) -> list[Path] | None:
    """The folders named by ``SMASO_TABLE2_RESULTS`` (separated by ``os.pathsep``), or
    None when it is unset or empty."""
    env = os.environ if environ is None else environ
    text = env.get(TABLE2_RESULTS_ENV, "")
    folders = [Path(p).expanduser() for p in text.split(os.pathsep) if p.strip()]
    return folders or None


def load_full_scale(folders) -> list[dict]:
    """Every run of ``folders`` (:func:`~smaso.experiment.load_results`), each with the
    folder it came from (``"folder"``).

    Raises ``FileNotFoundError`` for a folder that does not exist, and
    :class:`~smaso.experiment.ResultsError` for a folder with no finished run, a run
    found in two folders, and a run that is not full scale (a dataset other than
    Table 2's, or a ``limit_train``/``limit_test``).
    """
    folders = [
        Path(f) for f in ([folders] if isinstance(folders, str | Path) else folders)
    ]
    if not folders:
        raise ValueError("full_scale_report needs at least one results folder")
    runs, seen = [], {}
    for folder in folders:
        found = load_results(folder)
        if not found:
            raise ResultsError(
                f"no finished runs (RUN_ID.json files) in {folder}: is it the --out "
                "folder of `python -m smaso sweep table2`?"
            )
        for r in found:
            if r["run_id"] in seen:
                raise ResultsError(
                    f"run {r['run_id']} is in both {seen[r['run_id']]} and {folder}; "
                    "keep one copy"
                )
            seen[r["run_id"]] = folder
            c = r["config"]
            small = [k for k in ("limit_train", "limit_test") if c[k] is not None]
            if c["dataset"] not in TABLE2_DATASETS or small:
                why = f"{', '.join(small)} set" if small else f"dataset {c['dataset']}"
                raise ResultsError(
                    f"{folder / (r['run_id'] + '.json')} is not a full-scale Table 2 "
                    f"run ({why}); the full-scale table takes "
                    f"{', '.join(TABLE2_DATASETS)} without limits"
                )
            runs.append({**r, "folder": str(folder)})
    return runs


def _family_key(config: dict) -> str:
    """The config without the fields that differ between the rows of one study."""
    return json.dumps(
        {k: v for k, v in config.items() if k not in _ROW_FIELDS}, sort_keys=True
    )


def _single_provenance(protocol, runs) -> dict:
    """The provenance all ``runs`` of a protocol share; :class:`MixedRunsError`
    naming the values if they differ (cells compared with each other must match)."""
    out, mixed = {}, []
    for key in PROVENANCE:
        values = [str(r.get(key)) for r in runs]
        counts = {v: values.count(v) for v in dict.fromkeys(values)}
        if len(counts) > 1:
            mixed.append(f"{key}: " + ", ".join(f"{v} x{n}" for v, n in counts.items()))
        out[key] = values[0]
    if mixed:
        raise MixedRunsError(
            f"refusing to compare the {protocol} protocol's runs: they differ in "
            + "; ".join(mixed)
        )
    return out


def _cell(c):
    keys = ("mean", "std", "n", "values", "seeds")
    return None if c is None else {k: c[k] for k in keys}


def _testable(x, y) -> bool:
    """Welch's test is defined: two values a side, and some spread (beyond rounding)."""
    return (
        x is not None
        and y is not None
        and x["n"] >= 2
        and y["n"] >= 2
        and np.ptp(x["values"]) + np.ptp(y["values"]) > 1e-9
    )


def _tests(pairs) -> dict:
    """:func:`welch_family` of the testable ``(cell, cell)`` pairs."""
    with warnings.catch_warnings():
        # SciPy warns when one side's values differ only by rounding (a cell whose
        # seeds all scored the same): its variance is then 0, as it should be
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        return welch_family(
            {
                k: (x["values"], y["values"])
                for k, (x, y) in pairs.items()
                if _testable(x, y)
            }
        )


def _lrs(found, expected):
    return sorted(set(found) | set(expected), reverse=True)


def _table2_family(protocol, rows) -> dict:
    """One study's Table 2: every dataset x setting x rate cell, the paper's beside it,
    the missing cells, and Ortho - baseline tested at each dataset and rate."""
    c0 = rows[0]["config"]
    penalties = sorted(
        {r["config"]["orthogonality"] for r in rows} & set(PENALTIES)
    ) or [PROTOCOLS[protocol].grid["penalty"]]
    settings = ["baseline", *penalties]
    lrs = _lrs([lr for r in rows for lr in r["cells"]], TABLE2_LRS)
    found = {}
    for r in rows:
        o = r["config"]["orthogonality"]
        for lr, c in r["cells"].items():
            key = (r["dataset"], "baseline" if o == "none" else o, lr)
            if key in found:  # e.g. two batch sizes: which is Table 2's?
                raise ResultsError(
                    f"{protocol} protocol: two different configurations make the cell "
                    f"{key} of one Table 2 ({r['setting']}); keep one in the folders"
                )
            found[key] = _cell(c)
    seeds = sorted({s for r in rows for c in r["cells"].values() for s in c["seeds"]})
    cells, missing, incomplete = {}, [], []
    for ds in TABLE2_DATASETS:
        for s in settings:
            for lr in lrs:
                c = found.get((ds, s, lr))
                paper = PAPER_TABLE2.get(
                    (ds, "baseline" if s == "baseline" else "ortho")
                )
                p = paper.get(lr) if paper else None
                cells[ds, s, lr] = {
                    "ours": c,
                    "paper": p,
                    "diff": c["mean"] - p[0] if c is not None and p else None,
                }
                if c is None:
                    missing.append((ds, s, lr))
                elif c["n"] < len(seeds):
                    incomplete.append((ds, s, lr))
    pairs = {
        (ds, pen, lr): (cells[ds, pen, lr]["ours"], cells[ds, "baseline", lr]["ours"])
        for ds in TABLE2_DATASETS
        for pen in penalties
        for lr in lrs
    }
    tests = _tests(pairs)
    for (ds, _pen, lr), t in tests.items():
        paper = [PAPER_TABLE2.get((ds, s), {}).get(lr) for s in ("ortho", "baseline")]
        t["paper"] = paper[0][0] - paper[1][0] if None not in paper else None
    return {
        "model": c0["model"],
        "epochs": c0["epochs"],
        "config": {
            k: v for k, v in c0.items() if k not in _ROW_FIELDS | {"lr", "seed"}
        },
        "settings": settings,
        "lrs": lrs,
        "seeds": seeds,
        "cells": cells,
        "missing": missing,
        "incomplete": incomplete,
        "tests": tests,
    }


def _exact_arms(protocol, rows) -> dict:
    """Who is who in an exact row's study: its first config, activation, method, LRs,
    the display name of each (activation, orthogonality) arm and its row."""
    grid = PROTOCOLS[protocol].grid
    configs = [r["config"] for r in rows]
    c0 = next((c for c in configs if c["orthogonality"] in EXACT), configs[0])
    act = next(
        (c["activation"] for c in configs if c["activation"] != "relu"),
        grid["exact_activation"],
    )
    method = next(
        (c["orthogonality"] for c in configs if c["orthogonality"] in EXACT),
        grid["exact_method"],
    )
    grid_lrs = grid["exact_lrs"]
    grid_lrs = grid_lrs(c0["model"]) if callable(grid_lrs) else grid_lrs
    names = {
        ("relu", "none"): "ReLU",
        (act, "none"): act,
        ("relu", method): f"{method} + ReLU",
        (act, method): f"{method} + {act}",
    }
    by = {
        (c["activation"], c["orthogonality"]): r
        for c, r in zip(configs, rows, strict=True)
    }
    unknown = set(by) - set(names)
    if unknown:
        raise ResultsError(
            f"{protocol} protocol, {c0['model']} on {c0['dataset']}: rows "
            f"{sorted(unknown)} are not the exact row's {{{act}, ReLU}} x "
            f"{{{method}, none}}"
        )
    lrs = _lrs([lr for r in rows for lr in r["cells"]], grid_lrs or TABLE2_LRS)
    return dict(c0=c0, act=act, method=method, lrs=lrs, names=names, by=by)


def _exact_cells(arms, wanted, seeds, paper) -> tuple[dict, list, list]:
    """The cells of the exact row's arms (ours, the paper's single run, their
    difference), and which are missing or have fewer than all ``seeds``."""
    names, by, exact = arms["names"], arms["by"], (arms["act"], arms["method"])
    cells, missing, incomplete = {}, [], []
    for k in wanted:
        for lr in arms["lrs"]:
            c = _cell(by[k]["cells"].get(lr)) if k in by else None
            p = (paper, None) if paper is not None and k == exact else None
            cells[names[k], lr] = {
                "ours": c,
                "paper": p,  # one run: no spread
                "diff": c["mean"] - p[0] if c is not None and p else None,
            }
            if c is None:
                missing.append((names[k], lr))
            elif c["n"] < len(seeds):
                incomplete.append((names[k], lr))
    return cells, missing, incomplete


def _exact_pairs(arms, control, cells, table) -> tuple[dict, dict | None]:
    """The pairs of cells Holm's test compares: the 2x2's effects (or the exact row
    against its ReLU twin), and the exact row against the best cell of the study's
    Table 2 on the dataset (returned too)."""
    act, method, names, lrs = arms["act"], arms["method"], arms["names"], arms["lrs"]
    exact_row = names[act, method]
    if control:
        effects = {
            f"{method}, with ReLU": (("relu", method), ("relu", "none")),
            f"{method}, with {act}": ((act, method), (act, "none")),
            f"{act}, no {method}": ((act, "none"), ("relu", "none")),
        }
    else:
        effects = {f"{exact_row} - ReLU": ((act, method), ("relu", "none"))}
    pairs = {
        (name, lr): (
            cells.get((names[a], lr), {}).get("ours"),
            cells.get((names[b], lr), {}).get("ours"),
        )
        for name, (a, b) in effects.items()
        for lr in lrs
    }
    best = None
    ds = arms["c0"]["dataset"]
    ranked = [
        (v["ours"]["mean"], s, lr)
        for (d, s, lr), v in (table["cells"].items() if table is not None else ())
        if d == ds and v["ours"] is not None
    ]
    if ranked:
        _, s, lr_best = max(ranked)
        best = {"setting": s, "lr": lr_best, **table["cells"][ds, s, lr_best]}
        for lr in lrs:
            pairs["exact - best Table 2", lr] = (
                cells[exact_row, lr]["ours"],
                best["ours"],
            )
    return pairs, best


def _exact_family(protocol, rows, table) -> dict:
    """One study's exact row on one dataset with its controls: the cells, ours minus
    the paper's single run (CIFAR-100), and, tested with Holm over them, the effects of
    the 2x2 (or the exact row against its ReLU twin) and the exact row against the best
    cell of the study's Table 2 on that dataset."""
    arms = _exact_arms(protocol, rows)
    c0, act, method = arms["c0"], arms["act"], arms["method"]
    names, by = arms["names"], arms["by"]
    # the 2x2 control (--exact-control), or the exact row with its ReLU twin or alone
    control = ("relu", method) in by or (act, "none") in by
    wanted = [k for k in names if control or k in by or k == (act, method)]
    seeds = sorted({s for r in rows for c in r["cells"].values() for s in c["seeds"]})
    ds = c0["dataset"]
    paper = PAPER_GS_SWISH_CIFAR100 if ds == "cifar100" else None
    cells, missing, incomplete = _exact_cells(arms, wanted, seeds, paper)
    pairs, best = _exact_pairs(arms, control, cells, table)
    c100 = [
        v[0]
        for s in ("baseline", "ortho")
        for v in PAPER_TABLE2["cifar100", s].values()
    ]
    return {
        "dataset": ds,
        "model": c0["model"],
        "epochs": c0["epochs"],
        "activation": act,
        "method": method,
        "control": control,
        "rows": [names[k] for k in wanted],
        "exact_row": names[act, method],
        "lrs": arms["lrs"],
        "seeds": seeds,
        "cells": cells,
        "missing": missing,
        "incomplete": incomplete,
        "paper": paper,
        # the paper's exact run over its best CIFAR-100 cell of Table 2
        "paper_gain": paper - max(c100) if paper is not None else None,
        "best_table2": best,
        "tests": _tests(pairs),
    }


def _with_seeds(rows, runs):
    """Each cell of :func:`table2`'s ``rows`` gets the seeds of its runs."""
    for row in rows:
        for lr, cell in row["cells"].items():
            cell["seeds"] = sorted(
                r["seed"]
                for r in runs
                if r["config"]["lr"] == lr
                and {k: v for k, v in r["config"].items() if k not in ("lr", "seed")}
                == row["config"]
            )
    return rows


def _study(protocol, runs, metric, allow_mixed) -> dict:
    """Everything :func:`full_scale_report` says about one protocol's runs."""
    ddof = PROTOCOLS[protocol].ddof
    rows = table2(runs, metric=metric, ddof=ddof, allow_mixed=allow_mixed)
    provenance = None if allow_mixed else _single_provenance(protocol, runs)
    rows = _with_seeds(rows, runs)
    pen_keys = {
        _family_key(r["config"])
        for r in rows
        if r["config"]["orthogonality"] in PENALTIES
    }
    exact_keys = {
        (_family_key(r["config"]), r["dataset"])
        for r in rows
        if r["config"]["orthogonality"] in EXACT or r["config"]["activation"] != "relu"
    }
    tables, exact_groups = {}, {}
    for r in rows:
        key, o = _family_key(r["config"]), r["config"]["orthogonality"]
        relu_none = o == "none" and r["config"]["activation"] == "relu"
        exact_side = (key, r["dataset"]) in exact_keys
        # a ReLU baseline is a Table 2 row (its study has penalty rows, or no exact
        # row), a row of the exact row's control (same network and dataset), or both
        if o in PENALTIES or (relu_none and (key in pen_keys or not exact_side)):
            tables.setdefault(key, []).append(r)
        if exact_side and o not in PENALTIES:
            exact_groups.setdefault((key, r["dataset"]), []).append(r)
    tables = {k: _table2_family(protocol, v) for k, v in tables.items()}
    only = next(iter(tables.values())) if len(tables) == 1 else None
    exact = [
        _exact_family(protocol, v, tables.get(key, only))
        for (key, _), v in exact_groups.items()
    ]
    return {
        "protocol": protocol,
        "ddof": ddof,
        "runs": len(runs),
        "folders": sorted({r["folder"] for r in runs}),
        "provenance": provenance,
        "tables": list(tables.values()),
        "exact": exact,
    }


def full_scale_report(
    folders, metric: str = "final_test_acc", allow_mixed: bool = False
) -> dict:
    """Table 2 and the exactly orthogonal + swish run of Section 5 at full scale, from
    the runs in ``folders`` (the ``--out`` folders of ``python -m smaso sweep table2``,
    e.g. one per protocol), beside the paper's numbers (:data:`PAPER_TABLE2`,
    :data:`PAPER_GS_SWISH_CIFAR100`).

    One entry of ``"studies"`` per protocol found, with:

    * ``provenance``: the commit, precision and torch version all its runs share
      (runs that differ: :class:`MixedRunsError`, per cell as :func:`table2` refuses
      and across the protocol's cells, which are compared; ``allow_mixed``: None);
    * ``tables``, its Table 2: every dataset x setting x learning-rate cell (``ours``:
      mean and std over seeds of ``metric`` in percent, with the protocol's ddof, n,
      the values; ``paper``: the paper's (mean, std); ``diff``: ours - paper), the
      ``missing`` cells (no run: never filled in), the ``incomplete`` ones (fewer seeds
      than the study has), and ``tests``: Welch's test of Ortho - baseline at each
      dataset and rate, Holm-corrected over them (:func:`smaso.stats.welch_family`);
    * ``exact``, per network and dataset: the exact row and, if the sweep ran it
      (``--exact-control``), its 2x2 control {activation, ReLU} x {exact, none} (else
      the ReLU twin of ``--exact-reference``, if run), its cells as Table 2's (the
      exact row's ``paper``: (61.2, None) on CIFAR-100, one run); and ``tests``,
      Holm-corrected over them: the effects of the 2x2 (or exact - ReLU twin) and the
      exact row against the best Table 2 cell of its dataset.

    A test needs two seeds a side and some spread; cells without them are not tested.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    folders = _as_list(folders)
    runs = load_full_scale(folders)
    studies = [
        _study(
            p, [r for r in runs if r["config"]["protocol"] == p], metric, allow_mixed
        )
        for p in PROTOCOLS
        if any(r["config"]["protocol"] == p for r in runs)
    ]
    return {
        "folders": [str(f) for f in folders],
        "runs": len(runs),
        "metric": metric,
        "studies": studies,
    }


def _as_list(folders) -> list[Path]:
    if isinstance(folders, str | os.PathLike):
        folders = [folders]
    return [Path(f) for f in folders]


# --------------------------------------------------------------------------------------
# as text


def _fmt_cell(c) -> str:
    return "–" if c is None else f"{c['mean']:.1f} ± {c['std']:.1f} ({c['n']})"


def _fmt_p(p) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def _fmt_seeds(seeds) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ",".join(map(str, seeds))


def _setting_name(s) -> str:
    return "baseline" if s == "baseline" else f"Ortho ({s})"


def _cell_list(keys) -> list[str]:
    return [
        " ".join(f"{k:g}" if isinstance(k, float) else _NAMES.get(k, k) for k in x)
        for x in keys
    ]


def _tests_lines(tests, head, paper_col=False) -> list[str]:
    if not tests:
        return [f"{head}: no cells with two seeds a side (and a spread) to test"]
    labels = {k: " ".join(_NAMES.get(n, n) for n in k[:-1]) for k in tests}
    w = max(12, *map(len, labels.values())) + 2
    lines = [f"{head}, Welch's t-test, Holm over {len(tests)} tests:"]
    lines.append(
        f"  {'':{w}s}{'LR':>7s}{'difference':>14s}{'p':>9s}{'p (Holm)':>10s}"
        + (f"{'paper':>8s}" if paper_col else "")
    )
    for key, t in tests.items():
        mark = " *" if t["holm"] <= 0.05 else "  "
        paper = ""
        if paper_col:
            paper = "–" if t.get("paper") is None else f"{t['paper']:+.1f}"
            paper = f"{paper:>8s}"
        lines.append(
            f"  {labels[key]:{w}s}{key[-1]:>7g}{t['diff']:>+8.1f} ± {t['se']:<3.1f}"
            f"{_fmt_p(t['p']):>9s}{t['holm']:>8.3f}{mark}{paper}".rstrip()
        )
    lines.append("  * significant at family-wise level 0.05 (Holm)")
    return lines


def _epochs(n) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def render_full_scale(report: dict) -> str:
    """:func:`full_scale_report` as text (lines of at most 88 characters): per
    protocol, Table 2 beside the paper's, the missing cells, the Ortho - baseline tests;
    the exact row (with its control) beside the paper's 61.2 %, and its tests."""
    out = [
        f"Full-scale Table 2: {report['runs']} runs from "
        f"{len(report['folders'])} folder(s); test accuracy in %, {report['metric']}"
    ]
    for st in report["studies"]:
        out.append("")
        out.append(
            f"=== {st['protocol']} protocol: {st['runs']} runs, ± std with "
            f"ddof {st['ddof']} ==="
        )
        out += [f"  from {f}" for f in st["folders"]]
        if st["provenance"]:
            pv = st["provenance"]
            out.append(
                f"  commit {pv['git_commit'][:12]}, {pv['precision']}, "
                f"torch {pv['torch']}"
            )
        for tb in st["tables"]:
            out.append("")
            out.append(
                f"Table 2: {tb['model']}, {_epochs(tb['epochs'])}, "
                f"{_fmt_seeds(tb['seeds'])}; mean ± std (n)"
            )
            out.append(
                f"{'dataset':10s}{'setting':20s}{'LR':>7s}{'ours':>18s}"
                f"{'paper':>13s}{'ours - paper':>14s}"
            )
            for (ds, s, lr), v in tb["cells"].items():
                p = v["paper"]
                paper = "–" if p is None else f"{p[0]:.1f} ± {p[1]:.1f}"
                diff = "–" if v["diff"] is None else f"{v['diff']:+.1f}"
                out.append(
                    f"{_NAMES[ds]:10s}{_setting_name(s):20s}{lr:>7g}"
                    f"{_fmt_cell(v['ours']):>18s}{paper:>13s}{diff:>14s}"
                )
            out += _missing_lines(tb)
            out += _tests_lines(
                {(_NAMES[ds], lr): t for (ds, _pen, lr), t in tb["tests"].items()},
                "Ortho - baseline",
                paper_col=True,
            )
        for ex in st["exact"]:
            out.append("")
            kind = "with its 2x2 control" if ex["control"] else "with the rows run"
            out.append(
                f"Exact row on {_NAMES[ex['dataset']]}: {ex['method']} + "
                f"{ex['activation']}, {ex['model']},"
            )
            out.append(f"  {kind}, {_epochs(ex['epochs'])}, {_fmt_seeds(ex['seeds'])}")
            if ex["paper"] is not None:
                out.append(
                    f"  the paper: {ex['paper']} % (one run; its best Table 2 cell "
                    f"of CIFAR-100 + {ex['paper_gain']:.1f})"
                )
            w = max(12, *map(len, ex["rows"])) + 2
            out.append(
                f"{'row':{w}s}{'LR':>7s}{'ours':>18s}{'paper':>8s}{'ours - paper':>14s}"
            )
            for (name, lr), v in ex["cells"].items():
                p, d = v["paper"], v["diff"]
                out.append(
                    f"{name:{w}s}{lr:>7g}{_fmt_cell(v['ours']):>18s}"
                    f"{'–' if p is None else format(p[0], '.1f'):>8s}"
                    f"{'–' if d is None else format(d, '+.1f'):>14s}"
                )
            b = ex["best_table2"]
            if b is not None:
                out.append(
                    f"  best Table 2 cell of {_NAMES[ex['dataset']]}: "
                    f"{_setting_name(b['setting'])} at {b['lr']:g}, "
                    f"{_fmt_cell(b['ours'])}"
                )
            out += _missing_lines(ex)
            out += _tests_lines(ex["tests"], "exact row")
    return "\n".join(out)


def _missing_lines(part) -> list[str]:
    lines = []
    n = len(part["seeds"])
    if part["missing"]:
        lines.append(f"missing cells (no run), {len(part['missing'])}:")
        lines += _wrapped(_cell_list(part["missing"]))
    if part["incomplete"]:
        lines.append(f"cells with fewer than the {n} seeds found:")
        lines += _wrapped(_cell_list(part["incomplete"]))
    return lines


def _wrapped(items, width=88) -> list[str]:
    lines, line = [], " "
    for it in items:
        if len(line) + len(it) + 2 > width:
            lines.append(line.rstrip(","))
            line = " "
        line += f" {it},"
    lines.append(line.rstrip(","))
    return lines
