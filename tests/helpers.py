"""Set-up shared by the tests of the experiment runner and its command line
(tests/test_experiment.py, tests/test_cli.py, tests/test_cluster.py): tiny runs on
scikit-learn's digits, as a run config and as command-line flags, and run histories
without their timings."""

import importlib.util
import sys
from pathlib import Path

from smaso.experiment import RunConfig

TIMING = ("train_s", "epoch_s")
# the smallest digits run the command-line tests train: 16x16 images, the first 200
# training and 50 test images, smallCNN
SMALL_DIGITS = dict(
    dataset="digits", model="small-cnn", upsample=2, limit_train=200, limit_test=50
)


def tiny(**kw) -> RunConfig:
    """Digits at 16x16, the first 300 training and 100 test images, smallCNN,
    float64, 3 epochs (``kw`` overrides any field)."""
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
    return RunConfig(**{**base, **kw})


def strip(history) -> list[dict]:
    """A run's history without its timings (which differ from run to run)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def cli_args(**fields) -> list[str]:
    """Command-line flags of ``python -m smaso``: ``limit_train=200`` gives
    ``--limit-train 200``, ``no_exact=True`` the bare flag ``--no-exact``."""
    args = []
    for name, value in fields.items():
        args.append("--" + name.replace("_", "-"))
        if value is not True:
            args.append(str(value))
    return args


def smaso_command(*args) -> list[str]:
    """``python -m smaso ARGS`` with this interpreter (for a separate process)."""
    return [sys.executable, "-m", "smaso", *args]


ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name):
    """A script of benchmarks/ as the module ``benchmarks.NAME`` (it puts the
    repository root on sys.path), loaded once per process: the module the other
    benchmarks import (``benchmarks.common``'s functions are the same objects
    everywhere)."""
    if f"benchmarks.{name}" in sys.modules:
        return sys.modules[f"benchmarks.{name}"]
    spec = importlib.util.spec_from_file_location(
        f"benchmarks.{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


class Killed(Exception):
    """A run stopped from its ``on_epoch`` hook, as a kill would stop it."""


def run_killed_after(run, config, out, epoch: int, **runtime):
    """``run(config, out)`` stopped at the end of ``epoch`` (its checkpoint written)."""

    def kill(e, model, rec):
        if e == epoch:
            raise Killed

    try:
        run(config, out, log=None, on_epoch=kill, checkpoint_every=0, **runtime)
    except Killed:
        return
    raise AssertionError(f"the run ended before epoch {epoch}")
