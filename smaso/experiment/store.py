"""Where a run's files live and how they are written: one results folder per study.

    OUT/RUN_ID.json              the results of a finished run (never overwritten)
    OUT/RUN_ID.failed.json       a run that raised: its error and traceback
    OUT/checkpoints/RUN_ID.pt    the last finished epoch of a run in progress
    OUT/models/RUN_ID.pt         the trained weights of a finished run
    OUT/claims/RUN_ID.claim      which process is training the run now

Every file is written atomically (a temporary file in the same folder, then a rename or
a hard link), so a reader sees the old file or the new one, never half of one;
:func:`smaso.records.write_json_atomic` is the one JSON writer of the experiments (the
activation study's and the convolution study's too). A claim file, created
exclusively, keeps two shards from training the same run; a claim whose process died
(or that has not been touched for ``stale_after`` seconds) is taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

import torch

from ..records import (
    cpu_name,
    git_commit,
    now,
    save_torch_atomic,
    write_json_atomic,
)
from .config import RunConfig
from .frame import ResultsError, Study, read_json

__all__ = [
    "CHECKPOINT_FORMAT",
    "FAILED_FORMAT",
    "RESULT_FORMAT",
    "TABLE2",
    "CheckpointError",
    "Claim",
    "ResultsError",
    "checkpoint_path",
    "claim",
    "claim_holder",
    "claim_path",
    "cpu_name",
    "failed_path",
    "git_commit",
    "load_checkpoint",
    "load_result",
    "load_results",
    "model_path",
    "now",
    "pack_checkpoint_path",
    "result_path",
    "run_status",
    "save_torch_atomic",
    "write_json_atomic",
]

RESULT_FORMAT = "smaso-run/1"
CHECKPOINT_FORMAT = "smaso-checkpoint/1"
FAILED_FORMAT = "smaso-failed/1"
CLAIM_FORMAT = "smaso-claim/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another configuration or
    precision."""


def result_path(out_dir, config: RunConfig) -> Path:
    return TABLE2.path(config, out_dir)


def failed_path(out_dir, config: RunConfig) -> Path:
    return Path(out_dir) / f"{config.run_id()}.failed.json"


def checkpoint_path(out_dir, config: RunConfig) -> Path:
    return Path(out_dir) / "checkpoints" / f"{config.run_id()}.pt"


def pack_checkpoint_path(out_dir, configs) -> Path:
    """The checkpoint of runs trained together (:func:`smaso.experiment.run_packed`),
    named after the first run, the number of runs and a digest of all their ids."""
    ids = [c.run_id() for c in configs]
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:8]
    name = f"pack-{ids[0]}-x{len(ids)}-{digest}.pt"
    return Path(out_dir) / "checkpoints" / name


def model_path(out_dir, config: RunConfig) -> Path:
    return Path(out_dir) / "models" / f"{config.run_id()}.pt"


def claim_path(out_dir, config: RunConfig) -> Path:
    return Path(out_dir) / "claims" / f"{config.run_id()}.claim"


_RESULT_KEYS = (
    "format",
    "run_id",
    "config",
    "seed",
    "history",
    "final_test_acc",
    "best_test_acc",
    "wall_s",
    "device",
    "torch",
)


def load_result(path) -> dict:
    """Read one results JSON written by :func:`smaso.experiment.run`, its config
    completed with the fields added since it was written; ``ResultsError`` (naming the
    file, which is left in place) if it is not one."""
    path = Path(path)
    r = read_json(path)
    if not isinstance(r, dict) or r.get("format") != RESULT_FORMAT:
        raise ResultsError(
            f'{path} is not a smaso results file (no "format": "{RESULT_FORMAT}")'
        )
    missing = [k for k in _RESULT_KEYS if k not in r]
    if missing:
        raise ResultsError(f"results file {path} lacks {missing}; it was left in place")
    try:
        r["config"] = RunConfig.from_dict(r["config"]).to_dict()
    except (TypeError, ValueError) as e:
        raise ResultsError(
            f"results file {path} holds an invalid config: {e}"
        ) from None
    return r


#: Table 2 on the study frame: ``OUT/RUN_ID.json`` per run (the folder is the
#: sweep's, always passed in).
TABLE2 = Study(RunConfig, read=load_result)


