"""Cholesky-QR against sign-fixed QR for the exactly orthogonal filters of Section 5
(Eq. 11) of Balestriero & Baraniuk, ICLR 2019: speed and accuracy, on CPU.

:func:`smaso.orthogonal.qr_rows` orthonormalises the rows of ``M`` (out <= fan_in) by a
QR factorisation of ``M^T`` with the signs of R's diagonal folded into Q, the rows
Gram-Schmidt computes. Cholesky-QR computes the same rows another way: the Gram matrix
``G = M M^T = R^T R`` has the Cholesky factor ``L = R^T`` (positive diagonal, so the
same sign convention), hence ``Q = L^{-1} M`` (one triangular solve). It costs one
matrix product and a small (out x out) factorisation instead of a Householder QR of a
(fan_in x out) matrix, but it squares the condition number: in floating point the rows
lose orthogonality like ``eps * cond(M)^2``. The candidates, all defined here (not in
the package):

* ``cholqr``: Cholesky-QR with the Gram matrix, the factorisation and the solve in
  float64 (a float32 weight is promoted, the rows cast back);
* ``cholqr2``: CholeskyQR2, Cholesky-QR applied twice (the second pass to the rows of
  the first, again in float64): orthogonal to working precision while
  ``eps64 * cond(M)^2 < 1``.

Timing: forward + backward (a random linear loss of the rows, gradient w.r.t. M) of
each candidate next to ``qr_rows`` on the same input, float32 (``qr_rows`` in float32)
and float64, with 1 and 2 intra-op threads, on the matrices the exact layers
orthogonalise in the smallCNN and largeCNN of the authors' code
(:func:`smaso.models.small_cnn`, :func:`smaso.models.large_cnn_code`, versions 1 and
2; a layer with more filters than inputs has its columns orthogonalised, as
``tall="columns"`` does), one matrix at a time and every layer of a network in one step.
Every repeat times the methods in a rotated order; the ratio reported is the median
over repeats of the paired ratio candidate / qr_rows of process CPU time (wall-clock
the same, kept for reference).

Accuracy: against ``qr_rows`` in float64 (the reference), for Glorot-uniform weights and
for weights of prescribed condition number (1e3, 1e6, 1e8): the largest entry of
``Q - Q_ref``, the orthogonality error ``max |Q Q^T - I|`` and the largest difference of
the gradient w.r.t. M of a random linear loss (relative to the reference gradient's
largest entry); ``qr_rows`` in the working dtype is measured the same way.

Writes benchmarks/results/cholqr.json (the previous file kept as cholqr.json.bak).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/cholqr.py [--repeats 30]
    [--threads 1 2] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import (
    loadavg,
    median_paired_ratio,
    metadata,
    timed,
    write_results,
)
from smaso.models import large_cnn_code, small_cnn
from smaso.orthogonal import check_rank, orthogonal_layers, qr_rows

RESULTS = Path(__file__).resolve().parent / "results" / "cholqr.json"
NETWORKS = {
    "small_cnn v1": lambda: small_cnn(version=1),
    "small_cnn v2": lambda: small_cnn(version=2),
    "large_cnn_code v1": lambda: large_cnn_code(version=1),
    "large_cnn_code v2": lambda: large_cnn_code(version=2),
}
CONDS = [1e3, 1e6, 1e8]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------- the candidates


def chol_rows(M: torch.Tensor) -> torch.Tensor:
    """One Cholesky-QR pass on the rows of ``M`` (out <= fan_in) in float64:
    ``Q = L^{-1} M`` with ``L L^T = M M^T``, L's diagonal positive: the rows of
    :func:`qr_rows` in exact arithmetic. Returns float64 rows; dependent rows raise
    ``ValueError``."""
    A = M.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(A @ A.T)
    if int(info):
        raise ValueError(
            f"the Gram matrix of the {M.shape[0]} rows is not positive definite in "
            "float64 (rows dependent, or condition number above ~1e8)"
        )
    check_rank(L.diagonal(), A)
    return torch.linalg.solve_triangular(L, A, upper=False)


def cholqr(M: torch.Tensor) -> torch.Tensor:
    """Cholesky-QR (one pass, float64 inside), rows in ``M``'s dtype."""
    return chol_rows(M).to(M.dtype)


def cholqr2(M: torch.Tensor) -> torch.Tensor:
    """CholeskyQR2: Cholesky-QR of the rows of a first Cholesky-QR (float64 inside),
    rows in ``M``'s dtype."""
    return chol_rows(chol_rows(M)).to(M.dtype)


METHODS = {"qr_rows": qr_rows, "cholqr": cholqr, "cholqr2": cholqr2}
CANDIDATES = ("cholqr", "cholqr2")


