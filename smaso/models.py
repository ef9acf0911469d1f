"""Network topologies of the paper's experiments (Appendix D) and of the authors'
released code, and the two registries a network is built from by name.

* :func:`large_cnn` is the largeCNN exactly as Appendix D lists it: nine convolutions
  (two with stride 2), then global average pooling; no batch norm.
* :func:`large_cnn_code` is the largeCNN the authors' released code trains: batch norm
  before each activation, 'full'/'valid' paddings with 2x2 max-pooling instead of
  strides, global average pooling, then a dense layer. ``version=1`` starts with 96 3x3
  filters (the orthogonality-penalty script); ``version=2`` with 64 5x5 filters (the
  script with the Gram-Schmidt layers): 64 filters in R^75 can be orthogonal, 96 in R^27
  cannot.
* :func:`small_cnn` is the smallCNN of the authors' code (Appendix D names it but does
  not list it), in the same two versions: ``version=1`` (penalty script) 32 3x3 / pool /
  64 3x3 / pool / 128 1x1; ``version=2`` (Gram-Schmidt script) 32 5x5 / pool / 64 3x3 /
  pool / 128 3x3; then global average pooling and a dense layer.
* :func:`study_cnn` is the network of the activation study of chapter 7 (no batch norm,
  PyTorch's initialisation).

All of them but :func:`large_cnn` are one list of layers through :func:`conv_net`.
Builders take *structural* options only (the activation, batch norm, biases); the loss
and its orthogonality penalty, and exact orthogonality of the filters, are the
experiment runner's business (:mod:`smaso.experiment`).

Registries: :data:`ACTIVATIONS` (name -> description, module factory of the number of
channels) and :data:`MODELS` (name -> description, builder). A new activation or network
is one entry here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .activations import (
    BetaVQAbs,
    BetaVQLeakyReLU,
    BetaVQMaxout,
    BetaVQReLU,
    SoftplusSwish,
    TsallisVQReLU,
)
from .checks import choice, finite_number, positive_int

__all__ = [
    "ACTIVATIONS",
    "BN_MOMENTUM",
    "MODELS",
    "GroupedLinear",
    "activation_factory",
    "build",
    "can_pack",
    "conv_net",
    "large_cnn",
    "large_cnn_code",
    "num_parameters",
    "small_cnn",
    "study_cnn",
]

#: Activation name -> (description, factory of the number of channels ``c``). Learnable
#: β is per channel. "swish" is the β-VQ of the ReLU (Proposition 7) learning ρ = log η
#: from η = 1 (the SiLU); "swish-softplus" is the authors' code's η = softplus(ρ), ρ
#: from 0.5. The β-VQ and Tsallis-VQ arms are the activations of chapter 7.
ACTIVATIONS: dict[str, tuple[str, Callable[[int], nn.Module]]] = {
    "relu": ("ReLU (hard VQ, beta = 1)", lambda c: nn.ReLU()),
    "silu": ("SiLU (soft VQ, beta fixed at 1/2)", lambda c: nn.SiLU()),
    "swish": (
        "swish = beta-VQ ReLU, learnable beta (init 1/2)",
        lambda c: BetaVQReLU(c),
    ),
    "swish-softplus": (
        "swish with eta = softplus(rho), rho from 0.5 (the authors' code)",
        lambda c: SoftplusSwish(c),
    ),
    "bvq-leaky": (
        "beta-VQ leaky-ReLU (slope 0.1), learnable beta (init 1/2)",
        lambda c: BetaVQLeakyReLU(0.1, c),
    ),
    "bvq-abs": (
        "beta-VQ absolute value x tanh(eta x), learnable beta (init 1/2)",
        lambda c: BetaVQAbs(c),
    ),
    "bvq-maxout3": (
        "beta-VQ learned convex max-affine, R = 3 pieces per channel, learnable beta "
        "(init 1/2)",
        lambda c: BetaVQMaxout(c, pieces=3),
    ),
    "hardswish": (
        "hard-swish (Gini-VQ ReLU, beta fixed at 1/4)",
        lambda c: nn.Hardswish(),
    ),
    "gini-relu": (
        "Gini-VQ ReLU (alpha = 2), learnable beta (init 1/4: hard-swish)",
        lambda c: TsallisVQReLU(c, alpha=2.0, beta_init=0.25),
    ),
    "entmax15-relu": (
        "Tsallis-VQ ReLU (alpha = 1.5), learnable beta (init 1/2)",
        lambda c: TsallisVQReLU(c, alpha=1.5, beta_init=0.5),
    ),
}


def activation_factory(activation) -> Callable[[int], nn.Module]:
    """``activation`` as a function of the number of channels: a name of
    :data:`ACTIVATIONS`, or a callable returning an ``nn.Module`` (e.g. ``nn.ReLU``,
    which then ignores the channel count)."""
    if isinstance(activation, str):
        choice("activation", activation, ACTIVATIONS)
        return ACTIVATIONS[activation][1]
    try:
        ok = isinstance(activation(), nn.Module)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(
            f"activation must be one of {', '.join(ACTIVATIONS)} or a callable "
            f"returning an nn.Module (e.g. nn.ReLU), got {activation!r}"
        )
    return lambda c: activation()


def _check_classes(num_classes, in_channels):
    positive_int("num_classes", num_classes)
    positive_int("in_channels", in_channels)


def large_cnn(num_classes=10, in_channels=3, activation=nn.ReLU):
    """The largeCNN of Appendix D as an ``nn.Sequential`` mapping (N, in_channels, H, W)
    to (N, num_classes).

    Convolutions (all with bias): 3x3 96, 3x3 96, 3x3 96 stride 2, 3x3 192, 3x3 192, 3x3
    192 stride 2 (all 'same', i.e. padding 1), 3x3 192 'valid' (no padding), 1x1 192,
    1x1 ``num_classes``; each but the last followed by the activation (a name of
    :data:`ACTIVATIONS` or a module factory such as ``nn.ReLU``); then global average
    pooling. 'Same' padding with stride 2 is padding 1, as in Lasagne: 32x32 inputs give
    16x16 and 8x8 maps, then 6x6 after the valid convolution. Inputs need H, W >= 9.
    With the defaults it has 1,369,738 parameters.
    """
    _check_classes(num_classes, in_channels)
    act = activation_factory(activation)
    convs = [
        nn.Conv2d(in_channels, 96, 3, padding=1),
        nn.Conv2d(96, 96, 3, padding=1),
        nn.Conv2d(96, 96, 3, stride=2, padding=1),
        nn.Conv2d(96, 192, 3, padding=1),
        nn.Conv2d(192, 192, 3, padding=1),
        nn.Conv2d(192, 192, 3, stride=2, padding=1),
        nn.Conv2d(192, 192, 3),
        nn.Conv2d(192, 192, 1),
        nn.Conv2d(192, num_classes, 1),
    ]
    layers = []
    for conv in convs[:-1]:
        layers += [conv, act(conv.out_channels)]
    layers += [convs[-1], nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def num_parameters(model):
    """Number of trainable scalars of ``model`` (raw parameters of parametrised layers
    included), e.g. 1,369,738 for the Appendix D largeCNN of :func:`large_cnn`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------
