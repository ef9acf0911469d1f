"""Cost of exactly orthogonal convolutions (Theorem 4 for convolutions; Section 6,
future work 4): one run, on CPU.

One full training step (forward, cross-entropy, backward, Adam) of the circular smallCNN
of :func:`smaso.experiment.convstudy.circular_small_cnn` on a random CPU batch of
3x32x32 images, in each arm: plain circular convolutions (the baseline), QR-orthonormal
filters, the Cayley operator applied by FFT (:class:`smaso.orthoconv.CircularConv2d`),
BCOP, and the Cayley operator applied as the plain ``nn.Conv2d`` its dense kernel is
(fewer rounds: it is slow). Also the parametrisation alone (weight -> kernel, forward
and backward) for each of the three convolutions.

Timings are interleaved (one step of every arm per round) and summarised by the median
of process CPU time, so that a change in the machine's load affects all arms alike.
Prints a table and writes benchmarks/results/orthoconv.json (the previous file is kept
as orthoconv.json.bak).

    .venv/bin/python benchmarks/orthoconv.py [--threads 1] [--batch 64] [--repeats 7]
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
from smaso.experiment.convstudy import circular_small_cnn
from smaso.orthoconv import full_kernel_size, register_cayley

OUT = Path(__file__).resolve().parent / "results" / "orthoconv.json"
ARMS = ["none", "qr", "cayley", "bcop", "cayley-spatial"]
SLOW = {"cayley-spatial"}


def spatial_cayley_cnn():
    """The Cayley arm with each layer a plain ``nn.Conv2d`` holding the dense kernel."""
    model = circular_small_cnn("none")
    n = 32
    for i, m in enumerate(model):
        if isinstance(m, nn.Conv2d):
            K = full_kernel_size(n)
            conv = nn.Conv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size[0],
                padding=(K - 1) // 2,
                padding_mode="circular",
            )
            with torch.no_grad():
                conv.weight.copy_(m.weight)
                conv.bias.copy_(m.bias)
            model[i] = register_cayley(conv, n)
        elif isinstance(m, nn.MaxPool2d):
            n //= 2
    return model


def step(arm, x, y):
    torch.manual_seed(0)
    model = spatial_cayley_cnn() if arm == "cayley-spatial" else circular_small_cnn(arm)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def run():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run, model


def weight_step(conv):
    """Forward + backward of the parametrisation alone (weight -> kernel)."""
    raw = conv.parametrizations.weight.original
    param = conv.parametrizations.weight[0]
    up = torch.randn_like(param(raw.detach()))

    def run():
        raw.grad = None
        (param(raw) * up).sum().backward()

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--slow-repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if min(args.threads, args.batch, args.repeats, args.slow_repeats) < 1:
        p.error("--threads, --batch, --repeats and --slow-repeats must be positive")
    torch.set_num_threads(args.threads)
    load0 = loadavg()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    steps, models = {}, {}
    for arm in ARMS:
        steps[arm], models[arm] = step(arm, x, y)
    weights = {
        (arm, i): weight_step(m)
        for arm in ("qr", "cayley", "bcop")
        for i, m in enumerate(c for c in models[arm] if isinstance(c, nn.Conv2d))
    }
    cpu = {a: [] for a in ARMS}
    wall = {a: [] for a in ARMS}
    wcpu = {k: [] for k in weights}
    for r in range(args.repeats + 1):  # round 0 is a warm-up
        for arm in ARMS:
            if arm in SLOW and r > args.slow_repeats:
                continue
            w, c = timed(steps[arm])
            print(f"  round {r} {arm:15s} cpu {c:7.3f} s", flush=True)
            if r:
                cpu[arm].append(c)
                wall[arm].append(w)
        for k, fn in weights.items():
            _, c = timed(fn)
            if r:
                wcpu[k].append(c)
    base = statistics.median(cpu["none"])
    base_wall = statistics.median(wall["none"])
    cnn = [
        {
            "arm": a,
            "s": statistics.median(cpu[a]),
            "ratio_to_baseline": statistics.median(cpu[a]) / base,
            "wall_ratio_to_baseline": statistics.median(wall[a]) / base_wall,
            "cpu_s": cpu[a],
            "wall_s": wall[a],
        }
        for a in ARMS
    ]
    params = [
        {"arm": arm, "layer": i, "ms": 1e3 * statistics.median(v)}
        for (arm, i), v in wcpu.items()
    ]
    results = {
        "description": "CPU cost of orthogonal convolutions: circular smallCNN "
        "training steps (median process CPU time, s; ratios to the plain circular "
        "network) and the parametrisations alone (ms, forward + backward)",
        **metadata(),
        "loadavg_start": load0,
        "loadavg_end": loadavg(),
        "batch": [args.batch, 3, 32, 32],
        "repeats": args.repeats,
        "slow_repeats": args.slow_repeats,
        "cnn": cnn,
        "parametrizations": params,
        "total_s": time.perf_counter() - t0,
    }
    print(
        f"\nthreads = {results['threads']}, batch {args.batch}x3x32x32, median of "
        f"{args.repeats} rounds of process CPU time (load {load0[0]:.1f} at start)"
    )
    print(f"{'arm':>15s} {'s/step':>8s} {'x plain':>8s} {'(wall x)':>9s}")
    for r in cnn:
        print(
            f"{r['arm']:>15s} {r['s']:8.3f} {r['ratio_to_baseline']:8.2f} "
            f"{r['wall_ratio_to_baseline']:9.2f}"
        )
    for r in params:
        print(f"parametrization {r['arm']:7s} conv{r['layer'] + 1}: {r['ms']:7.2f} ms")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
