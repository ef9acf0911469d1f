"""Tests for re-anchoring exact layers (smaso.orthogonal.reanchor_): square layers,
whose last orthonormal filter flips (a jump of the function) or dies (the rank check
raises) when its raw residual crosses zero, and the change of variable that prevents it
without changing the function (Eq. 11)."""

import dataclasses

import pytest
import torch
from test_orthogonal import rand
from torch import nn
from torch.nn.utils import parametrize

from smaso.filters import EXACT, register_filters
from smaso.models import large_cnn, small_cnn
from smaso.orthogonal import (
    OrthogonalFilters,
    anchor_map,
    orthogonal_layers,
    qr_rows,
    reanchor_,
    reanchor_every,
    register_orthogonal,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def weights(model):
    return [m.weight.detach().clone() for m in orthogonal_layers(model)]


# ------------------------------------------------------------------ the map


@pytest.mark.parametrize("unnormalised", [False, True])
def test_anchor_map_against_qr(unnormalised):
    M = rand(2, 5, 7)  # a batch of two 5 x 7 row sets
    A = anchor_map(M, unnormalised)
    assert A.dtype == F64 and A.shape == (2, 5, 5)
    assert torch.equal(A, A.tril()) and bool((A.diagonal(dim1=-2, dim2=-1) > 0).all())
    Q = qr_rows(M)
    R = torch.linalg.qr(M.mT)[1].diagonal(dim1=-2, dim2=-1).abs()
    D = R if unnormalised else torch.linalg.vector_norm(M, dim=-1)
    torch.testing.assert_close(A @ M, D[..., None] * Q, rtol=0, atol=1e-13)
    # the same rows from A X as from X, for another X: a change of variable
    X = rand(2, 5, 7, seed=1)
    torch.testing.assert_close(qr_rows(A @ X), qr_rows(X), rtol=0, atol=1e-12)
    # anchored rows are their own anchor: A = I
    B = anchor_map(A @ M, unnormalised)
    torch.testing.assert_close(
        B, torch.eye(5, dtype=F64).expand(2, 5, 5), atol=1e-13, rtol=0
    )


def test_anchor_map_refuses_dependent_rows():
    M = rand(4, 4)
    M[3] = M[0] + 2 * M[1]
    with pytest.raises(ValueError, match="linearly dependent"):
        anchor_map(M)


# ------------------------------------------------------------ the function


CASES = [
    # (model, method, apodized, re-anchored layers)
    ("small1", "qr", False, 4),  # two tall layers (columns), re-anchored column-wise
    ("small1", "gs", False, 4),
    ("small1", "mgs", True, 2),  # tall layers behind the apodisation: left alone
    ("small1", "gs-unnormalised", False, 4),
    ("small2", "qr", True, 4),  # the authors' Gram-Schmidt script's smallCNN
    ("small2", "gs-unnormalised", True, 4),
    ("packed", "qr", False, 4),  # two runs side by side (grouped layers)
    ("packed", "gs-unnormalised", True, 4),
]


def build(name):
    torch.manual_seed(0)
    if name == "packed":
        return small_cnn(version=2, runs=2).double().eval(), 6
    return small_cnn(version=int(name[-1])).double().eval(), 3


@pytest.mark.parametrize(("name", "method", "apodized", "expected"), CASES)
def test_reanchor_keeps_the_function(name, method, apodized, expected):
    model, c = build(name)
    register_filters(model, method, apodized)
    x = rand(3, c, 32, 32, seed=2)
    y0, w0 = model(x), weights(model)
    raw = [m.parametrizations.weight.original for m in orthogonal_layers(model)]
    ptrs = [p.data_ptr() for p in raw]
    assert reanchor_(model, unnormalised=True) == expected
    assert [p.data_ptr() for p in raw] == ptrs  # in place: same storage
    torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-12)
    for a, b in zip(weights(model), w0, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # twice: the raw weight is already anchored (A = I), nothing moves
    before = [p.clone() for p in raw]
    assert reanchor_(model, unnormalised=True) == expected
    for a, b in zip(raw, before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", EXACT)
def test_reanchor_resets_the_residuals(method):
    """Orthonormal filters: residuals |R_kk| = the raw rows' norms (kept);
    unnormalised Gram-Schmidt: residuals unchanged (they are the filters' norms)."""
    layer = nn.Linear(6, 6, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(rand(6, 6, seed=3))
        layer.weight[5] = layer.weight[0] - layer.weight[1] + 1e-3 * layer.weight[5]
    register_filters(layer, method)
    W = layer.parametrizations.weight.original
    norms0 = torch.linalg.vector_norm(W, dim=-1)
    res0 = torch.linalg.qr(W.detach().mT)[1].diagonal().abs()
    assert res0[5] < 1e-2 * norms0[5]  # the last filter close to death
    w0 = layer.weight.detach().clone()
    unnormalised = method == "gs-unnormalised"
    assert reanchor_(layer) == (0 if unnormalised else 1)  # left out by default
    if unnormalised:
        assert torch.equal(layer.weight, w0)
    assert reanchor_(layer, unnormalised=True) == 1
    res = torch.linalg.qr(W.detach().mT)[1].diagonal().abs()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-12)
    if method == "gs-unnormalised":
        torch.testing.assert_close(res, res0, rtol=1e-12, atol=0)
        torch.testing.assert_close(W.detach(), w0, rtol=0, atol=1e-12)  # W <- U
    else:
        torch.testing.assert_close(res, norms0.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            torch.linalg.vector_norm(W, dim=-1), norms0, rtol=1e-12, atol=0
        )


def test_reanchor_keep_norms_and_tall():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 8), nn.Linear(8, 4)).double()
    register_orthogonal(model, keep_norms=True)  # the 8 x 5 layer is tall
    x = rand(7, 5, seed=4)
    y0 = model(x)
    assert reanchor_(model) == 2  # tall with keep_norms: column-wise would change it
    torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-12)


