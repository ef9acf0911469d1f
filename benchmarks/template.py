"""The authors' template penalty (Section 5) at scale: operations per training step
and peak memory of one step, one backward pass per class ("before",
``smaso.orthogonal._template_penalty_loop``) against all classes' templates from one
batched backward pass ("after", ``smaso.orthogonal.template_penalty``) and from
passes of ``--chunk`` classes ("chunked", ``template_penalty(chunk=...)``).

1. Operations per training step (benchmarks/step.py's counter over ``train_epoch``,
   two steps minus one) of the Table 2 largeCNN of the authors' code with the template
   penalty, 10 and 100 classes, alone and packed by 2 (the count does not depend on
   the image or batch size; small ones keep the loop's 85,000 operations quick).
2. Peak memory of one step (penalty and its gradient), float32, ``--batch`` images
   of ``--side`` pixels, two ways: the peak of the bytes of the tensors the step
   creates and still holds (counted op by op under a ``TorchDispatchMode``: the same
   on every machine), and the peak resident memory in a fresh process
   (``ru_maxrss`` after the step minus before it, after a warm-up step on two 12x12
   images; what the operating system sees, allocator included, and noisy: a step
   that stays below the process's earlier high-water mark reads 0).

Writes benchmarks/results/template.json (the previous file kept as .json.bak).

    .venv/bin/python benchmarks/template.py [--batch 16] [--side 16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.common import loadavg, metadata, write_results
from benchmarks.step import per_step_ops, summary
from smaso import orthogonal
from smaso.experiment import RunConfig, build_loss, build_training_model
from smaso.pack import LiveBytes

ROOT = Path(__file__).resolve().parents[1]
IMPLS = {"before": "_template_penalty_loop", "after": "template_penalty"}
CHUNK = 10  # classes per pass of "chunked" (--chunk)


def _penalty(impl, chunk=CHUNK):
    """The penalty function of ``impl``: "before", "after" or "chunked"."""
    if impl == "chunked":
        tp = orthogonal.template_penalty  # (step_ops puts the returned one there)
        return lambda model, x, _=None: tp(model, x, chunk)
    f = getattr(orthogonal, IMPLS[impl])
    return lambda model, x, _=None: f(model, x)  # (penalty_loss passes its chunk)


def live_peak_mib(impl, classes, batch, side, model, chunk=CHUNK):
    """Peak MiB of the tensors one penalty step creates (:class:`LiveBytes`)."""
    torch.manual_seed(0)
    config = RunConfig(model=model, orthogonality="templates")
    net = build_training_model([config], 3, classes).train()
    params = list(net.parameters())
    x = torch.randn(batch, 3, side, side)
    with LiveBytes() as m:
        torch.autograd.grad(_penalty(impl, chunk)(net, x), params, allow_unused=True)
    return m.peak / 2**20


def step_ops(impl, classes, runs, model="large-cnn-code", chunk=CHUNK):
    """Operations of one training step with the template penalty by ``impl``."""
    config = RunConfig(
        model=model,
        orthogonality="templates",
        dataset="cifar100" if classes == 100 else "cifar10",
    )
    configs = [RunConfig(**{**config.to_dict(), "seed": s}) for s in range(runs)]
    net = build_training_model(configs, 3, classes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 12, 12, generator=g)
    y = torch.arange(16) % classes
    shape = (2,) if runs == 1 else (runs, 2)
    batches = [torch.randint(0, 16, shape, generator=g) for _ in range(2)]
    opt = torch.optim.Adam(net.parameters())
    saved = orthogonal.template_penalty
    orthogonal.template_penalty = _penalty(impl, chunk)  # the one penalty_loss calls
    try:
        ops = per_step_ops(net, opt, build_loss(config), x, y, batches)
    finally:
        orthogonal.template_penalty = saved
    return summary(ops)["ops"]


def memory_child(impl, classes, batch, side, model, chunk=CHUNK):
    """(In a fresh process) peak resident memory (MiB) of one penalty step."""
    torch.set_num_threads(1)
    config = RunConfig(model=model, orthogonality="templates")
    net = build_training_model([config], 3, classes).train()
    f = _penalty(impl, chunk)
    params = list(net.parameters())

    def one(n, s):
        x = torch.randn(n, 3, s, s)
        torch.autograd.grad(f(net, x), params, allow_unused=True)

    one(2, 12)  # warm-up on two small images: libraries and kernels loaded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one(batch, side)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024


def memory(impl, classes, batch, side, model, chunk=CHUNK):
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); "
        "from benchmarks.template import memory_child; "
        "print(json.dumps(memory_child(sys.argv[2], int(sys.argv[3]), "
        "int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7]))))"
    )
    args = [str(ROOT), impl, str(classes), str(batch), str(side), model, str(chunk)]
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--side", type=int, default=16)
    p.add_argument("--model", default="large-cnn-code")
    p.add_argument("--chunk", type=int, default=CHUNK, help="classes per pass")
    p.add_argument("--quick", action="store_true", help="10 classes, no loop at 100")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/template.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    classes = (10,) if a.quick else (10, 100)
    impls = (*IMPLS, "chunked")
    ops = {}
    for c in classes:
        for runs in (1, 2):
            row = {i: step_ops(i, c, runs, a.model, a.chunk) for i in impls}
            row["ratio"] = row["after"] / row["before"]
            row["chunked_ratio"] = row["chunked"] / row["before"]
            ops[f"{c} classes, {runs} run(s)"] = row
            print(f"ops/step {c:3d} classes, runs {runs}: {row}", flush=True)
    mem, live = {}, {}
    for c in classes:
        row = {i: memory(i, c, a.batch, a.side, a.model, a.chunk) for i in impls}
        row["ratio"] = row["after"] / row["before"] if row["before"] else None
        mem[f"{c} classes"] = row
        print(f"peak resident MiB of one step, {c:3d} classes: {row}", flush=True)
        row = {i: live_peak_mib(i, c, a.batch, a.side, a.model, a.chunk) for i in impls}
        row["ratio"] = row["after"] / row["before"]
        row["chunked_ratio"] = row["chunked"] / row["before"]
        live[f"{c} classes"] = row
        print(f"peak MiB of live tensors, {c:3d} classes: {row}", flush=True)
    result = {
        **metadata(),
        "quick": a.quick,
        "loadavg": loadavg(),
        "model": a.model,
        "memory_batch": a.batch,
        "memory_side": a.side,
        "ops_per_step": ops,
        "chunk": a.chunk,
        "peak_memory_mib": mem,
        "peak_live_tensor_mib": live,
    }
    write_results(a.out, result)
    return result


if __name__ == "__main__":
    main()
