"""Tests for smaso.models: the largeCNN of Appendix D."""

import pytest
import torch
from torch import nn

from smaso.layers import Abs
from smaso.models import large_cnn, num_parameters
from smaso.orthogonal import orthogonal_layers, register_orthogonal

# (in, out, kernel, stride, padding) of the nine convolutions listed in Appendix D
LISTING = [(3, 96, 3, 1, 1), (96, 96, 3, 1, 1), (96, 96, 3, 2, 1), (96, 192, 3, 1, 1), (192, 192, 3, 1, 1),
           (192, 192, 3, 2, 1), (192, 192, 3, 1, 0), (192, 192, 1, 1, 0), (192, 10, 1, 1, 0)]

@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these small linear-algebra calls are fastest, and steadiest on a shared
    CPU, without thread synchronisation. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def test_large_cnn_matches_appendix_d():
    model = large_cnn()
    assert isinstance(model, nn.Sequential)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    got = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs]
    assert got == LISTING
    assert all(c.bias is not None and c.kernel_size[0] == c.kernel_size[1] for c in convs)
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
    assert model(torch.randn(1, 1, 9, 9)).shape == (1, 100)  # the smallest input it accepts
    assert num_parameters(model) == 1_369_738 - 2 * 96 * 9 - 10 * 193 + 100 * 193


def test_large_cnn_exactly_orthogonal():
    torch.manual_seed(0)
    model = large_cnn()
    layers = register_orthogonal(model, "qr")
    assert layers == orthogonal_layers(model) and len(layers) == 9
    for m in layers:
        F = m.weight.detach().reshape(m.out_channels, -1)
        small = min(F.shape)
        gram = F @ F.T if F.shape[0] <= F.shape[1] else F.T @ F  # first conv: 96 filters in R^27
        assert (gram - torch.eye(small)).abs().max() < 1e-5
    assert num_parameters(model) == 1_369_738  # the raw weights are the parameters


def test_large_cnn_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        large_cnn(num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        large_cnn(in_channels=2.5)
    with pytest.raises(TypeError, match="activation"):
        large_cnn(activation=torch.relu)
    with pytest.raises(TypeError, match="nn.Module"):
        num_parameters("model")
