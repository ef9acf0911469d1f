"""Nonlinearities induced by soft/β-VQ (Props. 3–7, Table 1) and the learnable-β modules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smaso.activations import (
    BetaVQAbs,
    BetaVQLeakyReLU,
    BetaVQMaxPool2d,
    BetaVQReLU,
    abs_maso,
    beta_softmax_pool2d,
    beta_vq_abs,
    beta_vq_leaky_relu,
    convex_maso,
    leaky_relu_maso,
    relu_maso,
    scalar_beta_maso,
    swish,
    swish_fused,
)
from smaso.layers import layer_maso
from smaso.vq import beta_maso, soft_vq

DT = torch.float64
BETAS = [0.05, 0.3, 0.5, 0.7, 0.95]
x = torch.linspace(-6, 6, 241, dtype=DT)


@pytest.mark.parametrize("beta", BETAS)
def test_beta_vq_of_scalar_masos_equals_the_closed_forms(beta):
    eta = beta / (1 - beta)
    assert torch.allclose(
        scalar_beta_maso(*relu_maso(), x, beta), swish(x, eta), atol=1e-12
    )  # Prop. 7
    assert torch.allclose(
        scalar_beta_maso(*abs_maso(), x, beta), beta_vq_abs(x, eta), atol=1e-12
    )
    assert torch.allclose(
        scalar_beta_maso(*leaky_relu_maso(0.2), x, beta),
        beta_vq_leaky_relu(x, eta, 0.2),
        atol=1e-12,
    )


def test_soft_relu_is_silu_prop3():
    x32 = torch.randn(10_000)
    assert torch.allclose(
        scalar_beta_maso(*relu_maso(torch.float32), x32, 0.5), F.silu(x32), atol=1e-6
    )
    assert torch.allclose(swish(x32, 1.0), F.silu(x32), atol=1e-6)


def test_hard_and_linear_limits_of_scalar_masos():
    A, B = convex_maso([-1.0, -0.25, 0.5, 2.0], [-1.0, 0.0, 0.2, -2.0])
    assert torch.allclose(
        scalar_beta_maso(A, B, x, 1.0),
        (x[:, None] * A[0, :, 0] + B[0]).amax(-1),
        atol=1e-12,
    )
    assert torch.allclose(
        scalar_beta_maso(A, B, x, 0.0),
        (x[:, None] * A[0, :, 0] + B[0]).mean(-1),
        atol=1e-12,
    )
    assert torch.allclose(scalar_beta_maso(*relu_maso(), x, 1.0), F.relu(x))
    assert torch.allclose(swish(x, 0.0), x / 2)


def test_beta_softmax_pooling_is_the_beta_vq_of_the_max_pooling_maso_prop4():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 6, 6, generator=g, dtype=DT)
    A, B = layer_maso([nn.MaxPool2d(2)], (3, 6, 6), dtype=DT)
    for beta in BETAS:
        eta = beta / (1 - beta)
        from_maso = beta_maso(A, B, img.flatten(1), beta).view(2, 3, 3, 3)
        assert torch.allclose(from_maso, beta_softmax_pool2d(img, eta, 2), atol=1e-12)
    u = img.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 3, 3, 3, 4)
    assert torch.allclose(
        beta_softmax_pool2d(img, 1.0, 2), (torch.softmax(u, -1) * u).sum(-1), atol=1e-12
    )
    assert torch.allclose(beta_softmax_pool2d(img, 1e9, 2), F.max_pool2d(img, 2))
    assert torch.allclose(
        beta_softmax_pool2d(img, 0.0, 3, 2, 1),
        F.avg_pool2d(img, 3, 2, 1, count_include_pad=False),
    )


def test_soft_dn_layers_sigmoid_tanh_softmax_props5_6():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).double()
    z = torch.randn(100, 5, dtype=DT)
    u = lin(z)
    A, B = layer_maso([lin, nn.ReLU()], (5,))
    assert torch.allclose(
        soft_vq(A, B, z)[..., 0], torch.sigmoid(u), atol=1e-12
    )  # Prop. 5
    A2, B2 = layer_maso(
        [nn.Linear(5, 4).double().requires_grad_(False), nn.ReLU()], (5,)
    )
    A2, B2 = 2 * A, 2 * B  # App. E.6: doubled weights, then 2p - 1
    assert torch.allclose(2 * soft_vq(A2, B2, z)[..., 0] - 1, torch.tanh(u), atol=1e-12)
    # Prop. 6: one unit whose R = C pieces are the class rows of a fully connected layer
    A_fc, B_fc = lin.weight.detach()[None], lin.bias.detach()[None]
    assert torch.allclose(
        soft_vq(A_fc, B_fc, z)[:, 0], torch.softmax(u, -1), atol=1e-12
    )


MODULES = [
    lambda: BetaVQReLU(3, beta_init=0.3),
    lambda: BetaVQReLU(3, beta_init=0.3, fused=True),
    lambda: BetaVQLeakyReLU(0.1, 3, beta_init=0.6),
    lambda: BetaVQAbs(3, beta_init=0.8),
    lambda: BetaVQMaxPool2d(2, num_channels=3, beta_init=0.4),
    lambda: BetaVQMaxPool2d(3, stride=2, padding=1, beta_init=0.4),
    lambda: BetaVQReLU(None),
]


@pytest.mark.parametrize("make", MODULES, ids=range(len(MODULES)))
def test_modules_gradcheck_input_and_beta(make):
    m = make().double()
    if getattr(m, "fused", False):
        m.fused = False  # gradcheck the handwritten backward below; the compiled kernels run the same code
    inp = torch.randn(2, 3, 4, 4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, rho: torch.func.functional_call(m, {"rho": rho}, (t,)),
        (inp, m.rho.detach().clone().requires_grad_(True)),
    )


def test_swish_fused_backward_gradcheck_and_value():
    inp = torch.randn(2, 3, 4, 4, dtype=DT, requires_grad=True)
    eta = torch.rand(1, 3, 1, 1, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, e: swish_fused(t, e, compiled=False), (inp, eta)
    )
    assert torch.allclose(swish_fused(inp, eta, compiled=False), swish(inp, eta))
    fixed = eta.detach()  # no gradient wanted for eta: the input-only backward kernel
    assert torch.autograd.gradcheck(
        lambda t: swish_fused(t, fixed, compiled=False), (inp,)
    )


def test_modules_match_the_functional_closed_forms_and_beta_stays_in_unit_interval():
    torch.manual_seed(0)
    inp = torch.randn(4, 3, 6, 6)
    relu = BetaVQReLU(3, beta_init=0.5)
    assert torch.allclose(relu(inp), F.silu(inp), atol=1e-6)
    opt = torch.optim.SGD(relu.parameters(), lr=1.0)
    for _ in range(5):
        opt.zero_grad()
        (relu(inp) ** 2).sum().backward()
        opt.step()
    assert ((relu.beta > 0) & (relu.beta < 1)).all() and relu.beta.shape == (3,)
    assert torch.allclose(relu.eta, relu.beta / (1 - relu.beta), rtol=1e-5)
    assert torch.allclose(
        BetaVQAbs(beta_init=0.5)(inp), inp * torch.tanh(inp), atol=1e-6
    )
    assert torch.allclose(
        BetaVQMaxPool2d(2, beta_init=1 - 1e-7)(inp), F.max_pool2d(inp, 2), atol=1e-4
    )
    assert BetaVQReLU(learnable=False).rho.requires_grad is False


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="beta_init"):
        BetaVQReLU(beta_init=1.0)
    with pytest.raises(ValueError, match="num_channels"):
        BetaVQAbs(num_channels=0)
    with pytest.raises(ValueError, match="channels"):
        BetaVQReLU(4)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="concave"):
        BetaVQLeakyReLU(negative_slope=2.0)
    with pytest.raises(ValueError, match="eta"):
        swish(x, -1.0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        beta_softmax_pool2d(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        beta_softmax_pool2d(torch.randn(1, 3, 4, 4), torch.ones(2))
    with pytest.raises(ValueError, match="equal length"):
        convex_maso([1.0, 2.0], [0.0])
    with pytest.raises(ValueError, match="beta must lie"):
        scalar_beta_maso(*relu_maso(), x, 1.5)