# ---------------------------------------------------------------- the matrices


def rows_shape(out: int, fan_in: int) -> tuple[int, int]:
    """The matrix an exact layer orthogonalises: the filters (out, fan_in), or their
    columns (fan_in, out) when out > fan_in (``tall="columns"``)."""
    return (out, fan_in) if out <= fan_in else (fan_in, out)


def network_shapes(name: str) -> list[tuple[int, int]]:
    """(out, fan_in) of every Conv2d/Linear layer of a network, in order."""
    return [
        (m.weight.shape[0], m.weight[0].numel())
        for m in orthogonal_layers(NETWORKS[name]())
    ]


def glorot(out: int, fan_in: int, g: torch.Generator) -> torch.Tensor:
    """A Glorot-uniform matrix (out, fan_in), float64 (fans of the flattened layer)."""
    a = (6.0 / (out + fan_in)) ** 0.5
    return (2 * torch.rand(out, fan_in, generator=g, dtype=torch.float64) - 1) * a


def conditioned(rows: int, cols: int, cond: float, g: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix, rows <= cols, with singular values log-spaced from 1 down
    to 1 / cond, random singular vectors, scaled to a Glorot matrix's size."""
    U, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, rows, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), rows)
    s = s.to(torch.float64) * (2.0 / (rows + cols)) ** 0.5 * cols**0.5
    return (U * s) @ V.T


# ---------------------------------------------------------------- accuracy


def forward_backward(f, M: torch.Tensor, up: torch.Tensor):
    """(rows, gradient w.r.t. M of ``sum(rows * up)``), or the error message."""
    M = M.detach().clone().requires_grad_(True)
    try:
        Q = f(M)
        (Q * up.to(Q.dtype)).sum().backward()
    except (ValueError, RuntimeError) as e:
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return Q.detach().double(), M.grad.double(), None


def accuracy(shapes, conds, seed=0) -> list[dict]:
    """For each matrix shape and weight kind (Glorot, then each condition number) and
    dtype, each method's distance to ``qr_rows`` in float64."""
    rows = []
    for shape in shapes:
        g = torch.Generator().manual_seed(seed)
        up = torch.randn(shape, generator=g, dtype=torch.float64)
        kinds = [("glorot", glorot(*shape, g))]
        kinds += [(f"cond {c:.0e}", conditioned(*shape, c, g)) for c in conds]
        for kind, M64 in kinds:
            Qr, gr, err = forward_backward(qr_rows, M64, up)
            assert err is None, err
            cond = torch.linalg.cond(M64).item()
            eye = torch.eye(shape[0], dtype=torch.float64)
            for dname, dtype in DTYPES.items():
                M = M64.to(dtype)
                for method, f in METHODS.items():
                    Q, grad, err = forward_backward(f, M, up)
                    row = {
                        "shape": list(shape),
                        "weights": kind,
                        "cond": cond,
                        "dtype": dname,
                        "method": method,
                        "error": err,
                    }
                    if err is None:
                        row |= {
                            "max_abs_q_minus_ref": (Q - Qr).abs().max().item(),
                            "orthogonality": (Q @ Q.T - eye).abs().max().item(),
                            "grad_rel_diff": (
                                (grad - gr).abs().max() / gr.abs().max()
                            ).item(),
                        }
                    rows.append(row)
    return rows


# ---------------------------------------------------------------- timing


def step(f, Ms, ups):
    """Forward + backward of ``f`` on each matrix of ``Ms`` (one step)."""

    def run():
        loss = 0
        for M, up in zip(Ms, ups, strict=True):
            M.grad = None
            loss = loss + (f(M) * up).sum()
        loss.backward()

    return run


