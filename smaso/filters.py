"""Filter parametrisations of the Section 5 experiments: which layers get exactly
orthogonal filters, by which process, and the apodised filters of the authors' code.

The paper orthogonalises "all fully connected and convolution matrices" by Gram-Schmidt
(Section 5, after Table 2; :mod:`smaso.orthogonal` computes orthonormal filters,
Eq. 11).
The authors' code for that run differs in three ways, each an option here:

* the dense output layer is not orthogonalised (``dense=False``);
* its Gram-Schmidt does not normalise: :func:`unnormalised_gram_schmidt`,
  ``u_k = v_k - sum_{j<k} <v_k, u_j> / <u_j, u_j> u_j``, mutually orthogonal filters
  whose norms stay free;
* the smallCNN's convolution filters are first apodised (Appendix B): multiplied by a
  2-D Hamming window normalised to sum 1, then "centred" (:func:`apodize`).

Everything is a ``torch.nn.utils.parametrize`` parametrization, so the raw weight stays
the trainable parameter and gradients flow through, as in the paper. The computation
runs with autocast off: in bf16 the filters would be orthogonal only to ~1e-3.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .checks import choice
from .orthogonal import (
    METHODS,
    OrthogonalFilters,
    check_rank,
    layer_groups,
    orthogonal_layers,
    rows_to_orthogonalize,
)

__all__ = [
    "EXACT",
    "Apodize",
    "UnnormalisedGramSchmidt",
    "apodize",
    "hamming_window",
    "register_filters",
    "unnormalised_gram_schmidt",
]

#: The exact orthogonality processes: QR, Gram-Schmidt and modified Gram-Schmidt
#: (orthonormal filters, :func:`smaso.orthogonal.orthogonalize`) and the authors'
#: unnormalised Gram-Schmidt.
EXACT = ("qr", *(m for m in METHODS if m != "qr"), "gs-unnormalised")


def unnormalised_gram_schmidt(
    W: torch.Tensor, method: str = "loop", *, groups: int = 1, check: bool = True
) -> torch.Tensor:
    """Gram-Schmidt without normalisation, as in the authors' code: the filters (rows
    of :func:`smaso.orthogonal.filter_matrix`) in order, each minus its projections on
    the previous *results*, ``u_k = v_k - sum_{j<k} (<v_k, u_j> / <u_j, u_j>) u_j``.

    The ``u_k`` are mutually orthogonal (Eq. 11) and ``u_k = R_kk q_k`` for the QR
    factorisation with a positive diagonal; their norms are free. Each projection is
    taken from the running residual (the modified order: the same vectors in exact
    arithmetic; in float32 the classical order leaves apodised filters orthogonal only
    to ~1e-3). When a layer has more
    filters than inputs its *columns* are processed instead (as
    :func:`smaso.orthogonal.orthogonalize` does with ``tall="columns"``). Same shape as
    ``W``; linearly dependent filters raise a ``ValueError`` (``check=False``: not
    checked, no host synchronisation). ``method="qr"`` computes the same vectors as
    ``R_kk q_k`` from one sign-fixed QR factorisation (much faster than the Python
    loop; what the parametrisation uses). ``groups``: a grouped layer (packed runs),
    group by group.
    """
    choice("method", method, ("loop", "qr"))
    M, tall = rows_to_orthogonalize(W, "columns", groups)
    if method == "qr":
        Q, R = torch.linalg.qr(M.mT)
        d = R.diagonal(dim1=-2, dim2=-1)
        if check:
            check_rank(d, M)
        U = (Q * d[..., None, :]).mT  # R_kk q_k: the sign of R_kk cancels
    else:
        rows, sq = [], []
        for k in range(M.shape[-2]):
            u = M[..., k, :]
            for j in range(k):
                u = u - ((u * rows[j]).sum(-1) / sq[j])[..., None] * rows[j]
            sq.append((u * u).sum(-1))
            rows.append(u)
        if check:
            check_rank(torch.stack(sq, -1).sqrt(), M)
        U = torch.stack(rows, -2)
    return (U.mT if tall else U).reshape(W.shape)


def hamming_window(kh: int, kw: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The 2-D Hamming window ``h[i] h[j]`` (symmetric, ``0.54 - 0.46 cos(2 pi n / (M -
    1))``, 1 for M = 1), normalised to sum 1, as the authors' code apodises its
    filters (Appendix B)."""
    h = [torch.hamming_window(n, periodic=False, dtype=torch.float64) for n in (kh, kw)]
    w = h[0][:, None] * h[1][None, :]
    return (w / w.sum()).to(dtype=dtype, device=device)


