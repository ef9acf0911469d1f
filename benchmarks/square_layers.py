"""Square exact layers in a long Adam run (Section 5, Table 2's exactly orthogonal
rows): how often the residual of a filter (the diagonal of R, the Gram-Schmidt norm)
changes sign or reaches the rank tolerance, without and with re-anchoring
(:func:`smaso.orthogonal.reanchor_`). CPU, a few minutes per run.

A layer with as many filters as inputs (largeCNN's last 1x1 192->192 convolution) has
its last orthonormal filter fixed, up to sign, by the others; the sign is that of the
raw filter's residual ``R_nn``, which can cross zero. Stand-in: a multilayer perceptron
on scikit-learn's digits, whose 64 pixels make its three hidden 64->64 dense layers
square (a 1x1 convolution is a dense layer at every position), then a dense layer to
the 10 classes, all exact (:func:`smaso.filters.register_filters`); 1,500 training
images (the other 297 held out), batches of 50 reshuffled each epoch, Adam at lr 1e-3,
float32, no rank check in the forward pass (as the experiment runner trains). After
every step, for each square layer: its orthonormal filters (a *flip*: a filter whose
cosine with itself one step earlier is negative: a sign change of its residual, a jump
of the function with orthonormal filters, a continuous passage through a zero filter
with the authors' unnormalised Gram-Schmidt), and its smallest relative residual
``min_k |R_kk| / max_k ||v_k||`` (a *raise*: a step at which it is at or below the
tolerance of :func:`smaso.orthogonal.check_rank`, ``max(rows, cols) * eps``, where a
forward pass with the check raises ``linearly dependent``). With re-anchoring (every
``N`` steps, and once at the start), also the largest ``max |A - I|`` of the change of
variable at re-anchoring (:func:`smaso.orthogonal.anchor_map`): how far from the
identity is the map that Adam's kept moments do not follow.

Writes benchmarks/results/square_layers.json after each run (the previous file kept
as .json.bak).

    .venv/bin/python benchmarks/square_layers.py [--steps 60000] [--seeds 0]
    [--every 0 100] [--methods qr gs-unnormalised] [--threads 1]
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import loadavg, metadata, write_results
from smaso.filters import register_filters
from smaso.orthogonal import anchor_map, orthogonal_layers, reanchor_

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "square_layers.json"
N_TRAIN, BATCH, LR = 1500, 50, 1e-3


def stand_in(width=64, depth=3, num_classes=10):
    """``depth`` dense layers ``width -> width`` with ReLU, then a dense layer to the
    classes: on the 64 pixels of digits, with ``width=64``, every hidden layer is
    square (what largeCNN's last 1x1 192->192 convolution is at every position)."""
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, num_classes))


