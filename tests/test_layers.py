"""Tests for smaso.layers: real DN layers as MASOs (Theorem 1, Appendix A,
Eq. (14)-(16))."""

import random

import pytest
import torch
from torch import nn

from smaso.layers import (
    Abs,
    Maxout,
    Residual,
    affine_params,
    layer_maso,
    region_affine_map,
    split_layers,
)
from smaso.maso import hard_vq, maso

DTYPES = [torch.float32, torch.float64]
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}


def _randomise_bn(m, g):
    """Give a batch-norm layer non-trivial statistics and affine parameters (eval)."""
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(m.num_features, generator=g))
        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.weight.copy_(torch.randn(m.num_features, generator=g))
        m.bias.copy_(torch.randn(m.num_features, generator=g))
    return m.eval()


# Each case: rng -> (modules, input_shape, expected R). Shapes are drawn from a seeded
# rng.
def _lin(act, R, out_mult=1):
    def build(rng, g):
        d, k = rng.randint(3, 8), rng.randint(2, 6) * out_mult
        return [nn.Linear(d, k), act()], (d,), R

    return build


def _conv(act, R, **kw):
    def build(rng, g):
        groups = kw.get("groups", 1)
        c, o, h = (
            rng.randint(1, 3) * groups,
            rng.randint(1, 3) * groups,
            rng.randint(6, 8),
        )
        return [nn.Conv2d(c, o, **kw), act()], (c, h, h + 1), R

    return build


def _case(mods_fn, R):
    def build(rng, g):
        c, h = rng.randint(1, 3), rng.randint(6, 8)
        return mods_fn(c, g), (c, h, h), R

    return build