# The authors' code: smallCNN and largeCNN, with batch norm, max-pooling and a dense
# output layer; and the activation study's network. One list of layers each.

#: Batch-norm running-average momentum of the authors' code: TensorFlow's decay 0.99.
BN_MOMENTUM = 0.01

# (filters, kernel, padding, 2x2 max-pool after) of each convolution; padding 'same' =
# (k-1)/2, 'full' = k-1, 'valid' = 0, as the authors' Lasagne-style layer pads.
_SMALL = {
    1: [(32, 3, 0, True), (64, 3, 0, True), (128, 1, 0, False)],
    2: [(32, 5, 0, True), (64, 3, 0, True), (128, 3, 0, False)],
}
_LARGE = {
    1: [
        (96, 3, 1, False),
        (96, 3, 2, False),
        (96, 3, 2, True),
        (192, 3, 0, False),
        (192, 3, 2, False),
        (192, 3, 0, True),
        (192, 3, 0, False),
        (192, 1, 0, False),
    ],
    2: [
        (64, 5, 2, False),
        (96, 3, 2, False),
        (96, 3, 2, True),
        (192, 3, 0, False),
        (192, 3, 2, False),
        (192, 3, 0, True),
        (192, 3, 0, False),
        (192, 1, 0, False),
    ],
}


