"""The authors' template penalty (Section 5) from one batched backward pass: the same
numbers as one backward pass per class (smaso.orthogonal._template_penalty_loop), in
value, gradient in the parameters and batch-norm state, on every network of the Table 2
grid, alone and packed; and a training step of a bounded number of operations, none of
them a factory call."""

import pytest
import torch
from helpers import load_benchmark
from torch import nn

from smaso import orthogonal as o
from smaso.models import build, can_pack
from smaso.pack import PackedRuns

F64 = torch.float64
step = load_benchmark("step")
template_bench = load_benchmark("template")

#: Smallest convenient input side of each network (its maps stay >= 1 pixel).
SIDE = {
    "small-cnn": 10,
    "small-cnn-v2": 20,
    "large-cnn-code": 12,
    "large-cnn-code-v2": 12,
    "large-cnn": 9,
    "study-cnn": 4,
}
#: The structural options of the two protocols (config.PROTOCOLS): the paper's, and
#: the authors' code's (no conv bias before batch norm, no batch norm after the last
#: 1x1 convolution of the penalty script's largeCNN).
OPTIONS = {"paper": dict(), "authors": dict(conv_bias=False, bn_last=False)}


def _net(name, classes, options, runs, activation="relu", seed=0):
    torch.manual_seed(seed)
    kw = dict(options, runs=runs) if runs > 1 else options
    net = build(name, classes, 3, activation, bn_momentum=0.1, **kw).to(F64).train()
    return PackedRuns(net, runs) if runs > 1 else net


