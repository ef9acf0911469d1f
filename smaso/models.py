"""Network topologies of the paper's experiments (Appendix D).

``large_cnn`` is the largeCNN of Appendix D, used for Table 2 and the exactly orthogonal run of
Section 5. It follows the appendix's listing: nine convolutions, then global average pooling.
(The authors' released code differs from the listing, e.g. in padding, pooling and batch norm;
the listing is what is implemented here.)
"""

from torch import nn

__all__ = ["large_cnn", "num_parameters"]


def large_cnn(num_classes=10, in_channels=3, activation=nn.ReLU):
    """The largeCNN of Appendix D as an ``nn.Sequential`` mapping (N, in_channels, H, W) to (N, num_classes).

    Convolutions (all with bias): 3x3 96, 3x3 96, 3x3 96 stride 2, 3x3 192, 3x3 192,
    3x3 192 stride 2 (all 'same', i.e. padding 1), 3x3 192 'valid' (no padding), 1x1 192,
    1x1 ``num_classes``; each but the last followed by ``activation()``; then global average
    pooling. 'Same' padding with stride 2 is padding 1, as in Lasagne: 32x32 inputs give 16x16
    and 8x8 maps, then 6x6 after the valid convolution. Inputs need H, W >= 9.
    With the defaults it has 1,369,738 parameters.
    """
    for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    try:
        ok = isinstance(activation(), nn.Module)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"activation must be a callable returning an nn.Module (e.g. nn.ReLU), got {activation!r}")
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
    """Number of trainable scalars of ``model`` (raw parameters of parametrised layers included),
    e.g. 1,369,738 for the Appendix D largeCNN of :func:`large_cnn`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
