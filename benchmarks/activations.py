"""Benchmark: forward + backward of every learnable activation against its closest
PyTorch peer, in wall-clock time, on the CPU (and on CUDA where there is a GPU).

Each learnable activation (one β per channel) runs three ways: as constructed by
default (``fused=None``: the C++ kernels of :mod:`smaso.native` or the compiled ones
of :mod:`smaso.fused` where they run), with ``fused=True`` (required) and with
``fused=False`` (eager autograd). Peers: ``nn.SiLU`` for the β-VQ ReLU and the β-VQ
maxout, ``nn.LeakyReLU``, ``nn.Tanh`` for the β-VQ absolute value x·tanh(ηx),
``nn.Hardswish`` for the Gini-VQ ReLU and ``nn.MaxPool2d`` for β-softmax pooling.

(64, 96, 32, 32) by default, with a random upstream gradient. On the CPU: float32, with
1 thread and with PyTorch's default number of threads (the machine's cores). On CUDA
(when there is a device, or ``--devices cuda``): float32 and bfloat16 inputs (the
parameters stay float32), timed by CUDA events around each step. Every repeat times
each variant next to its peer (peer first in odd repeats, last in even ones), in an
order rotated from repeat to repeat, so that changes of load (the machine may be
shared) hit both alike. The ratio reported is the median over repeats of variant time
/ peer time in wall-clock time (``wall_*``; on CUDA, the time between the events,
``cuda_*``): how long a step takes. On the CPU the same ratio in process CPU time is
kept as a second column (``cpu_*``): the CPU time of all the process's threads
together, i.e. the work a step costs, which does not shrink when it is spread over
threads and which other processes on the cores inflate less. Writes
benchmarks/results/activations.json (atomically; the previous file is kept as .bak).

    .venv/bin/python benchmarks/activations.py [--shape 64 96 32 32] [--repeats 30]
    [--threads 1 2] [--devices cpu cuda] [--only BetaVQReLU ...] [--out FILE]
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
TARGET = 1.3  # the β-VQ ReLU's default, as a multiple of nn.SiLU in wall-clock time


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


CLOCKS = {  # what each device's timings record (the first: the headline ratio)
    "cpu": ("wall", "cpu"),  # wall-clock, process CPU time
    "cuda": ("cuda",),  # CUDA events around the step
}


def cuda_timed(fn) -> tuple[float]:
    """(seconds,) between two CUDA events recorded around ``fn()`` on the current
    stream, the device idle before (the launches' time included)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return (start.elapsed_time(end) / 1e3,)


def timer(device: str):
    """The timing of one call on ``device``: :func:`benchmarks.common.timed` (wall,
    process CPU) on the CPU, :func:`cuda_timed` on CUDA (see :data:`CLOCKS`)."""
    return {"cpu": timed, "cuda": cuda_timed}[device]


def plan(devices, threads) -> list[dict]:
    """The runs to measure: on the CPU float32 with each thread count, on CUDA float32
    and bfloat16 (with PyTorch's default thread count)."""
    runs = []
    for device in devices:
        if device == "cpu":
            runs += [
                {"device": "cpu", "dtype": "float32", "threads": t} for t in threads
            ]
        elif device == "cuda":
            runs += [{"device": "cuda", "dtype": d} for d in ("float32", "bfloat16")]
        else:
            raise ValueError(f"devices are cpu and cuda, got {device!r}")
    return runs


def step_time(module: nn.Module, x: torch.Tensor, grads: dict, clock) -> tuple:
    """The times (:func:`timer`) of one forward + backward (gradients w.r.t. the input
    and the parameters)."""

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        y = module(x)
        y.backward(grads[y.shape])

    return clock(step)


def tolerance(dtype: torch.dtype) -> float:
    """How far a variant may be from the eager one, relative to the largest value:
    rounding of float32, or of bfloat16 (8 bits of mantissa)."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def check(variants: dict, x: torch.Tensor, grads: dict) -> dict:
    """{variant: largest difference from the eager variant}, over the output and the
    gradients, relative to the largest value (at least 1) of each."""
    outs = {}
    for label, m in variants.items():
        x.grad = None
        m.zero_grad(set_to_none=True)
        y = m(x)
        y.backward(grads[y.shape])
        outs[label] = [y.detach(), x.grad] + [p.grad for p in m.parameters()]
    errors = {}
    for label, out in outs.items():
        errors[label] = 0.0
        for a, b in zip(out, outs["eager (fused=False)"], strict=True):
            if a is not None and b is not None:
                a, b = a.double(), b.double()
                scale = b.abs().max().clamp(min=1)
                err = ((a - b).abs().max() / scale).item()
                errors[label] = max(errors[label], err)
    return errors


def measure(table, x, grads, repeats: int, device: str = "cpu") -> list:
    """Interleaved paired timings of every variant against its peer (see the module
    docstring); one result row per activation, with ``{clock}_ratio``, ``{clock}_ms``
    and ``{clock}_peer_ms`` for each clock of the device (:data:`CLOCKS`)."""
    clock = timer(device)
    pairs = [
        (name, peer, label, m)
        for name, _, peer, variants in table
        for label, m in variants.items()
    ]
    times = {(p[0], p[2]): [] for p in pairs}  # [(variant's, peer's) times]
    for r in range(repeats):
        k = r % len(pairs)
        for name, peer, label, m in pairs[k:] + pairs[:k]:
            if r % 2:
                tp = step_time(peer, x, grads, clock)
                tv = step_time(m, x, grads, clock)
            else:
                tv = step_time(m, x, grads, clock)
                tp = step_time(peer, x, grads, clock)
            times[name, label].append((tv, tp))
    results = []
    for name, peer_name, _, variants in table:
        row = {"activation": name, "peer": peer_name, "variants": {}}
        for label in variants:
            t = times[name, label]
            row["variants"][label] = {
                f"{kind}_{stat}": value
                for i, kind in enumerate(CLOCKS[device])
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


def measure_run(spec: dict, shape, only, repeats: int) -> dict:
    """One run of :func:`plan`: the inputs on its device and dtype, the modules checked
    against the eager ones and warmed up (compiled), then :func:`measure`."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    x = torch.randn(shape).to(device, dtype).requires_grad_()
    pooled = (*shape[:2], shape[2] // 2, shape[3] // 2)
    grads = {torch.Size(s): torch.randn(s).to(device, dtype) for s in (shape, pooled)}
    table = [
        (name, peer_name, peer.to(device), {k: m.to(device) for k, m in v.items()})
        for name, peer_name, peer, v in cases(shape[1])
        if not only or any(name.startswith(o) for o in only)
    ]
    threads = torch.get_num_threads()
    if "threads" in spec:
        torch.set_num_threads(spec["threads"])
    try:
        t0 = time.perf_counter()
        errors = {}
        for name, _, peer, variants in table:  # correctness, compilation (warm-up)
            errors[name] = check(variants, x, grads)
            for m in (peer, *variants.values()):
                step_time(m, x, grads, timer(device))
        warmup = time.perf_counter() - t0
        load = loadavg()[0]
        results = measure(table, x, grads, repeats, device)
        for row in results:
            for label, v in row["variants"].items():
                v["max_rel_err"] = errors[row["activation"]][label]
        run = {
            **spec,
            "threads": torch.get_num_threads(),
            "clocks": list(CLOCKS[device]),
            "load_average_before_after": [load, loadavg()[0]],
            "warmup_seconds": warmup,
            "tolerance": tolerance(dtype),
            "results": results,
        }
    finally:
        torch.set_num_threads(threads)
    if device == "cuda":
        run["gpu"] = torch.cuda.get_device_name()
    return run


def report(run: dict, shape, repeats: int) -> None:
    """Print one run: the headline ratio (wall-clock, or CUDA events), and on the CPU
    the process CPU time ratio beside it."""
    head, *other = run["clocks"]
    n = run["threads"]
    where = f"{n} thread{'s' * (n > 1)}" if run["device"] == "cpu" else run["gpu"]
    print(
        f"forward+backward on {tuple(shape)} {run['dtype']}, {run['device']} "
        f"({where}), median of {repeats} paired ratios of {head} time"
        + "".join(f" ({o} time)" for o in other)
        + f"; load average {run['load_average_before_after'][0]:.1f}"
    )
    for row in run["results"]:
        for label, v in row["variants"].items():
            print(
                f"  {row['activation']:24s} {label:20s} {v[head + '_ms']:8.2f} ms "
                f"{v[head + '_ratio']:6.2f}x"
                + "".join(f" ({v[o + '_ratio']:5.2f}x)" for o in other)
                + f" {row['peer']} {v[head + '_peer_ms']:.2f} ms"
            )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 96, 32, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, torch.get_num_threads()]
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"],
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only", nargs="*", help="activations whose name starts with one of these"
    )
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    runs = []
    for spec in plan(args.devices, list(dict.fromkeys(args.threads))):
        runs.append(measure_run(spec, shape, args.only, args.repeats))
        report(runs[-1], shape, args.repeats)
    result = {
        "benchmark": "learnable activations vs PyTorch peers, forward+backward",
        "shape": list(shape),
        "repeats": args.repeats,
        "ratio": "median over repeats of (variant / peer) time of one step: wall_* "
        "wall-clock time (the headline on the CPU), cpu_* process CPU time (all "
        "threads together: the work of a step), cuda_* the time between CUDA events "
        "(the headline on CUDA)",
        "runs": runs,
        "target_ratio": TARGET,
        "compile_errors": fused.compile_errors(),
        "native_kernels": native.build_error() or "built and used",
        "native_threads": native.parallel_threads(),
        **metadata(threads=False),  # the thread counts are per run
    }
    write_results(args.out, result)
    wrong = [
        (run["device"], run["dtype"], row["activation"], label, v["max_rel_err"])
        for run in runs
        for row in run["results"]
        for label, v in row["variants"].items()
        if not v["max_rel_err"] < run["tolerance"]
    ]
    if wrong:
        raise SystemExit(f"variants that differ from the eager ones: {wrong}")
    return result


if __name__ == "__main__":
    main()