def digits():
    """scikit-learn's digits as (N, 1, 8, 8) float32, standardised with the training
    images' mean and std: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target, dtype=torch.long)
    mean, std = x[:N_TRAIN].mean(), x[:N_TRAIN].std()
    x = (x - mean) / std
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def square_layers(model):
    """The exact layers of ``model`` with as many filters as inputs."""
    return [m for m in orthogonal_layers(model) if m.weight.shape[0] == m.in_features]


def factor(m):
    """(sign-fixed orthonormal rows, |R_kk| / max_k ||v_k||) of layer ``m``'s raw
    weight, in float64."""
    M = m.parametrizations.weight.original.detach().double()
    Q, R = torch.linalg.qr(M.mT)
    d = R.diagonal()
    return (Q * d.sign()).mT, d.abs() / torch.linalg.vector_norm(M, dim=-1).max()


def run(method, every, seed, steps, width, log_every):
    torch.manual_seed(seed)
    model = stand_in(width)
    register_filters(model, method, check=False)
    unnormalised = method == "gs-unnormalised"  # forced: reanchor_ skips it by default
    if every:
        reanchor_(model, unnormalised)
    x, y, xt, yt = digits()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    layers = square_layers(model)
    tol = width * torch.finfo(torch.float32).eps
    prev = [factor(m)[0] for m in layers]
    flips = [[] for _ in layers]  # (step, row) of each flip
    raises = [0] * len(layers)
    min_res = [math.inf] * len(layers)
    last_res = [[] for _ in layers]  # residual of the last filter, every log_every
    drift, n_anchor, nonfinite = [], 0, 0
    g = torch.Generator().manual_seed(seed)
    perm, pos, loss_avg = torch.randperm(N_TRAIN, generator=g), 0, None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + BATCH > N_TRAIN:
            perm, pos = torch.randperm(N_TRAIN, generator=g), 0
        idx = perm[pos : pos + BATCH]
        pos += BATCH
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = loss.item()
        nonfinite += not math.isfinite(loss)
        loss_avg = loss if loss_avg is None else 0.999 * loss_avg + 0.001 * loss
        if every and step % every == 0:
            d = 0.0
            for m in orthogonal_layers(model):
                p = m.parametrizations.weight
                A = anchor_map(p.original, p[-1].unnormalised)
                d = max(
                    d, float((A - torch.eye(A.shape[-1], dtype=A.dtype)).abs().max())
                )
            drift.append(d)
            n_anchor += reanchor_(model, unnormalised) > 0
        for i, m in enumerate(layers):
            Q, res = factor(m)
            for r in torch.nonzero((Q * prev[i]).sum(-1) < 0).flatten().tolist():
                flips[i].append((step, r))
            prev[i] = Q
            rmin = float(res.min())
            min_res[i] = min(min_res[i], rmin)
            raises[i] += rmin <= tol
            if step % log_every == 0:
                last_res[i].append(float(res[-1]))
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        test_acc = float((model(xt).argmax(1) == yt).float().mean())
        train_acc = float((model(x).argmax(1) == y).float().mean())
    return {
        "method": method,
        "reanchor_every": every,
        "seed": seed,
        "steps": steps,
        "seconds": round(seconds, 1),
        "train_loss_ema": loss_avg,
        "nonfinite_losses": nonfinite,
        "train_acc": train_acc,
        "test_acc": test_acc,
        "reanchorings": n_anchor,
        "max_abs_A_minus_I": max(drift) if drift else None,
        "max_abs_A_minus_I_second_half": max(drift[len(drift) // 2 :])
        if drift
        else None,
        "median_abs_A_minus_I": statistics.median(drift) if drift else None,
        "tolerance": tol,
        "square_layers": [
            {
                "flips": len(flips[i]),
                "flip_steps": [s for s, _ in flips[i][:200]],
                "flipped_rows": sorted({r for _, r in flips[i]}),
                "raises": raises[i],
                "min_relative_residual": min_res[i],
                "last_filter_residual_every": log_every,
                "last_filter_residual": last_res[i],
            }
            for i in range(len(layers))
        ],
    }


def summary(r):
    sq = r["square_layers"]
    return (
        f"{r['method']:>16} every={r['reanchor_every']:>5} seed={r['seed']} "
        f"steps={r['steps']}: square flips {sum(s['flips'] for s in sq)}, raises "
        f"{sum(s['raises'] for s in sq)}, min residual "
        f"{min(s['min_relative_residual'] for s in sq):.2e}, test acc "
        f"{r['test_acc']:.3f}, "
        f"|A-I| max {r['max_abs_A_minus_I']}, median {r['median_abs_A_minus_I']}, "
        f"{r['seconds']:.0f} s"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--every", type=int, nargs="+", default=[0, 100])
    ap.add_argument("--methods", nargs="+", default=["qr", "gs-unnormalised"])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=500)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        **metadata(),
        "loadavg_before": loadavg(),
        "model": f"MLP 64 -> 3 x {args.width} (ReLU) -> 10, every layer exact",
        "data": f"sklearn digits, {N_TRAIN} train / rest test",
        "batch": BATCH,
        "lr": LR,
        "runs": [],
    }
    for method in args.methods:
        for every in args.every:
            for seed in args.seeds:
                r = run(method, every, seed, args.steps, args.width, args.log_every)
                print(summary(r), flush=True)
                results["runs"].append(r)
                results["loadavg_after"] = loadavg()
                write_results(args.out, results)  # after each run: a partial record


if __name__ == "__main__":
    main()