def apodize(W: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
    """Apodised filters (Appendix B) as the authors' code builds them: each filter of a
    conv weight ``W`` (out, in, kh, kw) times :func:`hamming_window`, minus the sum of
    that product over the filter (``W h - sum(W h)``; the code calls it centring).
    ``window``: that window, made beforehand (as :class:`Apodize` keeps it), else made
    here."""
    if W.ndim != 4:
        raise ValueError(
            f"apodize needs a conv weight (out, in, kh, kw), got {W.shape}"
        )
    if window is None:
        window = hamming_window(*W.shape[2:], dtype=W.dtype, device=W.device)
    elif window.shape != W.shape[2:]:
        raise ValueError(
            f"window of shape {tuple(window.shape)} for filters of {W.shape[2:]}"
        )
    Wh = W * window
    return Wh - Wh.sum(dim=(1, 2, 3), keepdim=True)


class UnnormalisedGramSchmidt(nn.Module):
    """Parametrization ``weight = unnormalised_gram_schmidt(original)``, no autocast;
    ``groups`` and ``check`` as in :class:`smaso.orthogonal.OrthogonalFilters`."""

    #: its vectors and their norms (:func:`smaso.orthogonal.reanchored`)
    tall, keep_norms, unnormalised = "columns", False, True

    def __init__(self, *, groups: int = 1, check: bool = True):
        super().__init__()
        self.groups, self.check = groups, bool(check)

    def _run(self, weight, check):
        with torch.autocast(weight.device.type, enabled=False):
            return unnormalised_gram_schmidt(
                weight, "qr", groups=self.groups, check=check
            )

    def forward(self, weight):
        return self._run(weight, self.check)

    def verify(self, weight):
        """Raise ``ValueError`` if ``weight``'s filters are dependent."""
        self._run(weight, True)


class Apodize(nn.Module):
    """Parametrization ``weight = apodize(original)`` of a convolution with ``kernel``
    (kh, kw) filters. The Hamming window is a buffer, made once and moved with the
    model (not saved in its state): a training step creates no tensor and copies
    nothing to the device."""

    def __init__(self, kernel: tuple[int, int]):
        super().__init__()
        window = hamming_window(*kernel, dtype=torch.get_default_dtype())
        self.register_buffer("window", window, persistent=False)

    #: one linear map on every filter: commutes with mixing filters
    #: (:func:`smaso.orthogonal.reanchored`)
    filterwise_linear = True

    def forward(self, weight):
        return apodize(weight, self.window)


def register_filters(model, method="none", apodized=False, dense=True, check=True):
    """Make the filters of ``model`` exactly orthogonal and/or apodised (Section 5);
    returns the parametrised modules.

    ``method``: "none", or one of :data:`EXACT` on every ``nn.Conv2d`` and (``dense``)
    ``nn.Linear`` weight. ``apodized``: every convolution's filters first go through
    :func:`apodize` (then the orthogonalisation acts on the apodised filters, as in the
    authors' code). Grouped layers (packed runs, :mod:`smaso.pack`) are processed group
    by group. ``check=False``: no rank check in the forward pass (no host
    synchronisation per step); :func:`smaso.orthogonal.check_orthogonalizable` runs it
    when asked.
    """
    choice("method", method, ("none", *EXACT))
    layers = [
        m
        for m in orthogonal_layers(model)
        if isinstance(m, nn.Conv2d) or (dense and method != "none")
    ]
    done = []
    for m in layers:
        if parametrize.is_parametrized(m, "weight"):
            raise ValueError(f"{m}: weight is already parametrised")
        if apodized and isinstance(m, nn.Conv2d):
            apod = Apodize(m.kernel_size).to(m.weight.device, m.weight.dtype)
            parametrize.register_parametrization(m, "weight", apod)
        options = {"groups": layer_groups(m), "check": check}
        if method == "gs-unnormalised":
            p = UnnormalisedGramSchmidt(**options)
            parametrize.register_parametrization(m, "weight", p)
        elif method != "none":
            p = OrthogonalFilters(method, **options)
            parametrize.register_parametrization(m, "weight", p)
        if parametrize.is_parametrized(m, "weight"):
            done.append(m)
    return done
