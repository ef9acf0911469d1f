"""A sweep on a cluster through submitit (optional: ``pip install 'smaso[cluster]'``):
one SLURM job array, one run per task, requeued on preemption from its checkpoint.

:func:`submit` sends the unfinished runs of a list of configs as one job array
(``executor.map_array``), each task calling :class:`RunTask`, i.e. :func:`run`. When
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
from .runner import Runtime, run
from .store import run_status

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
    """The callable a task of the array runs: one :func:`run`, from a config dict (a
    picklable task). ``checkpoint`` is submitit's hook on preemption or timeout: it
    returns the same call, to be requeued (the run itself resumes from its checkpoint
    file)."""

    def __call__(self, config: dict, out_dir: str, runtime: dict) -> dict:
        r = run(RunConfig.from_dict(config), out_dir, **runtime)
        return {k: r[k] for k in ("run_id", "final_test_acc", "best_test_acc")}

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
    submitit executor ``ex`` (:func:`executor`), one run per task; the submitit jobs.
    ``runtime``: the fields of :class:`~smaso.experiment.runner.Runtime` for every
    task."""
    Runtime(**runtime)  # refuse bad options before anything is submitted
    todo = [c for c in configs if run_status(out_dir, c) != "done"]
    if not todo:
        return []
    out = str(Path(out_dir).resolve())
    return ex.map_array(
        RunTask(),
        [c.to_dict() for c in todo],
        [out] * len(todo),
        [dict(runtime)] * len(todo),
    )
