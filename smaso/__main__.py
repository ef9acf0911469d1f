"""Command line of the Section 5 experiment: ``python -m smaso run | sweep table2 |
submit table2 | table | download | activations``.

    python -m smaso run --dataset cifar10 --orthogonality filters --out results/
    python -m smaso download --datasets cifar10,cifar100,svhn
    python -m smaso sweep table2 --out results/table2 [--shard 0/4 | --shard slurm]
    python -m smaso submit table2 --out results/table2 --partition gpu --timeout-min 600
    python -m smaso table results/table2

``run`` trains one configuration (skipped if finished, resumed if a checkpoint exists);
``sweep table2`` runs every configuration of Table 2 (or one shard of them); ``submit
table2`` sends them to SLURM as one job array through submitit; ``table`` aggregates
the results files of a folder into Table 2's layout; ``download`` fetches the datasets
once; ``activations`` is chapter 7's study. Every option of a run is a field of
:class:`smaso.experiment.RunConfig` (of the grid, :class:`smaso.experiment.Table2Grid`;
of where it runs, :class:`smaso.experiment.Runtime`): the options, their help, choices
and defaults are read from those fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .experiment import (
    CheckpointError,
    MixedRunsError,
    ResultsError,
    RunClaimedError,
    RunConfig,
    Runtime,
    Table2Grid,
    download,
    format_table,
    load_results,
    parse_shard,
    run,
    run_status,
    shard,
    subset_study,
    sweep,
    table2,
    table2_configs,
    write_json_atomic,
)
from .experiment.config import config_fields
from .experiment.frame import add_options, picked
from .experiment.study import METRICS


def _where(p):
    g = p.add_argument_group("where and how to run")
    g.add_argument(
        "--out",
        required=True,
        help="results folder (one RUN_ID.json per run, checkpoints/, models/)",
    )
    add_options(g, dataclasses.fields(Runtime))
    g.add_argument("--quiet", action="store_true", help="no per-epoch lines")


def _grid_args(p):
    p.add_argument(
        "study",
        choices=["table2", "subset"],
        help="table2: Table 2 and the exactly orthogonal + swish row; subset: the "
        "chapter's subset-scale study of --protocol (grid options do not apply)",
    )
    add_options(p.add_argument_group("the grid"), dataclasses.fields(Table2Grid))
    add_options(p.add_argument_group("options of every run"), config_fields(rows=False))


def _sweep_parser(sub) -> None:
    s = sub.add_parser(
        "sweep", help="run every configuration of a study (skips finished runs)"
    )
    _grid_args(s)
    s.add_argument(
        "--shard",
        help="i/n: only shard i (0-based) of n; slurm: from SLURM_ARRAY_TASK_ID/COUNT",
    )
    s.add_argument(
        "--list",
        action="store_true",
        help="list this shard's runs and their status, train nothing",
    )
    s.add_argument(
        "--retry-failed",
        action="store_true",
        help="train again the runs that failed before (RUN_ID.failed.json)",
    )
    _where(s)


def _submit_parser(sub) -> None:
    b = sub.add_parser(
        "submit",
        help="submit a study's unfinished runs as one SLURM job array (submitit)",
    )
    _grid_args(b)
    c = b.add_argument_group("the job array (submitit)")
    c.add_argument("--folder", help="submitit's logs (default: OUT/submitit)")
    c.add_argument(
        "--cluster",
        choices=("slurm", "local", "debug"),
        help="default: slurm where sbatch exists, else local",
    )
    c.add_argument("--timeout-min", type=int, default=600, help="per task")
    c.add_argument("--partition", help="SLURM partition")
    c.add_argument("--gpus-per-node", type=int, default=1)
    c.add_argument("--cpus-per-task", type=int, default=8)
    c.add_argument("--array-parallelism", type=int, help="tasks running at once")
    _where(b)


def _table_parser(sub) -> None:
    t = sub.add_parser(
        "table",
        help="aggregate a results folder into Table 2's layout (mean ± std over seeds)",
    )
    t.add_argument("out", help="results folder")
    t.add_argument(
        "--metric",
        choices=METRICS,
        default="final_test_acc",
        help="final: mean test accuracy of the last 3 epochs (default)",
    )
    t.add_argument("--format", choices=("markdown", "text"), default="markdown")
    t.add_argument(
        "--ddof",
        type=int,
        choices=(0, 1),
        default=1,
        help="± convention: 1 sample std (default), 0 as the authors' plot script",
    )
    t.add_argument(
        "--allow-mixed",
        action="store_true",
        help="average runs of different commits, precisions or torch versions",
    )
    t.add_argument("--json", help="also write the aggregated rows to this JSON file")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smaso", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train one configuration")
    add_options(r.add_argument_group("the run"), config_fields())
    _where(r)

    _sweep_parser(sub)
    _submit_parser(sub)
    _table_parser(sub)

    d = sub.add_parser(
        "download", help="fetch the torchvision datasets once, before a sweep"
    )
    fields = [*dataclasses.fields(Table2Grid), *dataclasses.fields(Runtime)]
    add_options(d, [f for f in fields if f.name in ("datasets", "data_root")])

    sub.add_parser(
        "activations",
        help="chapter 7's activation study (run | bench | summary; see --help there)",
        add_help=False,
    ).add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _configs(a):
    if a.study == "subset":
        return subset_study(getattr(a, "protocol", "paper"))
    grid = picked(a, Table2Grid)
    common = picked(a, RunConfig)
    return table2_configs(
        grid.pop("datasets", Table2Grid.datasets),
        grid.pop("lrs", Table2Grid.lrs),
        grid.pop("seeds", Table2Grid.seeds),
        **grid,
        **common,
    )


def _submit(a, configs):
    from pathlib import Path

    from .experiment.cluster import executor, submit

    params = dict(
        timeout_min=a.timeout_min,
        gpus_per_node=a.gpus_per_node,
        cpus_per_task=a.cpus_per_task,
    )
    if a.partition:
        params["slurm_partition"] = a.partition
    if a.array_parallelism:
        params["slurm_array_parallelism"] = a.array_parallelism
    folder = a.folder or Path(a.out) / "submitit"
    jobs = submit(
        configs, a.out, executor(folder, a.cluster, **params), **picked(a, Runtime)
    )
    print(f"{a.study}: {len(configs)} runs, {len(jobs)} submitted (logs in {folder})")
    for j in jobs:
        print(j.job_id)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["activations"]:
        from .experiment.activation_study import main as study

        return study(argv[1:])
    a = parser().parse_args(argv)
    log = None if getattr(a, "quiet", False) else print
    try:
        if a.command == "run":
            r = run(
                RunConfig(**picked(a, RunConfig)),
                a.out,
                log=log,
                **picked(a, Runtime),
            )
            print(
                f"{r['run_id']}: final test accuracy {100 * r['final_test_acc']:.2f}% "
                "(mean of the last 3 epochs), "
                f"best {100 * r['best_test_acc']:.2f}%"
            )
        elif a.command in ("sweep", "submit"):
            configs = _configs(a)
            if a.command == "submit":
                _submit(a, configs)
                return 0
            i, n = parse_shard(a.shard)
            mine = shard(configs, i, n)
            print(f"{a.study}: {len(configs)} runs in all; ", end="")
            print(f"shard {i}/{n}: {len(mine)} runs")
            if a.list:
                for c in mine:
                    print(f"{run_status(a.out, c):8s} {c.run_id()}")
                return 0
            sweep(
                mine,
                a.out,
                log=print,
                epoch_lines=not a.quiet,
                retry_failed=a.retry_failed,
                **picked(a, Runtime),
            )
        elif a.command == "download":
            download(
                getattr(a, "datasets", Table2Grid.datasets),
                getattr(a, "data_root", None),
            )
        else:
            rows = table2(load_results(a.out), a.metric, a.ddof, a.allow_mixed)
            if not rows:
                print(f"no results in {a.out}")
                return 1
            print(format_table(rows, fmt=a.format))
            if a.json:
                write_json_atomic(a.json, rows, overwrite=True)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        ResultsError,
        CheckpointError,
        MixedRunsError,
        RunClaimedError,
        ImportError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