class GroupedLinear(nn.Linear):
    """``groups`` independent dense layers in one, as ``nn.Conv2d(groups=...)`` is for
    convolutions: input (N, groups * in_features), output (N, groups * out_features),
    group ``g`` of the output from group ``g`` of the input by its own (out_features,
    in_features) block, rows ``g * out_features ...`` of ``weight``. The dense layer of
    packed runs (:mod:`smaso.pack`); an ``nn.Linear`` to the penalties and exact
    orthogonality of Section 5, which treat its groups apart."""

    def __init__(self, in_features, out_features, groups, bias=True):
        positive_int("groups", groups)
        super().__init__(in_features, out_features * groups, bias)
        self.groups = groups

    def forward(self, x):
        g = self.groups
        W = self.weight.view(g, -1, self.in_features)
        out = torch.einsum("ngi,goi->ngo", x.view(len(x), g, self.in_features), W)
        if self.bias is not None:
            out = out + self.bias.view(g, -1)
        return out.reshape(len(x), -1)

    def extra_repr(self):
        return f"{super().extra_repr()}, groups={self.groups}"


def conv_net(
    spec,
    num_classes,
    in_channels,
    activation="relu",
    *,
    batch_norm=True,
    bn_momentum=BN_MOMENTUM,
    conv_bias=True,
    bn_last=True,
    dense_bias=False,
    glorot=True,
    runs=1,
):
    """Convolutions from ``spec`` (filters, kernel, padding, 2x2 max-pool after), each
    followed by batch norm and the activation; global average pooling; a dense layer to
    ``num_classes``.

    ``batch_norm``/``bn_last``: batch norm after every convolution / after the last one
    too. It uses TensorFlow's defaults as the authors' code does: epsilon 1e-3 and
    running averages with decay 0.99 (``bn_momentum=0.01`` in PyTorch's convention).
    ``conv_bias``: a bias on convolutions that batch norm follows (redundant there:
    batch norm removes any per-channel shift; a convolution without batch norm always
    has one). ``glorot``: the authors' initialisation, Glorot-uniform weights and zero
    biases (else PyTorch's default). ``runs > 1``: that many independent copies of the
    network side by side (grouped convolutions, per-channel batch norm and activations,
    :class:`GroupedLinear`), mapping (N, runs * in_channels, H, W) to (N, runs *
    num_classes); :mod:`smaso.pack` trains several runs that way.
    """
    _check_classes(num_classes, in_channels)
    finite_number("bn_momentum", bn_momentum, 0, 1, low_open=True)
    g = positive_int("runs", runs)
    act = activation_factory(activation)
    layers, c = [], in_channels
    for i, (out, k, pad, pool) in enumerate(spec):
        bn = batch_norm and (bn_last or i < len(spec) - 1)
        bias = conv_bias or not bn
        layers.append(nn.Conv2d(c * g, out * g, k, padding=pad, bias=bias, groups=g))
        if bn:
            layers.append(nn.BatchNorm2d(out * g, eps=1e-3, momentum=bn_momentum))
        layers.append(act(out * g))
        if pool:
            layers.append(nn.MaxPool2d(2))
        c = out
    dense = (
        nn.Linear(c, num_classes, bias=dense_bias)
        if g == 1
        else GroupedLinear(c, num_classes, g, bias=dense_bias)
    )
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), dense)
    if glorot:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                for w in m.weight.chunk(g):  # each run's block: its own fans
                    nn.init.xavier_uniform_(w)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model


def _version(version):
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    return version


def small_cnn(num_classes=10, in_channels=3, activation="relu", version=1, **options):
    """The smallCNN of the authors' code (Appendix D names it, Section 5), as an
    ``nn.Sequential``.

    ``version=1`` (their orthogonality-penalty script): conv 32 3x3 valid, BN, act,
    max-pool 2; conv 64 3x3 valid, BN, act, max-pool 2; conv 128 1x1, BN, act; global
    average pooling; dense ``num_classes`` without bias. 30x30 -> 15 -> 13 -> 6 maps for
    32x32 inputs (inputs >= 10x10); 29,440 parameters for CIFAR-10 (96,522 in version
    2). ``version=2`` (their Gram-Schmidt script): conv 32 5x5 valid, ..., conv 64 3x3
    valid, ..., conv 128 3x3 valid, BN, act; global average pooling; dense with bias
    (inputs >= 20x20). In version 2 every layer has at most as many filters as entries
    per patch (32 <= 75, 64 <= 288, 128 <= 576), so its flattened filters can be
    orthonormal (Eq. 11 at one position); in version 1 two layers cannot (32 filters in
    R^27, 128 in R^64). ``activation``: a name of :data:`ACTIVATIONS` or a module
    factory. ``options``: the batch-norm and bias options of :func:`conv_net`.
    """
    v = _version(version)
    return conv_net(
        _SMALL[v], num_classes, in_channels, activation, dense_bias=v == 2, **options
    )


