"""Orthogonal convolutions as signal-processing transforms (Section 6, future work 3).

With an orthogonal operator ``W`` (:mod:`smaso.orthoconv`), a MASO layer is an analysis
in an orthogonal basis, and ``W^T`` undoes it. Three consequences, each a function here:

* **shrinkage is a MASO nonlinearity.** Two ReLU units per coefficient, with slopes
  ``(w_k, -w_k)`` and the same negative bias ``-t``, give
  ``ReLU(u - t) - ReLU(-u - t)``: exactly the soft thresholding of ``u = W x``
  (:func:`soft_threshold`). Their β-VQ (Eq. 9; each ReLU becomes a swish,
  Proposition 7) is a smooth shrinkage (:func:`beta_shrink`).
* **transform-domain denoising**: analyse, shrink, synthesise with the adjoint,
  ``x_hat = W^T s(W y)`` (:class:`TransformDenoiser`): the classical orthogonal-
  transform denoiser, when ``W^T W = I``.
* **reconstruction from the active units**: the least-squares (minimum-norm) input that
  reproduces a layer's active pre-activations is the orthogonal projection of the input
  onto the span of the active units' slopes, for any ``W``; with orthonormal rows it is
  ``W^T`` applied to the active outputs (:func:`active_reconstruction`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .activations import swish

__all__ = [
    "TransformDenoiser",
    "active_reconstruction",
    "beta_shrink",
    "block_dct",
    "conv_adjoint",
    "psnr",
    "soft_threshold",
]


def soft_threshold(u, t):
    """``ReLU(u - t) - ReLU(-u - t)``: two ReLU MASO units with slopes ``(w, -w)`` and
    bias ``-t`` (Eq. 1, Theorem 1), which is soft thresholding ``sign(u) max(|u| - t,
    0)`` of ``u`` for ``t >= 0``."""
    return F.relu(u - t) - F.relu(-u - t)


def beta_shrink(u, t, eta):
    """The β-VQ (Eq. 9) of the pair in :func:`soft_threshold`: each ReLU replaced by
    its β-VQ, the swish ``v sigmoid(eta v)`` with ``eta = beta / (1 - beta)``
    (Proposition 7). A smooth, odd shrinkage that tends to soft thresholding as ``eta
    -> inf``."""
    return swish(u - t, eta) - swish(-u - t, eta)


def conv_adjoint(conv, y):
    """``W^T y`` for the circular 'same' convolution ``W`` of ``conv`` (no bias): the
    circular convolution with the channel-transposed, spatially flipped weight (offset
    ``m`` of ``W`` becomes offset ``-m`` of ``W^T``). Works for ``nn.Conv2d`` with
    circular padding and for :class:`smaso.orthoconv.CircularConv2d`; differentiable."""
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "circular":
        raise ValueError(f"conv_adjoint needs a circular 'same' nn.Conv2d, got {conv}")
    if tuple(conv.stride) != (1, 1) or conv.groups != 1:
        raise ValueError(f"conv_adjoint needs stride 1 and one group, got {conv}")
    w = conv.weight
    if w.shape[-1] != w.shape[-2] or w.shape[-1] % 2 == 0:
        raise ValueError(f"conv_adjoint needs an odd square kernel, got {w.shape}")
    wt = w.transpose(0, 1).flip(-2, -1)
    p = (w.shape[-1] - 1) // 2
    if type(conv) is nn.Conv2d:
        return F.conv2d(F.pad(y, (p, p, p, p), mode="circular"), wt)
    return conv._conv_forward(y, wt, None)


def psnr(x_hat, x, peak=1.0):
    """Peak signal-to-noise ratio in dB per image, ``10 log10(peak^2 / MSE)``, (N,)."""
    mse = ((x_hat - x) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(peak**2 / mse)


class TransformDenoiser(nn.Module):
    """``x_hat = sigma * S(W y / sigma)`` synthesised by ``W^T`` (future work 3).

    ``y`` (N, C, H, W) is pixel-unshuffled by ``factor`` (a permutation, hence
    orthogonal) and analysed by ``conv`` (C * factor^2 channels in and out, circular
    'same', no bias). Each coefficient is shrunk, in units of the noise level
    ``sigma``, by :func:`soft_threshold` (``shrink="soft"``) or :func:`beta_shrink`
    (``"beta"``), with a learnable threshold ``tau`` (and ``eta``) per channel; then
    :func:`conv_adjoint` and pixel shuffle synthesise. When ``conv`` is orthogonal,
    ``tau = 0`` (soft) gives ``x_hat = y`` exactly.
    """

    SHRINKS = ("soft", "beta")

    def __init__(self, conv, factor=2, shrink="soft", tau=1.0, eta=4.0):
        super().__init__()
        if shrink not in self.SHRINKS:
            raise ValueError(f"shrink must be one of {self.SHRINKS}, got {shrink!r}")
        if conv.in_channels != conv.out_channels or conv.bias is not None:
            raise ValueError(
                "the transform must map C channels to C channels, without bias; got "
                f"{conv}"
            )
        c = conv.out_channels
        self.conv, self.factor, self.shrink = conv, factor, shrink
        inv_softplus = lambda v: v + torch.log(-torch.expm1(-v))  # noqa: E731
        self.tau_raw = nn.Parameter(inv_softplus(torch.full((c,), float(tau))))
        self.eta_raw = nn.Parameter(inv_softplus(torch.full((c,), float(eta))))

    def thresholds(self):
        """Per-channel threshold ``tau >= 0`` and β-VQ ``eta > 0`` (noise units)."""
        return F.softplus(self.tau_raw), F.softplus(self.eta_raw)

    def coefficients(self, y):
        return self.conv(F.pixel_unshuffle(y, self.factor))

    def reconstruct(self, y):
        """``W^T W y`` (no shrinkage): ``y`` itself iff ``W^T W = I``."""
        u = self.coefficients(y)
        return F.pixel_shuffle(conv_adjoint(self.conv, u), self.factor)

    def forward(self, y, sigma):
        u = self.coefficients(y) / sigma
        tau, eta = (v[:, None, None] for v in self.thresholds())
        s = (
            soft_threshold(u, tau)
            if self.shrink == "soft"
            else beta_shrink(u, tau, eta)
        )
        return F.pixel_shuffle(conv_adjoint(self.conv, sigma * s), self.factor)


def active_reconstruction(W, b, x):
    """Reconstruction of ``x`` (N, D) from the layer ``z = ReLU(W x + b)`` (``W`` (K, D)
    with orthonormal rows): ``W_S^T (z_S - b_S)`` over the active units ``S``, i.e.
    ``W^T (mask * (W x))``. For orthonormal rows this is the minimum-norm least-squares
    solution of ``W_S x' + b_S = z_S``, the orthogonal projection of ``x`` onto the span
    of the active units' slopes. Returns ``(x_hat, mask)``."""
    u = x @ W.T + b
    mask = u > 0
    return (mask * (u - b)) @ W, mask


def block_dct(factor, dtype=torch.float32):
    """The orthonormal 2-D DCT-II of ``factor x factor`` blocks as a (factor^2,
    factor^2) matrix acting on the pixel-unshuffled channels (a ``1 x 1`` orthogonal
    convolution: the block transform of JPEG), rows ordered by frequency. Rows whose
    diagonal entry is negative are negated (the transform stays orthonormal; shrinkage
    is odd, so denoising is unchanged), which keeps the eigenvalue -1 away and the
    matrix inside the Cayley image (:func:`smaso.orthoconv.inverse_cayley`)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    x = torch.arange(factor, dtype=torch.float64)
    u = x[:, None]
    C = torch.cos(torch.pi * (2 * x[None, :] + 1) * u / (2 * factor))
    C = C * torch.where(u == 0, 1.0, 2.0).double().div(factor).sqrt()
    D = torch.einsum("ux,vy->uvxy", C, C).reshape(factor**2, factor**2)
    D = torch.where(D.diagonal()[:, None] < 0, -D, D)
    return D.to(dtype)
