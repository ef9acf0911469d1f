"""A sweep on a cluster through submitit (optional: ``pip install 'smaso[cluster]'``):
one SLURM job array, one structure's runs per task (its seeds, learning rates and
penalty weights, trained packed on a GPU, :mod:`smaso.pack`), requeued on preemption
from its checkpoint.

:func:`submit` sends the unfinished runs of a list of configs as one job array
(``executor.map_array``), each task calling :class:`RunTask`, i.e. :func:`sweep` over
its runs (which packs them on CUDA, and records a failed run and goes on). When
SLURM preempts a task (or its time runs out) submitit signals it; :class:`RunTask`
then asks to be submitted again with the same arguments, and the requeued task resumes
the run from its last checkpoint (:func:`run` always does). The claim file of a run
(:mod:`smaso.experiment.store`) is keyed to the array task, so the requeued task takes
its own claim back. ``--shard i/n | slurm`` (:func:`smaso.experiment.sweep`) remains the
engine-free way to spread a sweep.
"""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .runner import Runtime
from .store import run_status
from .study import packs, sweep

__all__ = ["RunTask", "executor", "submit"]


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ImportError(
            "submitting to a cluster needs submitit: pip install 'smaso[cluster]' "
            "(or pip install submitit)"
        ) from None
    return submitit


class RunTask:
    """The callable a task of the array runs: :func:`sweep` over its runs (config dicts:
    a picklable task). ``checkpoint`` is submitit's hook on preemption or timeout: it
    returns the same call, to be requeued (the runs resume from their checkpoint)."""

    def __call__(self, configs: list[dict], out_dir: str, runtime: dict) -> list[dict]:
        rs = sweep(
            [RunConfig.from_dict(c) for c in configs], out_dir, log=None, **runtime
        )
        return [
            {k: r[k] for k in ("run_id", "final_test_acc", "best_test_acc")} for r in rs
        ]

    def checkpoint(self, *args, **kwargs):
        return _submitit().helpers.DelayedSubmission(RunTask(), *args, **kwargs)


def executor(folder, cluster: str | None = None, **parameters):
    """A submitit executor writing its logs into ``folder``: SLURM where ``sbatch``
    exists (``cluster=None``), else ``cluster`` ("slurm", "local", "debug").
    ``parameters`` go to ``update_parameters`` (e.g. ``timeout_min``,
    ``slurm_partition``, ``gpus_per_node``, ``slurm_array_parallelism``)."""
    submitit = _submitit()
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    if parameters:
        ex.update_parameters(**parameters)
    return ex


def submit(configs, out_dir, ex, **runtime) -> list:
    """Submit the runs of ``configs`` that have not finished as one job array on the
    submitit executor ``ex`` (:func:`executor`); the submitit jobs. Each task gets the
    runs of one structure (seeds, rates, penalty weights), up to ``pack`` of them (a
    runtime option; by default all), and
    trains them packed where it has CUDA (:func:`smaso.experiment.sweep`);
    ``runtime``: the fields of :class:`~smaso.experiment.runner.Runtime` for every
    task."""
    rt = Runtime(**runtime)  # refuse bad options before anything is submitted
    status = {c.run_id(): run_status(out_dir, c) for c in configs}
    todo = [c for c in configs if status[c.run_id()] != "done"]
    if not todo:
        return []
    units = packs(todo, status, rt.pack or len(todo))
    out = str(Path(out_dir).resolve())
    return ex.map_array(
        RunTask(),
        [[c.to_dict() for c in u] for u in units],
        [out] * len(units),
        [dict(runtime)] * len(units),
    )