CASES = {
    "linear-relu": _lin(nn.ReLU, 2),
    "linear-leaky0.1": _lin(lambda: nn.LeakyReLU(0.1), 2),
    "linear-leaky0.5": _lin(lambda: nn.LeakyReLU(0.5), 2),
    "linear-leaky-negative-slope": _lin(lambda: nn.LeakyReLU(-0.3), 2),
    "linear-abs": _lin(Abs, 2),
    "linear-identity": _lin(nn.Identity, 1),
    "linear-maxout3": _lin(lambda: Maxout(3), 3, out_mult=3),
    "linear-nobias-relu": lambda rng, g: (
        [nn.Linear(5, 4, bias=False), nn.ReLU()],
        (5,),
        2,
    ),
    "linear-bn1d-abs": lambda rng, g: (
        [nn.Linear(5, 6), _randomise_bn(nn.BatchNorm1d(6), g), Abs()],
        (5,),
        2,
    ),
    "flatten-linear-relu": lambda rng, g: (
        [nn.Flatten(), nn.Linear(12, 5), nn.ReLU()],
        (3, 2, 2),
        2,
    ),
    "conv-relu": _conv(nn.ReLU, 2, kernel_size=3),
    "conv-s2p1-abs": _conv(Abs, 2, kernel_size=3, stride=2, padding=1),
    "conv-dil-groups-nobias-leaky": _conv(
        lambda: nn.LeakyReLU(0.2),
        2,
        kernel_size=3,
        padding=2,
        dilation=2,
        groups=2,
        bias=False,
    ),
    "conv-rect-reflect-relu": _conv(
        nn.ReLU,
        2,
        kernel_size=(3, 2),
        stride=(2, 1),
        padding=(1, 0),
        padding_mode="reflect",
    ),
    "conv-depthwise-abs": _conv(Abs, 2, kernel_size=3, padding=1, groups=3),
    "conv-relu-maxpool2": _case(
        lambda c, g: [nn.Conv2d(c, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)], 8
    ),
    "conv-relu-maxpool3s2p1": _case(
        lambda c, g: [
            nn.Conv2d(c, 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        ],
        18,
    ),
    "conv-abs-maxpool2-ceil": _case(
        lambda c, g: [nn.Conv2d(c, 2, 2), Abs(), nn.MaxPool2d(2, ceil_mode=True)], 8
    ),
    "conv-maxpool-dilated": _case(
        lambda c, g: [nn.Conv2d(c, 2, 3), nn.MaxPool2d(2, stride=1, dilation=2)], 4
    ),
    "conv-avgpool2-affine": _case(
        lambda c, g: [nn.Conv2d(c, 3, 3, padding=1), nn.AvgPool2d(2)], 1
    ),
    "conv-relu-avgpool2": _case(
        lambda c, g: [nn.Conv2d(c, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)], 16
    ),
    "conv-leaky-avgpool2-pad-exclude": _case(
        lambda c, g: [
            nn.Conv2d(c, 2, 3),
            nn.LeakyReLU(0.3),
            nn.AvgPool2d(2, stride=2, padding=1, count_include_pad=False),
        ],
        16,
    ),
    "conv-bn2d-relu": _case(
        lambda c, g: [
            nn.Conv2d(c, 3, 3),
            _randomise_bn(nn.BatchNorm2d(3), g),
            nn.ReLU(),
        ],
        2,
    ),
    "conv-maxout2-maxpool2": _case(
        lambda c, g: [nn.Conv2d(c, 4, 3, padding=1), Maxout(2), nn.MaxPool2d(2)], 8
    ),
    "conv-relu-maxpool2-flatten": _case(
        lambda c, g: [nn.Conv2d(c, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()], 8
    ),
    "maxpool-only": _case(lambda c, g: [nn.MaxPool2d(2)], 4),
    "conv-relu-flatten": _case(
        lambda c, g: [nn.Conv2d(c, 2, 3), nn.ReLU(), nn.Flatten()], 2
    ),
}

# Theorem 1 "with or without skip connections": z + ReLU(W z + b), and conv blocks.
CASES.update(
    {
        "residual-linear-relu": lambda rng, g: (
            [Residual([nn.Linear(5, 5), nn.ReLU()])],
            (5,),
            2,
        ),
        "residual-linear-bn-abs": lambda rng, g: (
            [Residual([nn.Linear(4, 4), _randomise_bn(nn.BatchNorm1d(4), g), Abs()])],
            (4,),
            2,
        ),
        "residual-conv-relu": _case(
            lambda c, g: [Residual([nn.Conv2d(c, c, 3, padding=1), nn.ReLU()])], 2
        ),
        "residual-conv-projection-s2": _case(
            lambda c, g: [
                Residual(
                    [nn.Conv2d(c, 3, 3, stride=2, padding=1), nn.LeakyReLU(0.1)],
                    shortcut=nn.Conv2d(c, 3, 1, stride=2),
                )
            ],
            2,
        ),
        "residual-conv-relu-maxpool-avgpool-shortcut-flatten": _case(
            lambda c, g: [
                Residual(
                    [nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)],
                    shortcut=nn.AvgPool2d(2),
                ),
                nn.Flatten(),
            ],
            8,
        ),
    }
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_layer_maso_matches_torch(name, dtype):
    seed = sum(map(ord, name))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mods, shape, R = CASES[name](rng, g)
    seq = nn.Sequential(*mods).to(dtype)
    A, B = layer_maso(seq, shape, dtype=dtype)
    x = torch.randn((16,) + shape, generator=g, dtype=dtype)
    with torch.no_grad():
        ref = seq(x).reshape(16, -1)
    assert A.dtype == dtype and B.dtype == dtype
    assert A.shape == (ref.shape[1], R, x[0].numel()), (A.shape, ref.shape)
    assert B.shape == A.shape[:2]
    torch.testing.assert_close(maso(A, B, x.reshape(16, -1)), ref, **TOL[dtype])
    # same result from a plain list, and for a single unbatched input
    A2, B2 = layer_maso(mods, shape, dtype=dtype)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    torch.testing.assert_close(maso(A, B, x[0].reshape(-1)), ref[0], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_regions_are_active_then_inactive(dtype):
    lin = nn.Linear(4, 3).to(dtype)
    A, B = layer_maso([lin, nn.ReLU()], (4,))
    assert torch.equal(A[:, 0], lin.weight.detach()) and torch.equal(
        B[:, 0], lin.bias.detach()
    )
    assert not bool(A[:, 1].any()) and not bool(B[:, 1].any())
    x = torch.randn(100, 4, dtype=dtype)
    active = (lin(x) > 0).detach()
    assert torch.equal(hard_vq(A, B, x)[..., 0].bool(), active)


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_params(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, groups=1).to(dtype)
    W, b = affine_params(conv, (2, 7, 6))
    assert W.shape == (3 * 4 * 3, 2 * 7 * 6) and b.shape == (36,)
    assert W.dtype == dtype and not W.requires_grad
    x = torch.randn(5, 2, 7, 6, dtype=dtype)
    torch.testing.assert_close(
        x.reshape(5, -1) @ W.T + b, conv(x).reshape(5, -1).detach(), **TOL[dtype]
    )
    # b is the bias broadcast over positions; no-bias conv gives b = 0
    assert torch.equal(b.reshape(3, 12), conv.bias.detach()[:, None].expand(3, 12))
    _, b0 = affine_params(nn.Conv2d(2, 3, 3, bias=False).to(dtype), (2, 5, 5))
    assert not bool(b0.any())
    # Linear: W is the weight itself
    lin = nn.Linear(4, 2).to(dtype)
    W, b = affine_params(lin, (4,))
    assert torch.equal(W, lin.weight.detach()) and torch.equal(b, lin.bias.detach())
    # parameter-free AvgPool2d uses the requested dtype
    W, b = affine_params(nn.AvgPool2d(2), (1, 4, 4), dtype=dtype)
    assert (
        W.dtype == dtype
        and torch.equal(W.sum(1), torch.ones(4, dtype=dtype))
        and not bool(b.any())
    )


def test_modules_abs_maxout():
    x = torch.randn(3, 6, 2, 2)
    assert torch.equal(Abs()(x), x.abs())
    m = Maxout(3)(x)
    assert m.shape == (3, 2, 2, 2)
    assert torch.equal(m[:, 1], x[:, 3:6].amax(1))
    assert Maxout(2)(torch.randn(5, 8)).shape == (5, 4)
    with pytest.raises(ValueError, match="not divisible by num_pieces = 4"):
        Maxout(4)(x)
    with pytest.raises(ValueError, match="num_pieces"):
        Maxout(0)


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _convnet():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3),
        Abs(),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def _poolnet():  # includes a parameter-free MASO layer [MaxPool2d, Flatten]
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def test_split_layers():
    groups = split_layers(_convnet())
    assert [[type(m).__name__ for m in g] for g in groups] == [
        ["Conv2d", "ReLU", "MaxPool2d"],
        ["Conv2d", "Abs", "Flatten"],
        ["Linear"],
    ]
    nested = nn.Sequential(
        nn.Sequential(nn.Linear(3, 3), nn.ReLU()),
        nn.Linear(3, 3),
        nn.BatchNorm1d(3),
        nn.LeakyReLU(),
        nn.BatchNorm1d(3),
        nn.Linear(3, 2),
    )
    assert [len(g) for g in split_layers(nested)] == [2, 3, 2]
    # AvgPool after a nonlinearity is pooling; a second pooling starts a new layer
    seq = [
        nn.Conv2d(1, 1, 1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.MaxPool2d(2),
        nn.Conv2d(1, 1, 1),
        nn.AvgPool2d(2),
    ]
    assert [len(g) for g in split_layers(seq)] == [3, 1, 2]
    assert [len(g) for g in split_layers(_poolnet())] == [3, 2, 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "net,shape",
    [(_mlp, (6,)), (_convnet, (2, 8, 8)), (_poolnet, (1, 8, 8))],
    ids=["mlp", "convnet", "poolnet"],
)
def test_region_affine_map(net, shape, dtype):
    torch.manual_seed(3)
    seq = net().to(dtype)
    for _ in range(3):
        x = torch.randn(shape, dtype=dtype)
        Ax, Bx = region_affine_map(seq, x)
        with torch.no_grad():
            y = seq(x[None]).reshape(-1)
        assert Ax.shape == (y.numel(), x.numel()) and Bx.shape == (y.numel(),)
        torch.testing.assert_close(Ax @ x.reshape(-1) + Bx, y, **TOL[dtype])
        J = torch.func.jacrev(lambda v: seq(v.reshape((1,) + shape)).reshape(-1))(
            x.reshape(-1)
        ).detach()
        torch.testing.assert_close(Ax, J, **TOL[dtype])
        # the same affine map is valid on a small neighbourhood of x (same region)
        x2 = x + 1e-7 * torch.randn(shape, dtype=dtype)
        with torch.no_grad():
            y2 = seq(x2[None]).reshape(-1)
        torch.testing.assert_close(Ax @ x2.reshape(-1) + Bx, y2, **TOL[dtype])


def test_region_affine_map_is_piecewise():
    """Different inputs generally fall in different regions, hence different slopes."""
    torch.manual_seed(4)
    seq = _mlp().double()
    maps = [
        region_affine_map(seq, torch.randn(6, dtype=torch.float64))[0] for _ in range(5)
    ]
    assert any(not torch.allclose(maps[0], m) for m in maps[1:])


def test_errors():
    lin = nn.Linear(3, 4)
    with pytest.raises(TypeError, match=r"Sigmoid.*supported modules are .*nn.ReLU"):
        layer_maso([lin, nn.Sigmoid()], (3,))
    with pytest.raises(TypeError, match="Tanh"):
        split_layers(nn.Sequential(lin, nn.Tanh()))
    with pytest.raises(ValueError, match="concave"):
        layer_maso([lin, nn.LeakyReLU(2.0)], (3,))
    with pytest.raises(ValueError, match="training mode"):
        layer_maso([lin, nn.BatchNorm1d(4), nn.ReLU()], (3,))
    with pytest.raises(ValueError, match="training mode"):
        affine_params(nn.BatchNorm2d(2), (2, 3, 3))
    conv = nn.Conv2d(1, 1, 3, padding=1)
    with pytest.raises(
        ValueError, match=r"R = 2\*\*9 = 512 regions per unit > max_regions = 100"
    ):
        layer_maso([conv, nn.ReLU(), nn.AvgPool2d(3)], (1, 6, 6), max_regions=100)
    with pytest.raises(ValueError, match="max_regions"):
        layer_maso([conv, nn.ReLU(), nn.MaxPool2d(3)], (1, 6, 6), max_regions=10)
    with pytest.raises(ValueError, match="split_layers"):
        layer_maso([lin, nn.ReLU(), nn.Linear(4, 2)], (3,))
    with pytest.raises(ValueError, match="not divisible by num_pieces"):
        layer_maso([nn.Linear(3, 5), Maxout(2)], (3,))
    with pytest.raises(ValueError, match="input_shape"):
        layer_maso([lin, nn.ReLU()], 3)
    with pytest.raises(ValueError, match="cannot be applied to input_shape"):
        layer_maso([lin, nn.ReLU()], (4,))
    with pytest.raises(TypeError, match="not an affine module"):
        affine_params([lin, nn.ReLU()], (3,))
    with pytest.raises(ValueError, match="dtype mismatch"):
        region_affine_map(_mlp(), torch.randn(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype mismatch"):
        layer_maso([lin, nn.ReLU()], (3,), dtype=torch.float64)


@pytest.mark.cuda
def test_cuda_layer_maso_and_region_map():
    torch.manual_seed(5)
    for net, shape in [(_convnet, (2, 8, 8)), (_poolnet, (1, 8, 8))]:
        seq = net().double()
        x = torch.randn(shape, dtype=torch.float64)
        Ax, Bx = region_affine_map(seq, x)
        Ax_c, Bx_c = region_affine_map(seq.cuda(), x.cuda())
        assert Ax_c.device.type == "cuda"
        torch.testing.assert_close(Ax_c.cpu(), Ax)
        torch.testing.assert_close(Bx_c.cpu(), Bx)
        with pytest.raises(ValueError, match="device mismatch"):
            region_affine_map(seq, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_adds_the_shortcut_to_every_region(dtype):
    """z + max_r(a_r z + b_r) = max_r((a_r + e) z + b_r): the body's MASO, shifted."""
    torch.manual_seed(5)
    body = [nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()]
    block = Residual(body).to(dtype)
    A, B = layer_maso([block], (2, 5, 5))
    A_body, B_body = layer_maso(body, (2, 5, 5))
    eye = torch.eye(50, dtype=dtype)
    assert torch.equal(A, A_body + eye[:, None, :]) and torch.equal(B, B_body)
    # the regions (VQ codes) are the body's: the shortcut adds the same to every score
    x = torch.randn(64, 50, dtype=dtype)
    assert torch.equal(hard_vq(A, B, x), hard_vq(A_body, B_body, x))


def _resnet():
    """Conv stem, a ResNet basic block (two convolutions inside the skip), a projection
    block, a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        Residual(
            [nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1)]
        ),
        nn.ReLU(),
        Residual(
            [nn.Conv2d(3, 4, 3, stride=2, padding=1), Abs()],
            shortcut=nn.Conv2d(3, 4, 1, stride=2),
        ),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 2),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_region_affine_map(dtype):
    torch.manual_seed(6)
    seq = _resnet().to(dtype)
    assert [[type(m).__name__ for m in g] for g in split_layers(seq)] == [
        ["Conv2d", "ReLU"],
        ["Residual"],
        ["ReLU"],
        ["Residual", "Flatten"],
        ["Linear"],
    ]
    for _ in range(3):
        x = torch.randn(1, 6, 6, dtype=dtype)
        Ax, Bx = region_affine_map(seq, x)
        with torch.no_grad():
            y = seq(x[None]).reshape(-1)
        J = torch.autograd.functional.jacobian(
            lambda v: seq(v.reshape(1, 1, 6, 6)).reshape(-1), x.reshape(-1)
        )
        torch.testing.assert_close(Ax, J, **TOL[dtype])
        torch.testing.assert_close(Ax @ x.reshape(-1) + Bx, y, **TOL[dtype])


def test_residual_errors():
    with pytest.raises(TypeError, match="shortcut must be affine"):
        Residual([nn.Linear(3, 3), nn.ReLU()], shortcut=nn.ReLU())
    with pytest.raises(TypeError, match="unsupported module"):
        layer_maso([Residual([nn.Linear(3, 3), nn.Tanh()])], (3,))
    two_layers = Residual([nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)])
    with pytest.raises(ValueError, match="not one MASO layer"):
        layer_maso([two_layers], (3,))
    with pytest.raises(ValueError, match="must match"):
        layer_maso([Residual([nn.Linear(3, 4), nn.ReLU()])], (3,))
    with pytest.raises(ValueError, match="layer of its own"):
        layer_maso([Residual([nn.Linear(3, 3), nn.ReLU()]), nn.ReLU()], (3,))
