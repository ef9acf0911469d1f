"""Network topologies of the paper's experiments (Appendix D) and of the authors'
released code.

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

The activation ("relu", "swish": a learnable per-channel β-VQ ReLU, "silu") and the
orthogonality (none, a weight or template penalty, or an exact parametrisation by QR /
Gram-Schmidt) are constructor options of :func:`small_cnn` and :func:`large_cnn_code`.
"""

from torch import nn

from .activations import BetaVQReLU
from .orthogonal import PENALTIES, penalty_loss, register_orthogonal

__all__ = [
    "ACTIVATIONS",
    "ORTHOGONALITY",
    "extra_loss",
    "large_cnn",
    "large_cnn_code",
    "num_parameters",
    "small_cnn",
]

ACTIVATIONS = ("relu", "swish", "silu")
EXACT = ("qr", "gs", "mgs")
ORTHOGONALITY = ("none",) + PENALTIES + EXACT


def large_cnn(num_classes=10, in_channels=3, activation=nn.ReLU):
    """The largeCNN of Appendix D as an ``nn.Sequential`` mapping (N, in_channels, H, W)
    to (N, num_classes).

    Convolutions (all with bias): 3x3 96, 3x3 96, 3x3 96 stride 2, 3x3 192, 3x3 192, 3x3
    192 stride 2 (all 'same', i.e. padding 1), 3x3 192 'valid' (no padding), 1x1 192,
    1x1 ``num_classes``; each but the last followed by ``activation()``; then global
    average pooling. 'Same' padding with stride 2 is padding 1, as in Lasagne: 32x32
    inputs give 16x16 and 8x8 maps, then 6x6 after the valid convolution. Inputs need H,
    W >= 9. With the defaults it has 1,369,738 parameters.
    """
    for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    try:
        ok = isinstance(activation(), nn.Module)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(
            "activation must be a callable returning an nn.Module (e.g. nn.ReLU), "
            f"got {activation!r}"
        )
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
        layers += [conv, activation()]
    layers += [convs[-1], nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def num_parameters(model):
    """Number of trainable scalars of ``model`` (raw parameters of parametrised layers
    included),
    e.g. 1,369,738 for the Appendix D largeCNN of :func:`large_cnn`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# The authors' code: smallCNN and largeCNN, with batch norm, max-pooling and a dense
# output layer

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


def _activation_factory(activation):
    """``activation`` (a name in ACTIVATIONS, or a callable returning an nn.Module) as a
    function of the number of channels. "swish" is :class:`smaso.activations.BetaVQReLU`
    with one learnable β
    per channel, starting at β = 1/2 (η = 1, the SiLU), as the β-VQ of the ReLU (Proposition 7)."""
    if isinstance(activation, str):
        if activation == "relu":
            return lambda c: nn.ReLU()
        if activation == "swish":
            return lambda c: BetaVQReLU(num_channels=c)
        if activation == "silu":
            return lambda c: nn.SiLU()
        raise ValueError(
            f"activation must be one of {ACTIVATIONS} or a callable returning an "
            "nn.Module, "
            f"got {activation!r}"
        )
    try:
        ok = isinstance(activation(), nn.Module)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(
            f"activation must be one of {ACTIVATIONS} or a callable returning an "
            "nn.Module "
            f"(e.g. nn.ReLU), got {activation!r}"
        )
    return lambda c: activation()


def _check_common(
    num_classes, in_channels, version, orthogonality, lam, bn_momentum=0.01
):
    for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    if orthogonality not in ORTHOGONALITY:
        raise ValueError(
            f"orthogonality must be one of {ORTHOGONALITY}, got {orthogonality!r}"
        )
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"lam must be a nonnegative number, got {lam!r}")
    if (
        isinstance(bn_momentum, bool)
        or not isinstance(bn_momentum, (int, float))
        or not 0 < bn_momentum <= 1
    ):
        raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum!r}")


def _code_net(
    spec, num_classes, in_channels, activation, batch_norm, dense_bias, bn_momentum=0.01
):
    act = _activation_factory(activation)
    layers, c = [], in_channels
    for out, k, pad, pool in spec:
        conv = nn.Conv2d(c, out, k, padding=pad)
        layers.append(conv)
        if batch_norm:
            # TensorFlow's batch-norm defaults, which the authors' code uses: epsilon
            # 1e-3 and decay 0.99 of the running averages, i.e. PyTorch momentum 0.01
            # (the default of bn_momentum)
            layers.append(nn.BatchNorm2d(out, eps=1e-3, momentum=bn_momentum))
        layers.append(act(out))
        if pool:
            layers.append(nn.MaxPool2d(2))
        c = out
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, num_classes, bias=dense_bias),
    ]
    model = nn.Sequential(*layers)
    for m in (
        model.modules()
    ):  # the authors' initialisation: Glorot-uniform weights, zero biases
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _orthogonalise(model, orthogonality, lam):
    """Apply an orthogonality option (Section 5): an exact parametrisation is registered
    on every
    Linear/Conv2d weight; a penalty is recorded on the model for :func:`extra_loss`."""
    model.orthogonality, model.lam = orthogonality, float(lam)
    if orthogonality in EXACT:
        register_orthogonal(model, orthogonality)
    return model


def extra_loss(model):
    """The loss term an orthogonality penalty option asks for (``lam`` times the penalty
    of Section 5,
    see :func:`smaso.orthogonal.penalty_loss`), or ``None`` (no penalty, or an exact parametrisation)."""
    kind = getattr(model, "orthogonality", "none")
    if kind in PENALTIES:
        return penalty_loss(kind, getattr(model, "lam", 1.0))
    return None


def small_cnn(
    num_classes=10,
    in_channels=3,
    activation="relu",
    version=1,
    orthogonality="none",
    lam=1.0,
    batch_norm=True,
    bn_momentum=0.01,
):
    """The smallCNN of the authors' code (Appendix D names it, Section 5), as an
    ``nn.Sequential``.

    ``version=1`` (their orthogonality-penalty script): conv 32 3x3 valid, BN, act,
    max-pool 2; conv 64 3x3 valid, BN, act, max-pool 2; conv 128 1x1, BN, act; global
    average pooling; dense ``num_classes`` without bias. 30x30 -> 15 -> 13 -> 6 maps for
    32x32 inputs (inputs >= 10x10); 29,440 parameters for CIFAR-10 (96,522 in version
    2). ``version=2`` (their Gram-Schmidt script): conv 32 5x5 valid, ..., conv 64 3x3
    valid, ..., conv 128 3x3 valid, BN, act; global average pooling; dense with bias
    (inputs >= 20x20). Every layer has at most as many filters as inputs, so all can be
    exactly orthogonal. ``activation``: "relu", "swish" (learnable β per channel),
    "silu", or a module factory. ``orthogonality``: "none", a penalty ("filters" is the
    paper's, "filters_normalized", "templates" the authors' code's; weight ``lam``, see
    :func:`extra_loss`) or an exact parametrisation ("qr", "gs", "mgs";
    :func:`smaso.orthogonal.register_orthogonal`). Batch norm (``batch_norm``) uses
    TensorFlow's defaults as the authors' code does: epsilon 1e-3 and running averages
    with decay 0.99 (``bn_momentum=0.01`` in PyTorch's convention).
    """
    _check_common(num_classes, in_channels, version, orthogonality, lam, bn_momentum)
    model = _code_net(
        _SMALL[version],
        num_classes,
        in_channels,
        activation,
        batch_norm,
        version == 2,
        bn_momentum,
    )
    return _orthogonalise(model, orthogonality, lam)


def large_cnn_code(
    num_classes=10,
    in_channels=3,
    activation="relu",
    version=1,
    orthogonality="none",
    lam=1.0,
    batch_norm=True,
    bn_momentum=0.01,
):
    """The largeCNN as the authors' code trains it (Section 5, Table 2; cf. Appendix D's
    listing, :func:`large_cnn`), as an ``nn.Sequential``.

    Convolutions (each followed by batch norm and the activation): 96 3x3 'same', 96 3x3
    'full', 96 3x3 'full', max-pool 2, 192 3x3 'valid', 192 3x3 'full', 192 3x3 'valid',
    max-pool 2, 192 3x3 'valid', 192 1x1; global average pooling; dense ``num_classes``
    (no bias in version 1). 32x32 inputs give maps 32, 34, 36, 18, 16, 18, 16, 8, 6, 6.
    ``version=2`` starts with 64 5x5 'same' filters instead (and its dense layer has a
    bias). Options as in :func:`small_cnn`.
    """
    _check_common(num_classes, in_channels, version, orthogonality, lam, bn_momentum)
    model = _code_net(
        _LARGE[version],
        num_classes,
        in_channels,
        activation,
        batch_norm,
        version == 2,
        bn_momentum,
    )
    return _orthogonalise(model, orthogonality, lam)
