"""What every result, checkpoint and benchmark of the package is written with, and the
one record of where it was made. The ground floor: this module imports nothing of the
experiment pipeline, so a study or a benchmark can write a file without loading it.

* :func:`write_json_atomic` and :func:`save_torch_atomic`: a temporary file in the same
  folder, fsynced, then renamed (or hard-linked) into place, so a reader sees the old
  file or the new one, never half of one; an existing result is never overwritten
  unless asked.
* :func:`provenance`: the date, versions, machine and git commit of a measurement, one
  dict for the Table 2 runner, the two studies and the benchmarks.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import uuid
from functools import cache
from pathlib import Path

import torch

from . import __version__

__all__ = [
    "ROOT",
    "book_results",
    "cpu_name",
    "git_commit",
    "now",
    "provenance",
    "save_torch_atomic",
    "write_json_atomic",
]


#: The project's root (the checkout this package runs from): the one place the studies'
#: stored results are found from.
ROOT = Path(__file__).resolve().parents[1]


def book_results(study: str) -> Path:
    """The folder of a study's stored results, ``book/results/STUDY``, that its chapter
    loads (a study's functions take another folder as ``out_dir``)."""
    return ROOT / "book" / "results" / study


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_json_atomic(path, obj, overwrite: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file in the same
    folder, fsynced, then moved into place): a reader sees the old file or the new one,
    never half of one. With ``overwrite=False`` an existing ``path`` raises
    ``FileExistsError`` and is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; not overwriting it")
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _link_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (a hard link is atomic
    and fails if ``path`` appeared in the meantime)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; not overwriting it") from None
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting it") from None
        os.replace(tmp, path)


def save_torch_atomic(obj, path) -> Path:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # killed while writing (e.g. a preemption signal): no stray file
        tmp.unlink(missing_ok=True)
    return path


@cache
def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout this package runs from, or (None, None)."""

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty if commit else None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now() -> str:
    """The UTC time now, to the second, in ISO 8601."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def provenance(threads: bool = True) -> dict:
    """Where and with what a result was made: UTC date, torch, Python and smaso
    versions, architecture (``machine``), CPU model name, CPU count, the ATen CPU
    capability the kernels run with (``ATEN_CPU_CAPABILITY``), torch's intra-op thread
    count now (left out with ``threads=False``, for a result that records it per run)
    and the git commit of the checkout (and whether tracked files differ from it).

    Args:
        threads: record torch's thread count (``threads``; default True).

    Returns:
        a dict with the keys ``date``, ``torch``, ``python``, ``smaso``, ``machine``,
        ``cpu``, ``cpu_count``, ``cpu_capability``, ``threads`` (unless
        ``threads=False``), ``git_commit`` and ``git_dirty``.

    Example::

        >>> from smaso.records import provenance
        >>> sorted(provenance())[:3]
        ['cpu', 'cpu_capability', 'cpu_count']
        >>> "threads" in provenance(threads=False)
        False
    """
    commit, dirty = git_commit()
    record = {
        "date": now(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "smaso": __version__,
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "git_commit": commit,
        "git_dirty": dirty,
    }
    if not threads:
        del record["threads"]
    return record