def load_results(out_dir) -> list[dict]:
    """Every results file (``RUN_ID.json``) directly in ``out_dir``, sorted by run id;
    a corrupt one raises ``ResultsError`` naming it."""
    return TABLE2.load(out_dir)


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`smaso.experiment.run` (on the CPU), in its
    one format: ``configs`` and ``histories`` (a list of one for a single run; a single
    run's checkpoint written with ``config`` and ``history`` is read as such).
    ``CheckpointError`` (naming the file, which is left in place) if it cannot be
    read."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
            "it was left in place. Move or delete it to restart that run from epoch 0."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f'{path} is not a smaso checkpoint (no "format": "{CHECKPOINT_FORMAT}"); '
            "it was left in place"
        )
    if "config" in state:  # a single run's checkpoint before 2026-12-05: one format
        state["configs"] = [state.pop("config")]
        state["histories"] = [state.pop("history")]
    return state


# --------------------------------------------------------------------------------------
# claims: one process per run


def _owner() -> str:
    """Who claims: a SLURM array task (the same after a requeue), else host and pid."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm:{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead(owner: str) -> bool:
    """Whether ``owner`` is a process of this host that no longer runs."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Claim:
    """A held claim on one run: :meth:`touch` it (a heartbeat) while training,
    :meth:`release` it at the end (a context manager does)."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token

    def touch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)

    def held(self) -> bool:
        """Whether the claim file is still this claim (not taken over as stale)."""
        seen = _read_claim(self.path)
        return seen is not None and seen[0].get("token") == self.token

    def release(self) -> None:
        try:
            if self.held():
                self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_claim(path: Path):
    """(the claim's JSON, its age in seconds), or None if it vanished or is being
    written."""
    try:
        held = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return held, age


def claim(out_dir, config: RunConfig, stale_after: float = 7200.0) -> Claim | None:
    """Claim ``config``'s run in ``out_dir`` for this process: a :class:`Claim`, or
    None when another live process holds it.

    The claim file is created exclusively (``O_EXCL``), so of two processes only one
    gets it. A claim is taken over when its holder is this process's own identity (a
    requeued SLURM task), a dead process of this host, or silent for ``stale_after``
    seconds (its file's modification time; :meth:`Claim.touch` renews it). A takeover
    happens under a second exclusive file, after checking that the claim is still the
    stale one, so two processes never both take it.
    """
    path = claim_path(out_dir, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    me, token = _owner(), uuid.uuid4().hex
    body = {
        "format": CLAIM_FORMAT,
        "run_id": config.run_id(),
        "owner": me,
        "token": token,
        "since": now(),
    }
    lock = path.with_name(path.name + ".takeover")
    for _ in range(20):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f)
            return Claim(path, token)
        seen = _read_claim(path)
        if seen is None:
            time.sleep(0.05)
            continue
        held, age = seen
        owner = held.get("owner", "")
        if owner != me and not _dead(owner) and age < stale_after:
            return None
        try:
            lfd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > 60:  # its taker died
                    lock.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            continue
        try:
            again = _read_claim(path)
            if again is not None and again[0].get("token") == held.get("token"):
                write_json_atomic(path, body, overwrite=True)
                return Claim(path, token)
        finally:
            os.close(lfd)
            lock.unlink(missing_ok=True)
    return None


def claim_holder(out_dir, config: RunConfig, stale_after: float = 7200.0):
    """Who holds a live claim on the run (a process that is not dead and touched it
    within ``stale_after`` seconds), or None."""
    seen = _read_claim(claim_path(out_dir, config))
    if seen is None:
        return None
    (held, age), me = seen, _owner()
    owner = held.get("owner", "")
    if owner == me or _dead(owner) or age >= stale_after:
        return None
    return owner


def run_status(out_dir, config: RunConfig) -> str:
    """ "done" (results file present), "failed" (a failure record, no results),
    "claimed" (a live process holds it now), "partial" (a checkpoint) or "todo"."""
    if result_path(out_dir, config).exists():
        return "done"
    if failed_path(out_dir, config).exists():
        return "failed"
    if claim_holder(out_dir, config) is not None:
        return "claimed"
    return "partial" if checkpoint_path(out_dir, config).exists() else "todo"
