"""Packed runs (smaso.pack): k runs trained as one network compute the numbers of the k
separate runs (float64, to 1e-10) for every kind of Table 2 run; weights move between
the two forms exactly; sweeps pack, resume packs and fall back run by run; bad packs
are refused."""

import json

import pytest
import torch
from helpers import strip, tiny
from torch import nn

from smaso.data import TensorData
from smaso.experiment import (
    RunConfig,
    build_model,
    load_trained_model,
    result_path,
    run,
    run_packed,
    sweep,
)
from smaso.experiment.runner import packable
from smaso.experiment.store import (
    ResultsError,
    load_checkpoint,
    pack_checkpoint_path,
)
from smaso.experiment.study import packs
from smaso.filters import register_filters
from smaso.models import GroupedLinear, build, can_pack
from smaso.orthogonal import filter_penalty, orthogonality_penalty, template_penalty
from smaso.pack import PackedRuns, pack_state, unpack_state


class Killed(Exception):
    pass


def packed_and_separate(model, activation, method="none", apodized=False, k=3):
    torch.manual_seed(0)
    separate = []
    for s in range(k):
        torch.manual_seed(s)
        m = build(model, 10, 3, activation).double()
        register_filters(m, method, apodized)
        separate.append(m)
    net = build(model, 10, 3, activation, runs=k).double()
    register_filters(net, method, apodized, check=False)
    packed = PackedRuns(net, k)
    packed.load_state_dict(pack_state([m.state_dict() for m in separate], packed))
    return packed, separate


@pytest.mark.parametrize(
    "model, activation, method, apodized",
    [
        ("small-cnn", "relu", "none", False),
        ("small-cnn-v2", "swish", "qr", True),
        ("small-cnn-v2", "swish-softplus", "gs-unnormalised", True),
        ("large-cnn-code", "relu", "qr", False),
        ("small-cnn-v2", "relu", "mgs", False),
    ],
)
def test_packed_network_is_the_separate_networks(model, activation, method, apodized):
    packed, separate = packed_and_separate(model, activation, method, apodized)
    # the weights come back exactly
    for m, state in zip(separate, unpack_state(packed, separate[0]), strict=True):
        for key, t in m.state_dict().items():
            assert torch.equal(t, state[key]), key
    x = torch.randn(3, 4, 3, 32, 32, dtype=torch.float64)
    out = packed(x)  # training mode: batch norm on each run's own batch
    ref = torch.stack([m(x[r]) for r, m in enumerate(separate)])
    assert out.shape == (3, 4, 10)
    assert (out - ref).abs().max() < 1e-12
    # run r's outputs depend on run r's inputs only
    x2 = x.clone()
    x2[1] = torch.randn_like(x2[1])
    out2 = packed(x2)
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2])
    assert not torch.allclose(out2[1], out[1])
    # penalties, per run: the separate runs' own
    pens = filter_penalty(packed)
    assert pens.shape == (3,)
    for r, m in enumerate(separate):
        assert abs(pens[r] - filter_penalty(m)) < 1e-10 * (1 + abs(pens[r]))


def test_template_penalty_per_run_is_the_separate_runs():
    packed, separate = packed_and_separate("small-cnn", "swish", k=2)
    x = torch.randn(2, 3, 3, 16, 16, dtype=torch.float64)
    pen = template_penalty(packed, x)
    ref = torch.stack([template_penalty(m, x[r]) for r, m in enumerate(separate)])
    assert pen.shape == (2,) and (pen - ref).abs().max() < 1e-12 * ref.abs().max()
    # independent reference: templates by brute-force autograd, one class at a time
    m, xr = separate[0], x[0].clone().requires_grad_(True)
    T = torch.stack(
        [torch.autograd.grad(m(xr)[:, c].sum(), xr)[0].flatten(1) for c in range(10)],
        1,
    )
    G = T @ T.mT
    brute = (G**2).sum() - (G.diagonal(dim1=1, dim2=2) ** 2).sum()
    assert abs(pen[0] - brute / (3 * 100)) < 1e-12 * abs(brute)