def _x(name, runs, n=3, seed=1):
    s = SIDE[name]
    shape = (runs, n, 3, s, s) if runs > 1 else (n, 3, s, s)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _compare(model, x, chunk=None, reference=o._template_penalty_loop):
    """(value, gradient, batch-norm state) deviations of the batched penalty (with
    ``chunk`` classes per pass) from the ``reference`` (the per-class loop), each
    relative to the reference's largest entry."""
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = reference(model, x)
    gref = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    state_ref = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    got = o.template_penalty(model, x, chunk)
    ggot = torch.autograd.grad(got.sum(), params, allow_unused=True)
    state = model.state_dict()
    assert got.shape == ref.shape
    # a parameter the templates do not depend on: None or zeros
    ggot = [
        b if b is not None or a is None else torch.zeros_like(a)
        for a, b in zip(gref, ggot, strict=True)
    ]
    gscale = max(g.abs().max() for g in gref if g is not None)
    dev_grad = max(
        ((a - b).abs().max() / gscale).item()
        for a, b in zip(gref, ggot, strict=True)
        if a is not None
    )
    for k in state_ref:  # running statistics updated exactly as the loop's forward
        assert torch.equal(state[k], state_ref[k]), k
    changed = [k for k in before if not torch.equal(before[k], state_ref[k])]
    return ((got - ref).abs().max() / ref.abs().max()).item(), dev_grad, changed


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("name", SIDE)
def test_batched_penalty_equals_the_per_class_loop(name, classes, options):
    model = _net(name, classes, OPTIONS[options], 1)
    dv, dg, changed = _compare(model, _x(name, 1))
    assert dv < 1e-10 and dg < 1e-10, (dv, dg)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert bool(changed) == has_bn  # the penalty's forward updates the statistics


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("name", [n for n in SIDE if can_pack(n)])
def test_batched_penalty_equals_the_per_class_loop_packed(name, classes):
    options = OPTIONS["authors" if name == "large-cnn-code" else "paper"]
    model = _net(name, classes, options, 2)
    dv, dg, _ = _compare(model, _x(name, 2))
    assert dv < 1e-10 and dg < 1e-10, (dv, dg)
    # each run's penalty is that run's alone
    alone = _net(name, classes, options, 1)
    from smaso.pack import unpack_state

    for r, state in enumerate(unpack_state(model, alone)):
        alone.load_state_dict(state)
        want = o._template_penalty_loop(alone, _x(name, 2)[r])
        got = o.template_penalty(model, _x(name, 2))[r]
        assert torch.allclose(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("activation", ["swish", "swish-softplus", "silu"])
def test_batched_penalty_learnable_activations(activation, chunk):
    model = _net("small-cnn-v2", 10, {}, 1, activation)
    dv, dg, _ = _compare(model, _x("small-cnn-v2", 1), chunk)
    assert dv < 1e-10 and dg < 1e-10, (dv, dg)


# the penalty in chunks of classes (memory bounded by the chunk)


@pytest.mark.parametrize(
    "classes, chunk, options",
    [(10, 3, "paper"), (10, 3, "authors"), (100, 40, "paper")],
)
@pytest.mark.parametrize("name", SIDE)
def test_chunked_penalty_equals_the_per_class_loop(name, classes, chunk, options):
    """Chunks that do not divide the classes: value, gradient and batch-norm state
    (updated once, by the forward pass) as the loop's; at 100 classes as the one
    batched pass's (equal to the loop's above), which takes seconds, not minutes."""
    model = _net(name, classes, OPTIONS[options], 1)
    one_pass = o.template_penalty
    reference = o._template_penalty_loop if classes == 10 else one_pass
    dv, dg, changed = _compare(model, _x(name, 1), chunk, reference)
    assert dv < 1e-10 and dg < 1e-10, (dv, dg)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert bool(changed) == has_bn


@pytest.mark.parametrize("name", [n for n in SIDE if can_pack(n)])
def test_chunked_penalty_packed_weights_each_run(name):
    """Packed runs: the gradient of a weighted sum of the runs' penalties (each run's
    weight reaches only its own penalty's gradient)."""
    options = OPTIONS["authors" if name == "large-cnn-code" else "paper"]
    model, x = _net(name, 10, options, 2), _x(name, 2)
    params = list(model.parameters())
    w = torch.tensor([0.25, 2.0], dtype=F64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = o._template_penalty_loop(model, x)
    gref = torch.autograd.grad((w * ref).sum(), params, allow_unused=True)
    model.load_state_dict(before)
    got = o.template_penalty(model, x, 4)
    ggot = torch.autograd.grad((w * got).sum(), params, allow_unused=True)
    assert torch.allclose(got, ref, rtol=1e-10, atol=0)
    scale = max(g.abs().max() for g in gref if g is not None)
    for a, b in zip(gref, ggot, strict=True):
        if a is not None:  # (None: a parameter the templates do not depend on)
            assert (a - (0 if b is None else b)).abs().max() < 1e-10 * scale


def test_chunked_penalty_eval_mode_one_chunk_and_bad_chunks():
    model, x = _net("small-cnn", 10, {}, 1).eval(), _x("small-cnn", 1)
    dv, dg, changed = _compare(model, x, 4)
    assert dv < 1e-10 and dg < 1e-10 and changed == []
    whole = o.template_penalty(model, x)
    for chunk in (10, 64):  # one pass
        assert torch.allclose(o.template_penalty(model, x, chunk), whole, rtol=1e-12)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="chunk must be a positive int"):
            o.template_penalty(model, x, bad)
    with torch.no_grad():  # no graph asked for: the value alone
        assert torch.allclose(o.template_penalty(model, x, 3), whole, rtol=1e-12)


def test_batched_penalty_eval_mode_and_templates():
    model = _net("small-cnn", 10, {}, 1)
    x = _x("small-cnn", 1)
    model.eval()  # batch norm on its running statistics: samples independent
    dv, dg, changed = _compare(model, x)
    assert dv < 1e-10 and dg < 1e-10 and changed == []
    model.train()
    T, lead = o._templates(model, x, False)
    Tref, _ = o._templates_loop(model, x, False)
    assert lead == 1 and T.shape == Tref.shape == (3, 10, 3, 10, 10)
    assert not T.requires_grad
    assert (T - Tref).abs().max() < 1e-12 * Tref.abs().max()


def test_other_models_go_through_vmap():
    """A model that is not a chain of known layers: vmap over the backward pass."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 4)

        def forward(self, v):
            h = v.flatten(1)
            return self.b(torch.tanh(self.a(h)) + h[:, :5])

    torch.manual_seed(0)
    model = Net().double()
    assert o._chain(model) is None
    assert o._chain(nn.Sequential(nn.Flatten(), nn.ReLU(inplace=True))) is None
    dv, dg, _ = _compare(model, torch.randn(4, 2, 3, dtype=F64))
    assert dv < 1e-10 and dg < 1e-10, (dv, dg)


def test_packed_input_checked():
    model = _net("small-cnn", 10, {}, 2)
    with pytest.raises(ValueError, match="expected inputs of 2 runs"):
        o.template_penalty(model, _x("small-cnn", 3))


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("runs", [1, 2])
def test_the_penalty_makes_no_tensor_from_the_host(runs, chunk):
    """The penalty and its backward make no tensor from sizes or values on the host
    and move none to the device (what a CUDA graph replays), counted as
    tests/test_step.py counts a training step."""
    model = _net("small-cnn", 10, {}, runs)
    x = _x("small-cnn", runs)
    with step.OpCounter() as c:
        o.template_penalty(model, x, chunk).sum().backward()
    assert c.ops["aten.convolution"] > 0  # the counter sees the penalty
    assert step.created(c.ops) == {}


@pytest.mark.parametrize("classes", [10, 100])
def test_training_step_operations_bounded(classes):
    """At most 2,000 operations a training step of the Table 2 largeCNN with the
    template penalty, alone and packed, whatever the number of classes (the loop:
    85,629 at 100 classes)."""
    counts = [template_bench.step_ops("after", classes, k) for k in (1, 2)]
    assert all(200 < n <= 2000 for n in counts), counts
