"""Command line of the Table 2 pipeline (Section 5): ``python -m smaso run | sweep
table2 | table``.

    python -m smaso run --dataset cifar10 --model large-cnn-code --orthogonality filters
    --lr 1e-3 --out results/ python -m smaso sweep table2 --out results/table2 [--shard
    0/4 | --shard slurm] [--list] python -m smaso table results/table2

``run`` trains one configuration (skipped if finished, resumed if a checkpoint exists);
``sweep table2`` runs every configuration of Table 2 (or one shard of them); ``table``
aggregates the results files of a folder into Table 2's layout. See
:mod:`smaso.experiment`.
"""

from __future__ import annotations

import argparse
import sys

from .data import DATASETS, PREPROCESS
from .experiment import (
    MODELS,
    PRECISIONS,
    TABLE2_LRS,
    CheckpointError,
    ResultsError,
    RunConfig,
    format_table,
    load_results,
    parse_shard,
    run,
    run_status,
    shard,
    sweep,
    table2,
    table2_configs,
)
from .models import ACTIVATIONS, ORTHOGONALITY
from .orthogonal import PENALTIES


def _floats(text):
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _seeds(text):
    """ "5" -> seeds 0..4; "0,3,7" -> those seeds."""
    try:
        if "," in text:
            return [int(v) for v in text.split(",") if v]
        return list(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a seed count (5) or a list (0,3,7), got {text!r}"
        ) from None


def _names(allowed):
    def parse(text):
        names = [v for v in text.split(",") if v]
        bad = [v for v in names if v not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {bad or text!r}; choose from {', '.join(allowed)}"
            )
        return names

    return parse


def _runtime_args(p):
    g = p.add_argument_group("where and how to run")
    g.add_argument(
        "--out",
        required=True,
        help="results folder (one RUN_ID.json per run, checkpoints/, models/)",
    )
    g.add_argument(
        "--data-root",
        help="folder holding the torchvision datasets (default: $SMASO_DATA, else ./data)",
    )
    g.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download missing datasets (off by default)",
    )
    g.add_argument(
        "--subset-path",
        help="cifar10-subset.npz (default: $SMASO_CIFAR10_SUBSET or ../shared/data)",
    )
    g.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if present), cpu, cuda, cuda:1, ...",
    )
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument(
        "--no-save-model",
        dest="save_model",
        action="store_false",
        help="do not keep the trained weights (out/models/RUN_ID.pt)",
    )
    g.add_argument("--quiet", action="store_true", help="no per-epoch lines")


def _common_args(p):
    g = p.add_argument_group("training options shared by every run")
    g.add_argument(
        "--epochs", type=int, default=120, help="epochs per run (authors' code: 120)"
    )
    g.add_argument(
        "--batch-size", type=int, help="default: the authors' (50; 100 for CIFAR-100)"
    )
    g.add_argument(
        "--preprocess",
        choices=PREPROCESS,
        default="authors",
        help="authors: per image, minus mean, over max |x| (default); standardize: per channel",
    )
    g.add_argument(
        "--no-balanced",
        dest="balanced",
        action="store_false",
        help="shuffle the training set instead of class-balanced batches",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 autocast on CUDA",
    )
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument(
        "--bn-momentum",
        type=float,
        default=0.01,
        help="batch-norm running-average momentum (0.01 = TensorFlow's decay 0.99, the authors')",
    )
    g.add_argument(
        "--upsample",
        type=int,
        default=1,
        help="repeat pixels (e.g. 2 for 16x16 digits)",
    )
    g.add_argument("--limit-train", type=int, help="keep the first N training images")
    g.add_argument("--limit-test", type=int, help="keep the first N test images")


def _common(a):
    return dict(
        batch_size=a.batch_size,
        preprocess=a.preprocess,
        balanced=a.balanced,
        precision=a.precision,
        dtype=a.dtype,
        bn_momentum=a.bn_momentum,
        upsample=a.upsample,
        limit_train=a.limit_train,
        limit_test=a.limit_test,
    )