def test_grouped_linear_is_separate_linears():
    lins = [nn.Linear(5, 3).double() for _ in range(4)]
    g = GroupedLinear(5, 3, 4).double()
    with torch.no_grad():
        g.weight.copy_(torch.cat([m.weight for m in lins]))
        g.bias.copy_(torch.cat([m.bias for m in lins]))
    x = torch.randn(7, 4, 5, dtype=torch.float64)
    ref = torch.cat([m(x[:, r]) for r, m in enumerate(lins)], 1)
    assert (g(x.reshape(7, 20)) - ref).abs().max() < 1e-14
    pen = orthogonality_penalty(g.weight, groups=4)
    assert torch.allclose(
        pen, torch.stack([orthogonality_penalty(m.weight) for m in lins])
    )


SETTINGS = {
    "baseline": {},
    "filter penalty": dict(orthogonality="filters", lam=1.0),
    # (double backprop, one backward pass per class: 16x16 images)
    "template penalty": dict(orthogonality="templates", lam=1.0, upsample=2),
    "exact QR + swish": dict(
        model="small-cnn-v2", orthogonality="qr", activation="swish"
    ),
    "swish": dict(activation="swish"),
    "authors' exact row": dict(
        model="small-cnn-v2",
        activation="swish-softplus",
        orthogonality="gs-unnormalised",
        protocol="authors",
    ),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_k_packed_runs_equal_k_separate_runs(setting, tmp_path):
    """The acceptance test: float64, one epoch (6 steps), every number in the histories
    of 3 packed runs equal to the 3 separate runs' to 1e-10, every final weight to
    1e-9."""
    kw = dict(epochs=1, upsample=3, limit_test=40) | SETTINGS[setting]
    configs = [tiny(seed=s, **kw) for s in (0, 1, 2)]
    # Gaussian images: digits' flat backgrounds tie in max-pooling, and a tie broken
    # another way by a last-bit difference moves a template by a whole pixel
    side = 8 * kw["upsample"]
    g = torch.Generator().manual_seed(0)
    data = TensorData(
        torch.randn(300, 1, side, side, generator=g, dtype=torch.float64),
        torch.arange(300) % 10,
        torch.randn(40, 1, side, side, generator=g, dtype=torch.float64),
        torch.arange(40) % 10,
        10,
    )
    alone = [run(c, tmp_path / "alone", data=data, log=None) for c in configs]
    packed = run_packed(configs, tmp_path / "packed", data=data, log=None)
    for a, p, c in zip(alone, packed, configs, strict=True):
        assert p["packed_runs"] == 3 and a["packed_runs"] == 1
        for ha, hp in zip(strip(a["history"]), strip(p["history"]), strict=True):
            assert ha.keys() == hp.keys()
            for key, va in ha.items():
                assert va == pytest.approx(hp[key], rel=1e-10, abs=1e-10), key
        wa = load_trained_model(tmp_path / "alone", c, 1).state_dict()
        wp = load_trained_model(tmp_path / "packed", c, 1).state_dict()
        for key, t in wa.items():
            if t.is_floating_point():
                # the weights to 1e-9 relative: grouped and separate convolutions
                # sum in different orders, and Adam's step m / sqrt(v) magnifies
                # the last bits of small gradients (a convolution's bias before
                # batch norm has zero gradient up to rounding: Adam walks it by
                # rounding noise / eps, and the running mean takes that in)
                tol = 1e-9 * (1 + t.abs().max())
                assert (t - wp[key]).abs().max() <= tol, key
            else:
                assert torch.equal(t, wp[key]), key
    # the packed runs differ from one another (their own seeds and batches)
    accs = {p["history"][-1]["train_loss"] for p in packed}
    assert len(accs) == 3


def test_a_killed_pack_resumes_from_its_checkpoint(tmp_path):
    configs = [tiny(seed=s, epochs=3) for s in (0, 1)]
    whole = run_packed(configs, tmp_path / "whole", log=None)

    def kill(epoch, model, recs):
        assert len(recs) == 2
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        run_packed(configs, tmp_path / "k", log=None, on_epoch=kill, checkpoint_every=0)
    ckpt = pack_checkpoint_path(tmp_path / "k", configs)
    assert load_checkpoint(ckpt)["epoch"] == 2
    assert not result_path(tmp_path / "k", configs[0]).exists()
    resumed = run_packed(configs, tmp_path / "k", log=None)
    for r, w in zip(resumed, whole, strict=True):
        assert strip(r["history"]) == strip(w["history"]) and r["resumes"] == [2]
    assert not ckpt.exists()
    # a finished pack is returned as it is
    assert run_packed(configs, tmp_path / "k", log=None) == resumed


def test_sweep_packs_the_seeds_of_a_setting(tmp_path):
    configs = [tiny(seed=s, epochs=1) for s in (0, 1, 2)]
    configs += [tiny(seed=0, epochs=1, lr=5e-4)]
    status = {c.run_id(): "todo" for c in configs}
    units = packs(configs, status, 2)
    assert [[c.seed for c in u] for u in units] == [[0, 1], [2], [0]]
    assert [len(u) for u in packs(configs, status, 1)] == [1, 1, 1, 1]
    status[configs[1].run_id()] = "partial"  # has its own checkpoint: alone
    assert [[c.seed for c in u] for u in packs(configs, status, 3)] == [
        [0, 2],
        [1],
        [0],
    ]
    results = sweep(configs, tmp_path, log=None, pack=3)
    assert [r["packed_runs"] for r in results] == [3, 3, 3, 1]
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(files) == 4  # one results file per run
    again = sweep(configs, tmp_path, log=None, pack=3)  # nothing left to train
    assert again == results


def test_a_failing_pack_is_retried_run_by_run(tmp_path, monkeypatch):
    from smaso.experiment import runner

    configs = [tiny(seed=s, epochs=1) for s in (0, 1)]
    real = runner.build_packed

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(runner, "build_packed", broken)
    lines = []
    results = sweep(configs, tmp_path, log=lines.append, pack=2, epoch_lines=False)
    assert any("pack failed" in s for s in lines)
    assert [r["packed_runs"] for r in results] == [1, 1]
    monkeypatch.setattr(runner, "build_packed", real)


def test_bad_packs_are_refused(tmp_path):
    a = tiny(seed=0)
    with pytest.raises(ValueError, match="differ in more than the seed"):
        packable([a, tiny(seed=1, lr=5e-4)])
    with pytest.raises(ValueError, match="distinct seeds"):
        packable([a, a])
    with pytest.raises(TypeError, match="RunConfig"):
        packable([])
    assert not can_pack("large-cnn") and can_pack("large-cnn-code")
    with pytest.raises(ValueError, match="cannot be packed"):
        build("large-cnn", 10, 3, runs=2)
    run(tiny(seed=0, epochs=1), tmp_path, log=None)
    with pytest.raises(ResultsError, match="mix finished and unfinished"):
        run_packed(
            [tiny(seed=s, epochs=1) for s in (0, 1)],
            tmp_path,
            log=None,
        )
    packed, separate = packed_and_separate("small-cnn", "relu", k=2)
    with pytest.raises(ValueError, match="inputs of 2 runs"):
        packed(torch.randn(3, 2, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 packed runs"):
        pack_state([separate[0].state_dict()], packed)
    with pytest.raises(ValueError, match="cannot pack"):
        other = build("small-cnn", 100, 3).state_dict()
        pack_state([other, other], PackedRuns(build("small-cnn", 10, 3, runs=2), 2))
    assert isinstance(build_model(a, 1, 10), nn.Module)
    assert json.dumps(RunConfig().to_dict())
