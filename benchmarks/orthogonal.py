"""Cost of orthogonal filters (Section 5 of Balestriero & Baraniuk, ICLR 2019): one run,
on CPU.

1. Forward + backward of one weight through each exact orthogonalisation (classical
   Gram-Schmidt loop, modified Gram-Schmidt, sign-fixed QR) and through the paper's
   penalty, for a (192, 1728) and a (96, 864) weight (the 3x3 convolutions of largeCNN
   with 192 and 96 channels).
2. One full training step (forward, cross-entropy (+ penalty), backward, Adam) of the
   largeCNN of Appendix D on a random CPU batch, in each mode, against the plain
   baseline step.

Target: an exactly orthogonal largeCNN step <= 1.15x the baseline step.

Timings are interleaved (one step of every mode per round) and summarised by the median,
so that a change in the machine's load affects all modes alike. Both wall-clock and
process CPU time are recorded; the ratios use CPU time, which other processes competing
for the cores inflate much less than wall-clock time (with one thread, CPU time is the
time the step actually computed). Prints a table and writes
benchmarks/results/orthogonal.json atomically; an existing results file is kept as
orthogonal.json.bak.

    .venv/bin/python benchmarks/orthogonal.py [--threads 1] [--batch 32] [--repeats 7]
    [--template-repeats 2]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import loadavg, metadata, timed, write_results
from smaso.models import large_cnn, num_parameters
from smaso.orthogonal import (
    orthogonality_penalty,
    orthogonalize,
    penalty_loss,
    register_orthogonal,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "orthogonal.json"
WEIGHT_SHAPES = [(192, 1728), (96, 864)]
WEIGHT_MODES = ["gs", "mgs", "qr", "penalty"]
CNN_MODES = [
    "baseline",
    "penalty_filters",
    "penalty_filters_normalized",
    "penalty_templates",
    "exact_qr",
    "exact_mgs",
    "exact_gs",
]


def weight_step(W, mode, up):
    def run():
        W.grad = None
        if mode == "penalty":
            orthogonality_penalty(W).backward()
        else:
            (orthogonalize(W, mode) * up).sum().backward()

    return run


def bench_weights(repeats):
    rows = []
    for shape in WEIGHT_SHAPES:
        g = torch.Generator().manual_seed(0)
        W = torch.randn(shape, generator=g).mul_(shape[1] ** -0.5).requires_grad_(True)
        up = torch.randn(shape, generator=g)
        steps = {m: weight_step(W, m, up) for m in WEIGHT_MODES}
        times = {m: [] for m in WEIGHT_MODES}
        for r in range(repeats + 1):  # round 0 is a warm-up
            for m in WEIGHT_MODES:
                _, t = timed(steps[m])
                if r:
                    times[m].append(t)
        qr = statistics.median(times["qr"])
        for m in WEIGHT_MODES:
            med = statistics.median(times[m])
            rows.append(
                {
                    "shape": list(shape),
                    "mode": m,
                    "ms": 1e3 * med,
                    "ratio_to_qr": med / qr,
                }
            )
    return rows


def cnn_step(mode, x, y):
    torch.manual_seed(0)
    model = large_cnn()
    extra = None
    if mode.startswith("exact_"):
        register_orthogonal(model, mode.removeprefix("exact_"))
    elif mode == "penalty_filters":
        extra = penalty_loss("filters", 1.0)
    elif mode == "penalty_filters_normalized":
        extra = penalty_loss("filters_normalized", 1.0)
    elif mode == "penalty_templates":
        extra = penalty_loss("templates", 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def run():
        loss = nn.functional.cross_entropy(model(x), y)
        if extra is not None:
            loss = loss + extra(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run, num_parameters(model)


def bench_cnn(batch, repeats, template_repeats):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    steps = {}
    for m in CNN_MODES:
        steps[m], n_params = cnn_step(m, x, y)
    cpu = {m: [] for m in CNN_MODES}
    wall = {m: [] for m in CNN_MODES}
    for r in range(repeats + 1):  # round 0 is a warm-up
        for m in CNN_MODES:
            if m == "penalty_templates" and r > template_repeats:
                continue  # ~10x the others: fewer rounds
            w, c = timed(steps[m])
            print(
                f"  round {r} {m:28s} wall {w:7.3f} s  cpu {c:7.3f} s",
                file=sys.stderr,
                flush=True,
            )
            if r:
                cpu[m].append(c)
                wall[m].append(w)
    base = statistics.median(cpu["baseline"])
    base_wall = statistics.median(wall["baseline"])
    return [
        {
            "mode": m,
            "s": statistics.median(cpu[m]),
            "ratio_to_baseline": statistics.median(cpu[m]) / base,
            "cpu_s": cpu[m],
            "wall_s": wall[m],
            "wall_ratio_to_baseline": statistics.median(wall[m]) / base_wall,
        }
        for m in CNN_MODES
    ], n_params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1)"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=32,
        help="largeCNN batch of 3x32x32 images (default 32)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="timed rounds after one warm-up round (default 7)",
    )
    p.add_argument(
        "--template-repeats",
        type=int,
        default=2,
        help="timed rounds for the (slow) template penalty (default 2)",
    )
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if min(args.threads, args.batch, args.repeats, args.template_repeats) < 1:
        p.error("--threads, --batch, --repeats and --template-repeats must be positive")
    torch.set_num_threads(args.threads)
    load0 = loadavg()
    t0 = time.perf_counter()
    weights = bench_weights(args.repeats)
    cnn, n_params = bench_cnn(
        args.batch, args.repeats, min(args.template_repeats, args.repeats)
    )
    exact = {r["mode"]: r["ratio_to_baseline"] for r in cnn}
    results = {
        "description": "CPU cost of orthogonal filters: weight-level forward+backward, "
        "and largeCNN training steps; "
        "times are medians of process CPU time (s, ms), ratios use them; wall-clock "
        "kept for reference",
        **metadata(),
        "loadavg_start": load0,
        "loadavg_end": loadavg(),
        "batch": [args.batch, 3, 32, 32],
        "repeats": args.repeats,
        "template_repeats": min(args.template_repeats, args.repeats),
        "large_cnn_parameters": n_params,
        "weights": weights,
        "large_cnn": cnn,
        "target": {
            "ratio": 1.15,
            "mode": "exact_qr",
            "measured": exact["exact_qr"],
            "met": exact["exact_qr"] <= 1.15,
        },
        "total_s": time.perf_counter() - t0,
    }
    print(
        f"\nthreads = {results['threads']}, largeCNN batch = {args.batch}x3x32x32, "
        f"median of {args.repeats} rounds, "
        f"process CPU time (load average {load0[0]:.1f} at start)"
    )
    print(f"\n{'weight':>12s} {'mode':>8s} {'ms':>9s} {'x QR':>7s}")
    for r in weights:
        print(
            f"{'x'.join(map(str, r['shape'])):>12s} {r['mode']:>8s} {r['ms']:9.2f} "
            f"{r['ratio_to_qr']:7.2f}"
        )
    print(
        f"\n{'largeCNN step':>28s} {'cpu s':>7s} {'x baseline':>10s} {'(wall x)':>9s}"
    )
    for r in cnn:
        print(
            f"{r['mode']:>28s} {r['s']:7.3f} {r['ratio_to_baseline']:10.2f} "
            f"{r['wall_ratio_to_baseline']:9.2f}"
        )
    t = results["target"]
    print(
        f"\ntarget: exact_qr step <= {t['ratio']}x baseline: measured "
        f"{t['measured']:.3f}x -> "
        f"{'met' if t['met'] else 'NOT met'}"
    )
    write_results(args.out, results)


if __name__ == "__main__":
    main()