def large_cnn_code(
    num_classes=10, in_channels=3, activation="relu", version=1, **options
):
    """The largeCNN as the authors' code trains it (Section 5, Table 2; cf. Appendix D's
    listing, :func:`large_cnn`), as an ``nn.Sequential``.

    Convolutions (each followed by batch norm and the activation): 96 3x3 'same', 96 3x3
    'full', 96 3x3 'full', max-pool 2, 192 3x3 'valid', 192 3x3 'full', 192 3x3 'valid',
    max-pool 2, 192 3x3 'valid', 192 1x1; global average pooling; dense ``num_classes``
    (no bias in version 1). 32x32 inputs give maps 32, 34, 36, 18, 16, 18, 16, 8, 6, 6.
    ``version=2`` starts with 64 5x5 'same' filters instead (and its dense layer has a
    bias). ``options``: those of :func:`conv_net`; ``bn_last=False`` (no batch norm
    after the last 1x1 convolution, which then has a bias) is the authors' penalty
    script's network (version 1).
    """
    v = _version(version)
    return conv_net(
        _LARGE[v], num_classes, in_channels, activation, dense_bias=v == 2, **options
    )


def study_cnn(num_classes=10, in_channels=3, activation="relu", widths=(16, 32, 64)):
    """The network of the activation study (chapter 7): 3 × (3x3 conv 'same',
    activation), 2x2 max-pooling after the first two, global average pooling, a dense
    layer with bias; no batch norm, PyTorch's default initialisation."""
    if len(widths) != 3:
        raise ValueError(f"widths must hold 3 channel counts, got {widths!r}")
    for w in widths:
        positive_int("widths", w)
    spec = [(widths[0], 3, 1, True), (widths[1], 3, 1, True), (widths[2], 3, 1, False)]
    return conv_net(
        spec,
        num_classes,
        in_channels,
        activation,
        batch_norm=False,
        dense_bias=True,
        glorot=False,
    )


#: Model name -> (description, builder of ``num_classes, in_channels, activation`` and
#: structural keyword options).
MODELS: dict[str, tuple[str, Callable[..., nn.Module]]] = {
    "small-cnn": (
        "smallCNN of the authors' penalty script (32 3x3 first)",
        partial(small_cnn, version=1),
    ),
    "small-cnn-v2": (
        "smallCNN of the authors' Gram-Schmidt script (32 5x5 first)",
        partial(small_cnn, version=2),
    ),
    "large-cnn": ("largeCNN as Appendix D lists it (no batch norm)", large_cnn),
    "large-cnn-code": (
        "largeCNN of the authors' penalty script (96 3x3 first)",
        partial(large_cnn_code, version=1),
    ),
    "large-cnn-code-v2": (
        "largeCNN of the authors' Gram-Schmidt script (64 5x5 first)",
        partial(large_cnn_code, version=2),
    ),
    "study-cnn": ("the activation study's network (chapter 7)", study_cnn),
}


def _options(name):
    """The keyword options the builder of model ``name`` takes."""
    choice("model", name, MODELS)
    takes = inspect.signature(MODELS[name][1]).parameters
    if any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        takes = inspect.signature(conv_net).parameters  # it passes them on
    return takes


def can_pack(name) -> bool:
    """Whether model ``name`` can be built as packed runs (``runs > 1``,
    :func:`conv_net`; :mod:`smaso.pack`)."""
    return "runs" in _options(name)


def build(name, num_classes, in_channels, activation="relu", **options) -> nn.Module:
    """The network ``name`` of :data:`MODELS`; ``options`` the builder does not take do
    not apply to it (e.g. batch-norm options to Appendix D's largeCNN, which has none),
    except ``runs`` (packed runs, :func:`conv_net`), refused by a builder without it.
    """
    takes = _options(name)
    if options.get("runs", 1) != 1 and "runs" not in takes:
        raise ValueError(f"model {name!r} cannot be packed (built with runs > 1)")
    builder = MODELS[name][1]
    return builder(
        num_classes,
        in_channels,
        activation,
        **{k: v for k, v in options.items() if k in takes},
    )
