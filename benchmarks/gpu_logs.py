"""The GPU measurements of one H200 (2026-12-04, commit 19fe4fe; ``../shared/
measurements/h200-2026-12-04/``), read from their logs into the form of
``benchmarks/gpu.py``'s JSON, with the projected hours of both Table 2 grids computed
by :func:`benchmarks.gpu.project`: the figures the README and the Experiments chapter
quote until a run of ``benchmarks/gpu.py`` replaces them.

    python benchmarks/gpu_logs.py [FOLDER] [--out FILE.json]

The eager step times come from ``gpu.log`` (the kinds it reached before it ran out of
memory, in the order ``benchmarks/gpu.py`` measures them) and ``kinds.log`` (the
others, bf16 only); the whole-step CUDA graph from ``floor.log``; the peer (k processes
sharing the GPU) from ``peer.log``; the activations from ``act.log``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import write_results
from benchmarks.gpu import grids, project, step_kinds
from smaso.data import DATASETS

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT.parent / "shared" / "measurements" / "h200-2026-12-04"
LINE = re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s+(\d+) classes: (.*)$")


def _ms(text: str) -> dict[str, float]:
    return {k: float(v) / 1e3 for k, v in re.findall(r"(\w+) ([\d.]+) ms", text)}


def read(folder: Path) -> dict:
    kinds = step_kinds(grids(False))
    order = list(kinds.items())
    steps = {}
    lines = [s for s in (folder / "gpu.log").read_text().splitlines() if LINE.match(s)]
    for (key, c), line in zip(order, lines, strict=False):
        model, act, orth, classes, rest = LINE.match(line).groups()
        seen = (model, act, orth, int(classes))
        want = (c.model, c.activation, c.orthogonality, DATASETS[c.dataset].num_classes)
        if seen != want:
            raise ValueError(f"gpu.log line {line!r} is not the kind {key}")
        t = _ms(rest)
        row = {"source": "gpu.log"}
        for prec in ("fp32", "bf16"):
            row[f"{prec}_eager"] = {"s": t[f"{prec}_s"]}
            row[f"{prec}_eager_packed5"] = {
                "s": t[f"{prec}_packed5_s"],
                "per_run_s": t[f"{prec}_packed_per_run_s"],
            }
        steps[key] = row
    for line in (folder / "kinds.log").read_text().splitlines():
        if not line.startswith("kind: "):
            continue
        k = json.loads(line[len("kind: ") :])
        match = [
            key
            for key, c in kinds.items()
            if (c.model, c.activation, c.orthogonality, c.dataset, c.optimizer)
            == (k["model"], k["activation"], k["orth"], k["dataset"], k["optimizer"])
        ]
        if len(match) != 1:
            raise ValueError(f"kinds.log line matches {len(match)} kinds: {line}")
        row = {"source": "kinds.log", "bf16_eager": {"s": k["bf16_ms"] / 1e3}}
        if "bf16_packed5_per_run_ms" in k:
            per_run = k["bf16_packed5_per_run_ms"] / 1e3
            row["bf16_eager_packed5"] = {"s": 5 * per_run, "per_run_s": per_run}
        row["peak_gib"] = k["max_mem_gb"]
        steps.setdefault(match[0], row)
    floor = [
        json.loads(s[len("floor: ") :])
        for s in (folder / "floor.log").read_text().splitlines()
        if s.startswith("floor: ")
    ]
    peers = {}
    for s in (folder / "peer.log").read_text().splitlines():
        tag, _, rest = s.partition(": ")
        if tag in ("alone", "conc5"):
            r = json.loads(rest)
            peers.setdefault(r["kind"], {}).setdefault(tag, []).append(r["per_step_ms"])
    peer = {
        kind: {
            "alone_s": statistics.median(v["alone"]) / 1e3,
            "k": len(v["conc5"]),
            "s": max(v["conc5"]) / 1e3,
            "per_run_s": max(v["conc5"]) / 1e3 / len(v["conc5"]),
        }
        for kind, v in peers.items()
    }
    act = [
        json.loads(s)
        for s in (folder / "act.log").read_text().splitlines()
        if s.startswith("{")
    ]
    env = (folder / "env.log").read_text().splitlines()
    python, torch_version, *name = env[-1].split()
    return {
        "source": str(folder.name),
        "git_commit": "19fe4fe",
        "date": "2026-12-04",
        "device_name": " ".join(name),
        "torch": torch_version,
        "python": python,
        "steps": steps,
        "graph_floor": floor,
        "peers": peer,
        "activations": act,
        "projection": {
            "precision": "bf16",
            "pack": 5,
            "hours": project(grids(False), steps, "bf16", 5),
        },
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default=str(FOLDER))
    out = ROOT / "benchmarks/results/gpu-h200-2026-12-04.json"
    p.add_argument("--out", default=str(out))
    a = p.parse_args(argv)
    result = read(Path(a.folder))
    write_results(a.out, result)
    for name, h in result["projection"]["hours"].items():
        print(
            f"{name} grid: {h['runs']} runs, {h['alone']:.1f} h alone, "
            f"{h['packed']:.1f} h packed by 5 (bf16)"
        )
    return result


if __name__ == "__main__":
    main()
