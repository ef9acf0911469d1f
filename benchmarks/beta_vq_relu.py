"""Benchmark: forward + backward of the β-VQ ReLU (learnable β per channel) against
nn.SiLU.

One run, on the CPU, on a (256, 96, 32, 32) float32 tensor (the issue's size), reported
as ratios of median times measured in the same run, interleaved so that load changes hit
every variant. Writes benchmarks/results/beta_vq_relu.json (atomically; the previous
file is kept as .bak).

    .venv/bin/python benchmarks/beta_vq_relu.py [--shape 256 96 32 32] [--repeats 7]
    [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from smaso.activations import BetaVQReLU

RESULTS = Path(__file__).resolve().parent / "results" / "beta_vq_relu.json"


def step_time(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one forward + backward (gradients w.r.t. the input and the module's β)."""
    x.grad = None
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    module(x).backward(grad)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[256, 96, 32, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = tuple(args.shape)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    C = shape[1]
    variants = {
        "nn.SiLU": nn.SiLU(),
        "BetaVQReLU (eager autograd)": BetaVQReLU(C),
        "BetaVQReLU (fused: custom backward, torch.compile)": BetaVQReLU(C, fused=True),
        "BetaVQReLU (fused, beta fixed: no dbeta reduction)": BetaVQReLU(
            C, fused=True, learnable=False
        ),
    }
    # correctness first: every variant computes SiLU at beta = 1/2, with the same input
    # gradient
    ref_y = nn.functional.silu(x.detach())
    for name, m in variants.items():
        y = m(x)
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5, msg=name)
    t0 = time.perf_counter()
    for m in variants.values():  # warm-up (includes torch.compile's code generation)
        step_time(m, x, grad)
    warmup = time.perf_counter() - t0
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, m in variants.items():
            times[name].append(step_time(m, x, grad))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["nn.SiLU"]
    print(
        f"forward+backward on {shape} float32, CPU, {args.threads} threads, median of "
        f"{args.repeats}"
    )
    for name, t in med.items():
        print(f"  {name:52s} {1e3 * t:8.1f} ms   {t / base:5.2f}x nn.SiLU")
    result = {
        "benchmark": "beta-VQ ReLU vs nn.SiLU, forward+backward",
        "shape": list(shape),
        "dtype": "float32",
        "device": "cpu",
        "threads": args.threads,
        "repeats": args.repeats,
        "median_seconds": med,
        "ratio_to_silu": {name: t / base for name, t in med.items()},
        "warmup_seconds": warmup,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "target_ratio": 1.3,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():
        args.out.replace(args.out.with_suffix(".json.bak"))
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