def inputs(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    Ms, ups = [], []
    for shape in shapes:
        Ms.append(glorot(*shape, g).to(dtype).requires_grad_(True))
        ups.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
    return Ms, ups


def measure(cases: dict, repeats: int) -> dict:
    """Paired timings: every repeat runs each case's methods in a rotated order (one
    warm-up repeat first); per case, per candidate, the median paired ratio to
    ``qr_rows`` (process CPU time and wall-clock) and the median times (ms)."""
    names = list(METHODS)
    times = {(c, m): [] for c in cases for m in names}
    for r in range(repeats + 1):
        for c, (Ms, ups) in cases.items():
            k = r % len(names)
            for m in names[k:] + names[:k]:
                t = timed(step(METHODS[m], Ms, ups))
                if r:
                    times[c, m].append(t)
    out = {}
    for c in cases:
        ref = times[c, "qr_rows"]
        row = {"qr_rows_ms": 1e3 * statistics.median(t[1] for t in ref)}
        for m in CANDIDATES:
            tm = times[c, m]
            row[f"{m}_ms"] = 1e3 * statistics.median(t[1] for t in tm)
            for i, clock in enumerate(("wall", "cpu")):
                row[f"{m}_{clock}_ratio"] = median_paired_ratio(
                    [t[i] for t in tm], [t[i] for t in ref]
                )
        out[c] = row
    return out


# ---------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few small shapes, the smallCNN v1 step, 3 repeats, 1 thread: seconds",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.threads = 3, [1]
        networks = ["small_cnn v1"]
    else:
        networks = list(NETWORKS)
    if args.repeats < 1 or min(args.threads) < 1:
        p.error("--repeats and --threads must be positive")
    t0 = time.perf_counter()
    layers = {n: network_shapes(n) for n in networks}
    shapes = sorted({rows_shape(*s) for n in networks for s in layers[n]})
    n0 = torch.get_num_threads()
    torch.set_num_threads(1)
    acc = accuracy(shapes if not args.quick else [(27, 32), (64, 288)], CONDS)
    runs = []
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        load = loadavg()[0]
        run = {"threads": threads, "matrices": [], "networks": []}
        for dname, dtype in DTYPES.items():
            cases = {("m", s): inputs([s], dtype) for s in shapes}
            for n in networks:
                cases["n", n] = inputs([rows_shape(*s) for s in layers[n]], dtype)
            print(
                f"timing: {threads} thread(s), {dname}, {len(cases)} cases, "
                f"{args.repeats} repeats",
                file=sys.stderr,
                flush=True,
            )
            res = measure(cases, args.repeats)
            for (kind, key), row in res.items():
                if kind == "m":
                    run["matrices"].append({"shape": list(key), "dtype": dname, **row})
                else:
                    run["networks"].append({"network": key, "dtype": dname, **row})
        run["load_average_before_after"] = [load, loadavg()[0]]
        runs.append(run)
    torch.set_num_threads(n0)
    result = {
        "benchmark": "Cholesky-QR vs sign-fixed QR (qr_rows) for the exactly "
        "orthogonal filters (Eq. 11), forward+backward, CPU",
        "methods": {
            "qr_rows": "smaso.orthogonal.qr_rows in the input's dtype",
            "cholqr": "Cholesky-QR, Gram + cholesky + triangular solve in float64",
            "cholqr2": "CholeskyQR2: Cholesky-QR twice, in float64",
        },
        "ratio": "median over repeats of (candidate / qr_rows) process CPU time of "
        "the same repeat; wall_ratio the same with wall-clock time",
        "quick": args.quick,
        "repeats": args.repeats,
        "networks": {n: [list(s) for s in layers[n]] for n in networks},
        "runs": runs,
        "accuracy": acc,
        **metadata(threads=False),  # the thread counts are per run
        "total_s": time.perf_counter() - t0,
    }
    report(result)
    write_results(args.out, result)
    return result


def report(result: dict) -> None:
    for run in result["runs"]:
        print(
            f"\n{run['threads']} thread(s): forward+backward, median of "
            f"{result['repeats']} paired ratios of CPU time to qr_rows "
            f"(load average {run['load_average_before_after'][0]:.1f})"
        )
        print(
            f"{'case':>20s} {'dtype':>8s} {'qr ms':>8s} {'cholqr':>7s} {'cholqr2':>8s}"
        )
        for row in run["matrices"] + run["networks"]:
            case = row.get("network") or "x".join(map(str, row["shape"]))
            print(
                f"{case:>20s} {row['dtype']:>8s} {row['qr_rows_ms']:8.3f} "
                f"{row['cholqr_cpu_ratio']:7.2f} {row['cholqr2_cpu_ratio']:8.2f}"
            )
    print("\naccuracy against qr_rows in float64 (worst over shapes)")
    worst = {}
    for r in result["accuracy"]:
        key = (r["weights"], r["dtype"], r["method"])
        w = worst.setdefault(key, {"failed": 0, "q": 0.0, "orth": 0.0, "grad": 0.0})
        if r["error"]:
            w["failed"] += 1
            continue
        w["q"] = max(w["q"], r["max_abs_q_minus_ref"])
        w["orth"] = max(w["orth"], r["orthogonality"])
        w["grad"] = max(w["grad"], r["grad_rel_diff"])
    print(f"{'weights':>10s} {'dtype':>8s} {'method':>8s} {'|dQ|':>8s} {'|QQt-I|':>8s}")
    for (kind, dname, method), w in worst.items():
        print(
            f"{kind:>10s} {dname:>8s} {method:>8s} {w['q']:8.1e} {w['orth']:8.1e} "
            f"grad {w['grad']:8.1e}" + (f" failed {w['failed']}" if w["failed"] else "")
        )


if __name__ == "__main__":
    main()
