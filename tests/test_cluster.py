"""Tests for smaso.experiment.cluster: a sweep as a job array through submitit, run here
with submitit's local executor (a SLURM array on a cluster): two tiny runs, one of them
preempted mid-way and requeued, resuming from its checkpoint."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from smaso.experiment import (
    checkpoint_path,
    load_checkpoint,
    load_result,
    result_path,
    run,
)

submitit = pytest.importorskip("submitit")

from helpers import SMALL_DIGITS, strip, tiny  # noqa: E402

from smaso.experiment.cluster import executor, submit  # noqa: E402


@pytest.mark.usefixtures("restore_threads")  # the test sets 1 thread
def test_job_array_one_run_per_task_requeued_on_preemption(tmp_path):
    out = tmp_path / "out"
    configs = [
        tiny(**SMALL_DIGITS, epochs=12, seed=0),
        tiny(**SMALL_DIGITS, epochs=2, seed=1),
    ]
    ex = executor(tmp_path / "logs", cluster="local", timeout_min=60)
    jobs = submit(configs, out, ex, threads=1, checkpoint_every=0)
    assert len(jobs) == 2  # one task per setting (they differ in their epochs)
    ckpt = checkpoint_path(out, configs[0])
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a checkpoint, then preempt the task
        try:
            if ckpt.exists() and load_checkpoint(ckpt)["epoch"] >= 2:
                break
        except ValueError:
            pass  # being replaced
        time.sleep(0.05)
    else:
        pytest.fail("the first task wrote no checkpoint in 300 s")
    # preempt the task: the signal SLURM sends before preemption (USR2) goes to the
    # task process (a child of submitit's local controller)
    controller = jobs[0]._process.pid
    children = Path(f"/proc/{controller}/task/{controller}/children").read_text()
    (task,) = [int(p) for p in children.split()]
    os.kill(task, signal.SIGUSR2)
    summaries = [j.result() for j in jobs]
    assert [s[0]["run_id"] for s in summaries] == [c.run_id() for c in configs]
    r = load_result(result_path(out, configs[0]))
    assert len(r["resumes"]) == 1 and 2 <= r["resumes"][0] < 12  # resumed once
    log = jobs[0].stdout() + jobs[0].stderr()
    assert "this job is preempted" in log and "Requeued job" in log
    # the requeued run computed what an uninterrupted one computes
    torch.set_num_threads(1)
    whole = run(configs[0], tmp_path / "whole", log=None)
    assert strip(r["history"]) == strip(whole["history"])
    assert load_result(result_path(out, configs[1]))["resumes"] == []
    assert submit(configs, out, ex) == []  # nothing left to submit


def test_one_task_per_structure_its_runs_together(tmp_path):
    """Each task gets the runs of one structure, its seeds and rates (packed where it
    has CUDA), or up to ``pack`` of them."""

    class Recorder:  # an executor that records what would be submitted
        def map_array(self, fn, *args):
            self.args = args
            return list(args[0])

    configs = [tiny(seed=s) for s in (0, 1, 2)] + [tiny(seed=0, lr=5e-4)]
    configs += [tiny(seed=0, batch_size=25)]  # another structure

    def runs(units):
        return [[(c["seed"], c["lr"], c["batch_size"]) for c in u] for u in units]

    ex = Recorder()
    units = submit(configs, tmp_path, ex, threads=1)
    a, b, c = (0, 1e-3, 50), (1, 1e-3, 50), (2, 1e-3, 50)
    assert runs(units) == [[a, b, c, (0, 5e-4, 50)], [(0, 1e-3, 25)]]
    assert ex.args[2] == [{"threads": 1}] * 2
    units = submit(configs, tmp_path, ex, pack=2)
    assert runs(units) == [[a, b], [c, (0, 5e-4, 50)], [(0, 1e-3, 25)]]
