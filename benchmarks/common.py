"""What every benchmark in benchmarks/ shares: the machine and environment a result was
measured on, timing of one call, paired ratios and their median, and writing a results
JSON atomically (the previous file kept as ``.json.bak``).

Run from the repository root with ``PYTHONPATH=$PWD`` (the benchmarks import it as
``benchmarks.common``), or as a script from anywhere: each benchmark puts the repository
root on ``sys.path`` first.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from smaso.records import provenance

__all__ = [
    "METADATA_KEYS",
    "loadavg",
    "median_paired_ratio",
    "metadata",
    "paired_ratios",
    "timed",
    "write_results",
]

METADATA_KEYS = (
    "date",
    "torch",
    "python",
    "smaso",
    "machine",
    "cpu",
    "cpu_count",
    "cpu_capability",
    "threads",
    "git_commit",
    "git_dirty",
)


def metadata(threads: bool = True) -> dict:
    """The machine and environment of a measurement: :func:`smaso.records.provenance`
    (UTC date, versions, machine, CPU, ATen CPU capability, thread count unless
    ``threads=False``, git commit), the record every result of the package carries."""
    return provenance(threads=threads)


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (how busy the shared machine was)."""
    return list(os.getloadavg())


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of one call ``fn()``. Process CPU time
    is what the ratios use: other processes competing for the cores inflate it much
    less than wall-clock time (with one thread it is the time the call computed)."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[i] / b[i]`` for timings measured in pairs (the same repeat, next to each
    other), so that a change of the machine's load hits both sides of a ratio alike."""
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired timings need two equally long, nonempty sequences, got "
            f"{len(a)} and {len(b)}"
        )
    if min(b) <= 0:
        raise ValueError("the timings to divide by must be positive")
    return [x / y for x, y in zip(a, b, strict=True)]


def median_paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over repeats of ``a[i] / b[i]`` (:func:`paired_ratios`): the ratio the
    benchmarks report."""
    return statistics.median(paired_ratios(a, b))


def write_results(path, obj, keep_previous: bool = True, quiet: bool = False) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (a temporary file in the
    same folder, fsynced, then moved into place); an existing ``path`` is kept as
    ``path.json.bak`` (never silently lost; ``keep_previous=False``: replaced, for a
    file rewritten as a measurement goes). Returns ``path``."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"results go to a .json file, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2) + "\n"  # fails before anything is moved
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            bak = path.with_suffix(".json.bak")
            os.replace(path, bak)
            print(f"previous results kept as {bak}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if not quiet:
        print(f"wrote {path}")
    return path
