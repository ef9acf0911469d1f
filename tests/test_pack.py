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
    build_loss,
    build_model,
    load_trained_model,
    result_path,
    run,
    run_packed,
    sweep,
)
from smaso.experiment.runner import Runtime, load_data, packable, run_memory
from smaso.experiment.store import (
    ResultsError,
    load_checkpoint,
    pack_checkpoint_path,
)
from smaso.experiment.study import packs
from smaso.filters import register_filters
from smaso.models import GroupedLinear, build, can_pack
from smaso.orthogonal import (
    filter_penalty,
    orthogonality_penalty,
    penalty_loss,
    template_penalty,
)
from smaso.pack import PackedRuns, pack_size, pack_state, scale_steps, unpack_state


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


def assert_packed_equals_alone(configs, tmp_path):
    """Every number in the histories of the packed runs equal to the separate runs' to
    1e-10, every final weight to 1e-9 (float64)."""
    side = 8 * configs[0].upsample
    # Gaussian images: digits' flat backgrounds tie in max-pooling, and a tie broken
    # another way by a last-bit difference moves a template by a whole pixel
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
    k = len(configs)
    for a, p, c in zip(alone, packed, configs, strict=True):
        assert p["packed_runs"] == k and a["packed_runs"] == 1
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
    # the packed runs differ from one another (their own seeds, rates and batches)
    assert len({p["history"][-1]["train_loss"] for p in packed}) == k


@pytest.mark.parametrize("setting", SETTINGS)
def test_k_packed_runs_equal_k_separate_runs(setting, tmp_path):
    """The acceptance test: float64, one epoch (6 steps), 3 packed runs of 3 seeds."""
    kw = dict(epochs=1, upsample=3, limit_test=40) | SETTINGS[setting]
    assert_packed_equals_alone([tiny(seed=s, **kw) for s in (0, 1, 2)], tmp_path)


#: Packs across learning rates and penalty weights (Table 2's grid: a structure's
#: rates and seeds in one pack): (setting, [(seed, lr, lam) per run]).
ACROSS = {
    "baseline, three rates": ("baseline", [(0, 1e-3, 1), (0, 3e-3, 1), (1, 2e-4, 1)]),
    "filter penalty, rates and weights": (
        "filter penalty",
        [(0, 1e-3, 1.0), (0, 1e-3, 0.1), (1, 5e-3, 3.0)],
    ),
    "template penalty, two weights": (
        "template penalty",
        [(0, 1e-3, 1.0), (1, 1e-3, 0.2)],
    ),
    "authors' exact row, two rates": (
        "authors' exact row",
        [(0, 1e-3, 1), (1, 1e-4, 1)],
    ),
}


@pytest.mark.parametrize("case", ACROSS)
def test_packs_across_rates_and_weights_equal_separate_runs(case, tmp_path):
    """Runs of one structure with their own learning rates (the authors' protocol:
    Adam without bias correction, a scheduler on the shared rate) and penalty weights:
    the packed numbers are the separate runs', float64, 1e-10."""
    setting, runs = ACROSS[case]
    kw = dict(epochs=1, upsample=3, limit_test=40) | SETTINGS[setting]
    configs = [tiny(**(kw | dict(seed=s, lr=lr, lam=lam))) for s, lr, lam in runs]
    assert len({c.run_id() for c in configs}) == len(configs)
    assert_packed_equals_alone(configs, tmp_path)


def test_scaled_steps_are_each_runs_own_rate():
    """:func:`smaso.pack.scale_steps` against Adam run at each rate separately, in
    float64, with and without bias correction; a factor of 1 is the step to the bit."""
    packed, separate = packed_and_separate("small-cnn", "relu", k=3)
    # in evaluation mode: a convolution's bias before batch norm then has a gradient
    # (in training mode it is rounding noise, which Adam's m / sqrt(v) magnifies)
    packed.eval()
    for m in separate:
        m.eval()
    rates = [1e-3, 3e-3, 1e-3]
    opt = torch.optim.Adam(packed.parameters(), lr=rates[0])
    scale_steps(opt, packed, [r / rates[0] for r in rates])
    opts = [
        torch.optim.Adam(m.parameters(), lr=r)
        for m, r in zip(separate, rates, strict=True)
    ]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(3, 4, 3, 16, 16, generator=g, dtype=torch.float64)
        opt.zero_grad()
        packed(x).square().sum().backward()
        opt.step()
        for m, o, xr in zip(separate, opts, x, strict=True):
            o.zero_grad()
            m(xr).square().sum().backward()
            o.step()
    states = unpack_state(packed, separate[0])
    for m, st in zip(separate, states, strict=True):
        for key, t in m.state_dict().items():
            if t.is_floating_point():
                assert (t - st[key]).abs().max() <= 1e-12 * (1 + t.abs().max()), key
    plain = torch.optim.Adam(packed.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="3 positive step factors"):
        scale_steps(plain, packed, [1.0, 2.0])
    with pytest.raises(ValueError, match="3 positive step factors"):
        scale_steps(plain, packed, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="does not hold"):
        scale_steps(torch.optim.Adam([nn.Parameter(torch.ones(3))]), packed, [1] * 3)