def test_reanchor_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="an nn"):
        reanchor_("model")
    with pytest.raises(ValueError, match="positive int"):
        reanchor_every(nn.Linear(2, 2), 0)
    layer = nn.Linear(4, 3)  # a scaling before the exact one: not declared filter-wise
    parametrize.register_parametrization(layer, "weight", Doubling())
    parametrize.register_parametrization(layer, "weight", OrthogonalFilters())
    with pytest.raises(ValueError, match="filterwise_linear"):
        reanchor_(layer)
    dead = nn.Linear(3, 3)
    register_orthogonal(dead)
    with torch.no_grad():
        dead.parametrizations.weight.original[2] = 0.0
    with pytest.raises(ValueError, match="linearly dependent"):
        reanchor_(dead)
    assert reanchor_(nn.Sequential(nn.Linear(3, 3))) == 0  # nothing exact


class Doubling(nn.Module):
    def forward(self, w):
        return 2 * w


# ------------------------------------------------------------ the optimiser


def test_reanchor_keeps_adam_state_and_training_goes_on():
    """Adam's moments are kept as they are (same tensors, same values); the step after
    re-anchoring runs from the same function and training continues."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    register_filters(model, "qr")
    x, y = rand(32, 8, seed=5), torch.arange(32) % 3
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    first = [step() for _ in range(5)]
    raw = model[0].parametrizations.weight.original
    state = {k: v.clone() for k, v in opt.state[raw].items()}
    ids = {k: id(v) for k, v in opt.state[raw].items()}
    loss0 = nn.functional.cross_entropy(model(x), y).item()
    assert reanchor_(model) == 2
    assert nn.functional.cross_entropy(model(x), y).item() == pytest.approx(
        loss0, abs=1e-12
    )
    assert {k: id(v) for k, v in opt.state[raw].items()} == ids
    for k, v in opt.state[raw].items():
        assert torch.equal(v, state[k]), k
    later = [step() for _ in range(60)]
    assert first[-1] < first[0] and later[-1] < 0.8 * loss0


def test_reanchor_every_counts_across_epochs():
    model = nn.Linear(3, 3)
    register_orthogonal(model)
    hook = reanchor_every(model, 3)
    # on_batch(i) restarts i every epoch: the hook counts its calls itself
    assert [hook(i) for i in (0, 1, 0, 1, 2, 0)] == [0, 0, 1, 0, 0, 1]


# ------------------------------------------------- the failure and its fix


def square_layer_run(reanchor, steps=100, seed=5):
    """The largeCNN's (Appendix D) square 1x1 192->192 convolution at its seed-0
    initialisation (smallest R diagonal 3.9e-3), with the 1x1 192->10 convolution after
    it, as dense layers on one fixed batch of 50 ReLU features, trained by Adam at lr
    1e-3 with the rank check in every forward pass, as an exact QR layer: (flips of its
    filters, whether the forward raised, smallest |R_kk| / max ||v_k|| seen)."""
    torch.manual_seed(0)
    big = large_cnn()
    model = nn.Sequential(nn.Linear(192, 192), nn.ReLU(), nn.Linear(192, 10))
    with torch.no_grad():
        for dense, conv in [(model[0], big[14]), (model[2], big[16])]:
            dense.weight.copy_(conv.weight[:, :, 0, 0])
            dense.bias.copy_(conv.bias)
    parametrize.register_parametrization(model[0], "weight", OrthogonalFilters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, 192, generator=g).relu()
    y = torch.randint(0, 10, (50,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    hook = None
    if reanchor:  # at the start, then every 10 steps
        assert reanchor_(model) == 1
        hook = reanchor_every(model, 10)
    raw = model[0].parametrizations.weight.original
    prev, flips, min_res = model[0].weight.detach().clone(), 0, 1.0
    for i in range(steps):
        try:
            loss = nn.functional.cross_entropy(model(x), y)
        except ValueError as e:
            assert "linearly dependent" in str(e)
            return flips, True, min_res
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hook is not None:
            hook(i)
        with torch.no_grad():
            W = qr_rows(raw, check=False)
            flips += int(((W * prev).sum(-1) < 0).sum())
            prev = W
            d = torch.linalg.qr(raw.double().mT)[1].diagonal().abs()
            min_res = min(min_res, float(d.min() / raw.norm(dim=-1).max()))
    return flips, False, min_res


def test_square_layer_flips_without_reanchoring():
    """Today's failure: the residual of the last filter crosses zero again and again,
    each time a jump of the function, and near zero the forward raises (here after
    43 flips, at step 93 on the machine this was written on: where exactly is a matter
    of rounding)."""
    flips, raised, min_res = square_layer_run(reanchor=False)
    assert flips > 0 and (raised or min_res < 1e-3)


def test_square_layer_never_flips_with_reanchoring():
    """Re-anchored at the start and every 10 steps, the same run never flips, never
    raises, and its smallest residual stays far from the rank tolerance."""
    flips, raised, min_res = square_layer_run(reanchor=True)
    assert (flips, raised) == (0, False)
    assert min_res > 0.1


def test_the_pipeline_reanchors_every_n_steps_and_resumes_alike(tmp_path, monkeypatch):
    """``reanchor_every`` re-anchors before the first step and after every N-th step
    of the run, counted from its start: a killed and resumed run computes what an
    uninterrupted one does. At 0 (the default) a run keeps its name."""
    from helpers import run_killed_after, tiny

    from smaso.experiment import run, runner

    base = tiny(epochs=2, orthogonality="qr", limit_train=120)
    assert dataclasses.replace(base, reanchor_every=0).run_id() == base.run_id()
    cfg = dataclasses.replace(base, reanchor_every=4)
    assert cfg.run_id() != base.run_id()
    calls = []
    real = runner.reanchor_
    monkeypatch.setattr(runner, "reanchor_", lambda m: calls.append(1) or real(m))
    full = run(cfg, tmp_path / "a", log=None)
    steps = 2 * (120 // cfg.batch_size + (120 % cfg.batch_size > 0))
    assert len(calls) == 1 + steps // 4

    run_killed_after(run, cfg, tmp_path / "b", 1)
    resumed = run(cfg, tmp_path / "b", log=None)
    assert resumed["resumes"] == [1]
    for a, b in zip(full["history"], resumed["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
        assert a["test_acc"] == b["test_acc"]