def _runtime(a):
    return dict(
        data_root=a.data_root,
        download=a.download,
        subset_path=a.subset_path,
        device=a.device,
        threads=a.threads,
        save_model=a.save_model,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smaso", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train one configuration")
    r.add_argument("--dataset", choices=DATASETS, default="cifar10")
    r.add_argument(
        "--model",
        choices=MODELS,
        default="large-cnn-code",
        help="small-cnn(-v2), large-cnn-code(-v2): the authors' code; large-cnn: Appendix D's listing",
    )
    r.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="relu",
        help="swish: learnable β-VQ ReLU per channel",
    )
    r.add_argument(
        "--orthogonality",
        choices=ORTHOGONALITY,
        default="none",
        help="none; a penalty (filters: the paper's, templates: the authors' code's); exact: qr, gs, mgs",
    )
    r.add_argument("--lam", type=float, default=1.0, help="penalty weight λ (paper: 1)")
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--seed", type=int, default=0)
    _common_args(r)
    _runtime_args(r)

    s = sub.add_parser(
        "sweep", help="run every configuration of a study (skips finished runs)"
    )
    s.add_argument(
        "study",
        choices=["table2"],
        help="table2: Table 2 and the exactly orthogonal + swish row",
    )
    s.add_argument(
        "--datasets",
        type=_names(DATASETS),
        default=["cifar10", "cifar100", "svhn"],
        help="comma-separated (default: cifar10,cifar100,svhn)",
    )
    s.add_argument(
        "--lrs",
        type=_floats,
        default=list(TABLE2_LRS),
        help="comma-separated (default: 1e-3,5e-4,1e-4)",
    )
    s.add_argument(
        "--seeds",
        type=_seeds,
        default=list(range(5)),
        help="a count (5: seeds 0-4) or a list (0,3)",
    )
    s.add_argument(
        "--model",
        choices=MODELS,
        default="large-cnn-code",
        help="network of the Table 2 rows",
    )
    s.add_argument(
        "--penalty",
        choices=PENALTIES,
        default="filters",
        help="filters: the paper's (default); templates: the authors' code's",
    )
    s.add_argument("--lam", type=float, default=1.0, help="penalty weight λ (paper: 1)")
    s.add_argument(
        "--no-exact",
        dest="exact",
        action="store_false",
        help="leave out the exactly orthogonal row",
    )
    s.add_argument(
        "--exact-model", choices=MODELS, help="default: version 2 of --model"
    )
    s.add_argument("--exact-activation", choices=ACTIVATIONS, default="swish")
    s.add_argument(
        "--exact-method",
        choices=("qr", "gs", "mgs"),
        default="qr",
        help="qr: same function as the paper's Gram-Schmidt (gs), faster",
    )
    s.add_argument(
        "--exact-datasets",
        type=_names(DATASETS),
        help="default: cifar100 if swept, else the first",
    )
    s.add_argument("--exact-lrs", type=_floats, help="default: --lrs")
    s.add_argument(
        "--exact-reference",
        action="store_true",
        help="also train --exact-model with ReLU and no orthogonality (a same-architecture baseline)",
    )
    s.add_argument(
        "--shard",
        help="i/n: run only shard i (0-based) of n; 'slurm': from SLURM_ARRAY_TASK_ID/COUNT",
    )
    s.add_argument(
        "--list",
        action="store_true",
        help="list this shard's runs and their status, train nothing",
    )
    _common_args(s)
    _runtime_args(s)

    t = sub.add_parser(
        "table",
        help="aggregate a results folder into Table 2's layout (mean ± std over seeds)",
    )
    t.add_argument("out", help="results folder")
    t.add_argument(
        "--metric",
        choices=("final_test_acc", "best_test_acc", "last_test_acc"),
        default="final_test_acc",
        help="final: mean test accuracy of the last 3 epochs (default)",
    )
    t.add_argument("--format", choices=("markdown", "text"), default="markdown")
    t.add_argument("--json", help="also write the aggregated rows to this JSON file")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    log = None if getattr(a, "quiet", False) else print
    try:
        if a.command == "run":
            cfg = RunConfig(
                dataset=a.dataset,
                model=a.model,
                activation=a.activation,
                orthogonality=a.orthogonality,
                lam=a.lam,
                lr=a.lr,
                epochs=a.epochs,
                seed=a.seed,
                **_common(a),
            )
            r = run(cfg, a.out, log=log, **_runtime(a))
            print(
                f"{r['run_id']}: final test accuracy {100 * r['final_test_acc']:.2f}% "
                "(mean of the last 3 epochs), "
                f"best {100 * r['best_test_acc']:.2f}%"
            )
        elif a.command == "sweep":
            configs = table2_configs(
                a.datasets,
                a.lrs,
                a.seeds,
                a.model,
                a.epochs,
                a.penalty,
                a.lam,
                a.exact,
                a.exact_model,
                a.exact_activation,
                a.exact_method,
                a.exact_datasets,
                a.exact_lrs,
                a.exact_reference,
                **_common(a),
            )
            i, n = parse_shard(a.shard)
            mine = shard(configs, i, n)
            print(
                f"table2: {len(configs)} runs in all; shard {i}/{n}: {len(mine)} runs"
            )
            if a.list:
                for c in mine:
                    print(f"{run_status(a.out, c):8s} {c.run_id()}")
                return 0
            sweep(mine, a.out, log=print, epoch_lines=not a.quiet, **_runtime(a))
        else:
            rows = table2(load_results(a.out), a.metric)
            if not rows:
                print(f"no results in {a.out}")
                return 1
            print(format_table(rows, fmt=a.format))
            if a.json:
                from .experiment import write_json_atomic

                write_json_atomic(a.json, rows, overwrite=True)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        ResultsError,
        CheckpointError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
