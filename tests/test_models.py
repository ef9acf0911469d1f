"""Tests for smaso.models: the largeCNN of Appendix D."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from smaso.activations import BetaVQReLU, SoftplusSwish
from smaso.filters import register_filters
from smaso.layers import Abs
from smaso.models import (
    ACTIVATIONS,
    MODELS,
    build,
    large_cnn,
    large_cnn_code,
    num_parameters,
    small_cnn,
    study_cnn,
)
from smaso.orthogonal import orthogonal_layers, register_orthogonal

# (in, out, kernel, stride, padding) of the nine convolutions listed in Appendix D
LISTING = [
    (3, 96, 3, 1, 1),
    (96, 96, 3, 1, 1),
    (96, 96, 3, 2, 1),
    (96, 192, 3, 1, 1),
    (192, 192, 3, 1, 1),
    (192, 192, 3, 2, 1),
    (192, 192, 3, 1, 0),
    (192, 192, 1, 1, 0),
    (192, 10, 1, 1, 0),
]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_large_cnn_matches_appendix_d():
    model = large_cnn()
    assert isinstance(model, nn.Sequential)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    got = [
        (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0])
        for c in convs
    ]
    assert got == LISTING
    assert all(
        c.bias is not None and c.kernel_size[0] == c.kernel_size[1] for c in convs
    )
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "ReLU"] * 8 + ["Conv2d", "AdaptiveAvgPool2d", "Flatten"]
    expected = sum(cout * (cin * k * k + 1) for cin, cout, k, _, _ in LISTING)
    assert num_parameters(model) == expected == 1_369_738


def test_large_cnn_shapes_and_options():
    torch.manual_seed(0)
    model = large_cnn(num_classes=100, in_channels=1, activation=Abs)
    assert sum(isinstance(m, Abs) for m in model) == 8
    x = torch.randn(2, 1, 32, 32)
    feats = model[:-3](x)
    assert feats.shape == (2, 192, 6, 6)  # 32 -> 16 -> 8 -> 6 (valid 3x3)
    assert model(x).shape == (2, 100)
    assert model(torch.randn(1, 1, 9, 9)).shape == (
        1,
        100,
    )  # the smallest input it accepts
    assert num_parameters(model) == 1_369_738 - 2 * 96 * 9 - 10 * 193 + 100 * 193


def test_large_cnn_exactly_orthogonal():
    torch.manual_seed(0)
    model = large_cnn()
    layers = register_orthogonal(model, "qr")
    assert layers == orthogonal_layers(model) and len(layers) == 9
    for m in layers:
        F = m.weight.detach().reshape(m.out_channels, -1)
        small = min(F.shape)
        gram = (
            F @ F.T if F.shape[0] <= F.shape[1] else F.T @ F
        )  # first conv: 96 filters in R^27
        assert (gram - torch.eye(small)).abs().max() < 1e-5
    assert num_parameters(model) == 1_369_738  # the raw weights are the parameters


def test_large_cnn_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        large_cnn(num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        large_cnn(in_channels=2.5)
    with pytest.raises(TypeError, match="activation"):
        large_cnn(activation=torch.relu)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        num_parameters("model")


# ------------------------------------------------------------------ the authors' code:
# smallCNN, largeCNN


# (in, out, kernel, padding) of the convolutions, and whether a 2x2 max-pool follows
SMALL = {
    1: [(3, 32, 3, 0, True), (32, 64, 3, 0, True), (64, 128, 1, 0, False)],
    2: [(3, 32, 5, 0, True), (32, 64, 3, 0, True), (64, 128, 3, 0, False)],
}
LARGE_TAIL = [
    (96, 96, 3, 2, False),
    (96, 96, 3, 2, True),
    (96, 192, 3, 0, False),
    (192, 192, 3, 2, False),
    (192, 192, 3, 0, True),
    (192, 192, 3, 0, False),
    (192, 192, 1, 0, False),
]
LARGE = {
    1: [(3, 96, 3, 1, False)] + LARGE_TAIL,
    2: [(3, 64, 5, 2, False), (64, 96, 3, 2, False)] + LARGE_TAIL[1:],
}


def _count(spec, classes, dense_bias):
    convs = sum(
        cout * (cin * k * k + 1) + 2 * cout for cin, cout, k, _, _ in spec
    )  # weights, biases, BN affine
    return convs + spec[-1][1] * classes + (classes if dense_bias else 0)


def _conv_spec(model):
    mods = list(model)
    out = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            pool = any(isinstance(n, nn.MaxPool2d) for n in mods[i + 1 : i + 4])
            out.append(
                (m.in_channels, m.out_channels, m.kernel_size[0], m.padding[0], pool)
            )
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_small_cnn_matches_the_authors_code(version):
    model = small_cnn(version=version)
    assert _conv_spec(model) == SMALL[version]
    kinds = [type(m).__name__ for m in model]
    assert kinds[:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert kinds[-3:] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert (model[-1].bias is not None) == (version == 2)
    n = num_parameters(model)
    assert (
        n == _count(SMALL[version], 10, version == 2) == {1: 29_440, 2: 96_522}[version]
    )
    print(f"smallCNN version {version}: {n:,} parameters")
    torch.manual_seed(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    smallest = {1: 10, 2: 20}[version]
    model.eval()  # (a single 1x1 map cannot be batch-normalised in training mode)
    assert model(torch.randn(1, 3, smallest, smallest)).shape == (1, 10)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, smallest - 1, smallest - 1))


@pytest.mark.parametrize("version", [1, 2])
def test_large_cnn_code_matches_the_authors_code(version):
    model = large_cnn_code(version=version, num_classes=100)
    assert _conv_spec(model) == LARGE[version]
    bns = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 8 and all(
        b.eps == 1e-3 and b.momentum == 0.01 for b in bns
    )  # TensorFlow's defaults
    n = num_parameters(model)
    assert n == _count(LARGE[version], 100, version == 2)
    assert (
        num_parameters(large_cnn_code(version=version))
        == {1: 1_372_224, 2: 1_346_698}[version]
    )
    print(
        f"largeCNN (authors' code) version {version}: {n:,} parameters with 100 classes"
    )
    sizes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        for m in model
        if isinstance(m, nn.Conv2d)
    ]
    torch.manual_seed(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert sizes == [
        32,
        34,
        36,
        16,
        18,
        16,
        6,
        6,
    ]  # 'full' grows, max-pool halves (36 -> 18, 16 -> 8)
    for h in hooks:
        h.remove()
    conv = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(
        float(m.bias.detach().abs().max()) == 0 for m in conv if m.bias is not None
    )  # zero-initialised biases


def test_version_2_is_the_one_gram_schmidt_can_orthogonalise():
    for make in (small_cnn, large_cnn_code):
        register_orthogonal(
            make(version=2), "gs", tall="error"
        )  # every layer: out <= fan_in
        with pytest.raises(ValueError, match="cannot be mutually orthogonal"):
            register_orthogonal(make(version=1), "qr", tall="error")


def test_activation_and_orthogonality_options():
    torch.manual_seed(0)
    m = small_cnn(activation="swish", version=2)
    betas = [a for a in m if isinstance(a, BetaVQReLU)]
    assert [b.rho.numel() for b in betas] == [32, 64, 128] and all(
        b.rho.requires_grad for b in betas
    )
    assert torch.allclose(
        betas[0].eta, torch.ones(32)
    )  # starts at the SiLU (beta = 1/2)
    assert any(isinstance(a, nn.SiLU) for a in small_cnn(activation="silu"))
    ex = large_cnn_code(version=2, activation="swish")
    layers = register_filters(ex, "qr")
    assert len(layers) == 9 and all(
        parametrize.is_parametrized(m, "weight") for m in layers
    )
    for m in layers:
        F = m.weight.detach().reshape(m.weight.shape[0], -1)
        assert (F @ F.T - torch.eye(F.shape[0])).abs().max() < 1e-5
    # the authors' exact run leaves the dense layer as it is
    ex2 = large_cnn_code(version=2)
    assert len(register_filters(ex2, "gs-unnormalised", dense=False)) == 8
    assert not parametrize.is_parametrized(ex2[-1], "weight")


D64 = torch.float64


def test_authors_swish_is_softplus_parametrised():
    torch.manual_seed(0)
    m = small_cnn(activation="swish-softplus")
    acts = [a for a in m if isinstance(a, SoftplusSwish)]
    assert [a.rho.numel() for a in acts] == [32, 64, 128]
    eta0 = math.log1p(math.exp(0.5))  # softplus(0.5) = 0.974...
    assert torch.allclose(acts[0].eta.double(), torch.full((32,), eta0, dtype=D64))
    x = torch.randn(4, 32, 5, 5, dtype=D64)
    a = acts[0].double()
    assert torch.allclose(a(x), x * torch.sigmoid(eta0 * x))  # x sigmoid(eta x)
    assert abs(float(a.beta[0].detach()) - eta0 / (1 + eta0)) < 1e-12


def test_authors_v1_last_conv_has_no_batch_norm_and_a_bias():
    base = large_cnn_code()
    conv = [m for m in base if isinstance(m, nn.Conv2d)]
    assert isinstance(base[list(base).index(conv[-1]) + 1], nn.BatchNorm2d)
    authors = large_cnn_code(bn_last=False, conv_bias=False)
    mods = list(authors)
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    last = mods.index(convs[-1])
    assert isinstance(mods[last + 1], nn.ReLU)  # straight to the activation
    assert convs[-1].bias is not None  # nothing after it removes a shift
    assert all(c.bias is None for c in convs[:-1])  # batch norm follows those
    assert sum(isinstance(m, nn.BatchNorm2d) for m in mods) == 7
    # no redundant bias: 7 x (bias) fewer conv parameters, 192 fewer BN ones, +192 bias
    n_base, n = num_parameters(base), num_parameters(authors)
    redundant = sum(c.out_channels for c in convs[:-1])
    assert n_base - n == redundant + 2 * 192 - 0
    # a bias before batch norm changes nothing the network computes (training mode)
    torch.manual_seed(0)
    a, b = large_cnn_code(version=2), large_cnn_code(version=2, conv_bias=False)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k in b.state_dict()})
    with torch.no_grad():
        for m in a:
            if isinstance(m, nn.Conv2d):
                m.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(a(x), b(x), atol=1e-4)


def test_registries_build_every_network():
    x = torch.randn(2, 3, 32, 32)
    for name in MODELS:
        for act in ("relu", "swish"):
            torch.manual_seed(0)
            assert build(name, 10, 3, act, bn_momentum=0.1).eval()(x).shape == (2, 10)
    assert set(ACTIVATIONS) >= {"relu", "silu", "swish", "swish-softplus"}
    with pytest.raises(ValueError, match="model"):
        build("resnet", 10, 3)
    # the study's network: PyTorch's initialisation, no batch norm
    m = study_cnn(10, 1)
    assert not any(isinstance(a, nn.BatchNorm2d) for a in m)


def test_code_models_bad_arguments():
    with pytest.raises(ValueError, match="version"):
        small_cnn(version=3)
    with pytest.raises(ValueError, match="method"):
        register_filters(large_cnn_code(), "svd")
    with pytest.raises(ValueError, match="activation"):
        small_cnn(activation="tanh")
    with pytest.raises(ValueError, match="bn_momentum"):
        small_cnn(bn_momentum=0)
    with pytest.raises(ValueError, match="num_classes"):
        large_cnn_code(num_classes=0)