def test_a_killed_pack_resumes_from_its_checkpoint(tmp_path):
    configs = [tiny(seed=0, epochs=3), tiny(seed=1, epochs=3, lr=3e-3)]
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


def test_sweep_packs_the_runs_of_a_structure(tmp_path):
    configs = [tiny(seed=s, epochs=1) for s in (0, 1, 2)]
    configs += [tiny(seed=0, epochs=1, lr=5e-4), tiny(seed=0, epochs=1, batch_size=25)]
    tags = ["s0", "s1", "s2", "lr", "bs"]
    name = {c.run_id(): n for c, n in zip(configs, tags, strict=True)}
    status = {c.run_id(): "todo" for c in configs}

    def named(units):
        return [[name[c.run_id()] for c in u] for u in units]

    assert named(packs(configs, status, 2)) == [["s0", "s1"], ["s2", "lr"], ["bs"]]
    assert [len(u) for u in packs(configs, status, 1)] == [1] * 5
    status[configs[1].run_id()] = "partial"  # has its own checkpoint: alone
    assert named(packs(configs, status, 3)) == [["s0", "s2", "lr"], ["s1"], ["bs"]]
    results = sweep(configs, tmp_path, log=None, pack=3)
    assert [r["packed_runs"] for r in results] == [3, 3, 3, 1, 1]
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(files) == 5  # one results file per run
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
    with pytest.raises(ValueError, match="differ in more than the seed, lr, lam"):
        packable([a, tiny(seed=1, batch_size=7)])
    with pytest.raises(ValueError, match="distinct runs"):
        packable([a, a])
    packable([a, tiny(seed=0, lr=5e-4)])  # another rate: another run
    weights = [
        tiny(orthogonality="filters", lam=lam, seed=s) for s, lam in ((0, 1), (1, 2))
    ]
    with pytest.raises(ValueError, match="like="):
        build_loss(weights)
    with pytest.raises(ValueError, match="one nonnegative weight per run"):
        penalty_loss("filters", torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="one nonnegative weight per run"):
        penalty_loss("filters", torch.tensor([[1.0, 2.0]]))
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


def test_live_bytes_counts_the_peak_of_live_tensors():
    from smaso.pack import LiveBytes

    with LiveBytes() as m:
        a = torch.empty(1000)
        b = torch.empty(2000, dtype=torch.float64)
        view = b[:10]  # the same storage: counted once
        del a, b
        c = torch.empty(500)
    assert m.peak == 4 * 1000 + 8 * 2000 and m.live == 8 * 2000 + 4 * 500
    del view, c
    assert m.live == 0


def test_pack_size_fits_the_free_memory():
    assert pack_size(per_run=10, free=100, cap=15) == 8
    assert pack_size(10, 100, 3) == 3
    assert pack_size(10**9, 100, 5) == 1  # a run that does not fit still runs alone
    assert pack_size(10, 100, 15, headroom=1.0) == 10
    for bad in [(0, 100, 2), (10, 100, 0), (10, -1, 2)]:
        with pytest.raises(ValueError, match="per_run > 0"):
            pack_size(*bad)


def test_one_runs_memory_is_measured_from_its_step():
    """:func:`run_memory` on the CPU: at least the network, its gradients and Adam's
    two moments; the template penalty's double backward holds more than the baseline;
    and the network's bytes themselves are counted (twice the width, more)."""
    data = load_data(tiny(), "cpu", Runtime())
    base = run_memory(tiny(), data, "cpu")
    params = build_model(tiny(), 1, 10).parameters()
    assert base >= 4 * sum(p.numel() * p.element_size() for p in params)
    assert run_memory(tiny(orthogonality="templates"), data, "cpu") > 2 * base
    assert run_memory(tiny(batch_size=25), data, "cpu") < base


def test_a_sweep_packs_as_many_runs_as_fit(tmp_path, monkeypatch):
    from smaso.experiment import study

    monkeypatch.setattr(study, "run_memory", lambda *a: 100)
    monkeypatch.setattr(study, "free_memory", lambda dev: 250)  # 2 runs in 80 %
    configs = [tiny(seed=s, epochs=1) for s in (0, 1, 2)]
    lines = []
    results = sweep(configs, tmp_path, log=lines.append, pack=3, epoch_lines=False)
    assert [r["packed_runs"] for r in results] == [2, 2, 1]
    assert sum("packs of up to 2 runs" in s for s in lines) == 1
