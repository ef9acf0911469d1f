"""Benchmark: forward + backward of every learnable activation against its closest
PyTorch peer, on the CPU.

Each learnable activation (one β per channel) runs three ways: as constructed by
default (``fused=None``: the compiled kernels of :mod:`smaso.fused` where they run),
with ``fused=True`` (required) and with ``fused=False`` (eager autograd). Peers:
``nn.SiLU`` for the β-VQ ReLU and the β-VQ maxout, ``nn.LeakyReLU``, ``nn.Tanh`` for
the β-VQ absolute value x·tanh(ηx), ``nn.Hardswish`` for the Gini-VQ ReLU and
``nn.MaxPool2d`` for β-softmax pooling.

One run, float32, (64, 96, 32, 32) by default, with 1 thread and with PyTorch's
default number of threads. Every repeat times each variant next to its peer (peer
first in odd repeats, last in even ones), in an order rotated from repeat to repeat,
so that changes of load (the machine may be shared) hit both alike. The ratio reported
is the median over repeats of variant time / peer time, in process CPU time (which
other processes competing for the cores inflate much less than wall-clock time; with
one thread it is the time the step computed), and in wall-clock time. Writes
benchmarks/results/activations.json (atomically; the previous file is kept as .bak).

    .venv/bin/python benchmarks/activations.py [--shape 64 96 32 32] [--repeats 30]
    [--threads 1 2] [--only BetaVQReLU ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import (
    loadavg,
    median_paired_ratio,
    metadata,
    timed,
    write_results,
)
from smaso import fused, native
from smaso.activations import (
    BetaVQAbs,
    BetaVQLeakyReLU,
    BetaVQMaxout,
    BetaVQMaxPool2d,
    BetaVQReLU,
    TsallisVQReLU,
)

RESULTS = Path(__file__).resolve().parent / "results" / "activations.json"
TARGET = 1.3  # the β-VQ ReLU's default, as a multiple of nn.SiLU (issue 14)


def cases(C: int):
    """(activation, peer name, peer module, {variant: module}) for each activation."""

    def three(make):
        return {
            "default": make(),
            "fused=True": make(fused=True),
            "eager (fused=False)": make(fused=False),
        }

    relu = three(lambda **k: BetaVQReLU(C, **k))
    relu["default, beta fixed"] = BetaVQReLU(C, learnable=False)
    return [
        ("BetaVQReLU", "nn.SiLU", nn.SiLU(), relu),
        (
            "BetaVQLeakyReLU",
            "nn.LeakyReLU",
            nn.LeakyReLU(0.01),
            three(lambda **k: BetaVQLeakyReLU(0.01, C, **k)),
        ),
        ("BetaVQAbs", "nn.Tanh", nn.Tanh(), three(lambda **k: BetaVQAbs(C, **k))),
        (
            "TsallisVQReLU (alpha=2)",
            "nn.Hardswish",
            nn.Hardswish(),
            three(lambda **k: TsallisVQReLU(C, **k)),
        ),
        (
            "BetaVQMaxout (3 pieces)",
            "nn.SiLU",
            nn.SiLU(),
            three(lambda **k: BetaVQMaxout(C, 3, **k)),
        ),
        (
            "BetaVQMaxPool2d (2x2)",
            "nn.MaxPool2d",
            nn.MaxPool2d(2),
            three(lambda **k: BetaVQMaxPool2d(2, num_channels=C, **k)),
        ),
    ]


def step_time(module: nn.Module, x: torch.Tensor, grads: dict) -> tuple:
    """(wall, process CPU) seconds for one forward + backward (gradients w.r.t. the
    input and the parameters)."""

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        y = module(x)
        y.backward(grads[y.shape])

    return timed(step)


def check(name: str, variants: dict, x: torch.Tensor, grads: dict) -> None:
    """Every variant computes the same output and gradients as the eager one."""
    outs = {}
    for label, m in variants.items():
        x.grad = None
        m.zero_grad(set_to_none=True)
        y = m(x)
        y.backward(grads[y.shape])
        outs[label] = [y.detach(), x.grad] + [p.grad for p in m.parameters()]
    for label, out in outs.items():
        for a, b in zip(out, outs["eager (fused=False)"], strict=True):
            if a is not None and b is not None:
                scale = b.abs().max().clamp(min=1)
                err = ((a - b).abs().max() / scale).item()
                assert err < 1e-4, (name, label, err)


def measure(table, x, grads, repeats: int) -> list:
    """Interleaved paired timings of every variant against its peer (see the module
    docstring); one result row per activation."""
    pairs = [
        (name, peer, label, m)
        for name, _, peer, variants in table
        for label, m in variants.items()
    ]
    times = {(p[0], p[2]): [] for p in pairs}  # [(variant's, peer's) (wall, cpu)]
    for r in range(repeats):
        k = r % len(pairs)
        for name, peer, label, m in pairs[k:] + pairs[:k]:
            if r % 2:
                tp = step_time(peer, x, grads)
                tv = step_time(m, x, grads)
            else:
                tv = step_time(m, x, grads)
                tp = step_time(peer, x, grads)
            times[name, label].append((tv, tp))
    results = []
    for name, peer_name, _, variants in table:
        row = {"activation": name, "peer": peer_name, "variants": {}}
        for label in variants:
            t = times[name, label]
            row["variants"][label] = {
                f"{kind}_{stat}": value
                for i, kind in enumerate(("wall", "cpu"))
                for stat, value in (
                    (
                        "ratio",
                        median_paired_ratio([v[i] for v, _ in t], [p[i] for _, p in t]),
                    ),
                    ("ms", 1e3 * statistics.median(v[i] for v, _ in t)),
                    ("peer_ms", 1e3 * statistics.median(p[i] for _, p in t)),
                )
            }
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 96, 32, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, torch.get_num_threads()]
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only", nargs="*", help="activations whose name starts with one of these"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = tuple(args.shape)
    x = torch.randn(shape, requires_grad=True)
    pooled = (*shape[:2], shape[2] // 2, shape[3] // 2)
    grads = {torch.Size(s): torch.randn(s) for s in (shape, pooled)}
    table = [
        c
        for c in cases(shape[1])
        if not args.only or any(c[0].startswith(o) for o in args.only)
    ]
    t0 = time.perf_counter()
    for name, _, peer, variants in table:  # correctness, and compilation (warm-up)
        check(name, variants, x, grads)
        for m in (peer, *variants.values()):
            step_time(m, x, grads)
    warmup = time.perf_counter() - t0
    runs = []
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        load = loadavg()[0]
        results = measure(table, x, grads, args.repeats)
        runs.append(
            {
                "threads": threads,
                "load_average_before_after": [load, loadavg()[0]],
                "results": results,
            }
        )
        print(
            f"forward+backward on {shape} float32, CPU, {threads} threads, median "
            f"of {args.repeats} paired ratios (CPU time; wall-clock); load average "
            f"{load:.1f}"
        )
        for row in results:
            for label, v in row["variants"].items():
                print(
                    f"  {row['activation']:24s} {label:20s} {v['cpu_ms']:8.1f} ms "
                    f"{v['cpu_ratio']:6.2f}x ({v['wall_ratio']:5.2f}x) {row['peer']}"
                )
    result = {
        "benchmark": "learnable activations vs PyTorch peers, forward+backward",
        "shape": list(shape),
        "dtype": "float32",
        "device": "cpu",
        "repeats": args.repeats,
        "ratio": "median over repeats of (variant / peer) process CPU time; wall_* "
        "the same with wall-clock time",
        "runs": runs,
        "target_ratio": TARGET,
        "warmup_seconds": warmup,
        "compile_errors": fused.compile_errors(),
        "native_kernels": native.build_error() or "built and used",
        **metadata(threads=False),  # the thread counts are per run
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
