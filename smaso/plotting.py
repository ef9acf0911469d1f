"""One style for the book's figures, one human name per arm for their legends, and the
check that a figure reads at 1x.

The book's content column is 787 pixels wide. A figure drawn :data:`WIDTH` inches
wide at :data:`DPI` dots per inch is shown at its natural size, so its fonts (at least
:data:`MIN_FONT` points) are as large on the page as they were drawn. Every chapter
calls :func:`use_style` once and :func:`check_figure` on each figure it draws;
``tests/test_browser.py`` checks the built pages (no figure shrunk past 1.25x).
"""

from __future__ import annotations

import matplotlib
import matplotlib.image
import matplotlib.text

from .data import DATASETS

#: Inches: 700 pixels at :data:`DPI`, inside the 787-pixel column.
WIDTH = 7.0
DPI = 100
#: Points: the smallest text a figure may hold (ticks, legends, labels, titles).
MIN_FONT = 9.0

STYLE = {
    "figure.figsize": (WIDTH, 3.2),
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": "magma",
}

#: One display name per arm, setting and method: every legend and table of the book
#: shows these, never the code names (``bvq-maxout3``) the package and the CLI use.
NAMES = {
    # activations (smaso.models.ACTIVATIONS)
    "relu": "ReLU",
    "silu": "SiLU",
    "swish": "swish (learned β)",
    "swish-softplus": "swish, η = softplus(ρ)",
    "bvq-leaky": "β-VQ leaky-ReLU",
    "bvq-abs": "β-VQ absolute value",
    "bvq-maxout3": "β-VQ maxout (3 pieces)",
    "hardswish": "hard-swish",
    "gini-relu": "Gini-VQ ReLU (learned β)",
    "entmax15-relu": "1.5-entmax VQ ReLU",
    # orthogonality (penalties and exactly orthogonal layers)
    "none": "no orthogonality",
    "filters": "penalty on filters",
    "template": "penalty on templates",
    "qr": "exact (QR)",
    "gs": "exact (Gram–Schmidt)",
    "mgs": "exact (modified Gram–Schmidt)",
    "cayley": "exact (Cayley)",
    "bcop": "exact (BCOP)",
    # Table 2 settings at subset scale (smaso.experiment.study)
    "baseline [small-cnn]": "v1 baseline",
    "Ortho (penalty filters, λ=1) [small-cnn]": "v1 orthogonality penalty",
    "baseline [small-cnn-v2]": "v2 baseline",
    "exact orthogonal (qr) + swish [small-cnn-v2]": "v2 exact (QR) + swish",
    # ---- added by chapter (keep each chapter's additions under its own line) ----
    # maso, gmm:
    # soft, beta:
    # factorial:
    "filters_normalized": "penalty on filter cosines",
    "templates": "penalty on templates",
    "qr-kept-norms": "exact (QR), kept norms",
    # convolution:
    "raw-filters": "Gaussian filters",
    "qr-filters": "QR filters",
    "hamming": "Hamming window, QR",
    "hamming-centred": "Hamming window, centred, QR",
    "dct": "DCT (fixed)",
    "free": "unconstrained",
    "soft-threshold": "soft thresholding",
    "beta-shrink": "β-VQ shrinkage",
    # experiments:
    # beyond:
    # intro, appendix:
}


def is_code_name(text: str) -> bool:
    """Whether ``text`` is a code name that has a different display name."""
    return text in NAMES and NAMES[text] != text


def name(key: str) -> str:
    """The display name of an arm, setting or method (:data:`NAMES`), or of a dataset
    (its ``display`` in :data:`smaso.data.DATASETS`)."""
    if key in DATASETS:
        return DATASETS[key].display
    try:
        return NAMES[key]
    except KeyError:
        raise KeyError(
            f"no display name for {key!r}: add it to smaso.plotting.NAMES"
        ) from None


def use_style() -> None:
    """Set matplotlib's defaults to the book's style (:data:`STYLE`)."""
    matplotlib.rcParams.update(STYLE)


def _text_problems(fig) -> list[str]:
    problems = []
    for text in fig.findobj(matplotlib.text.Text):
        if text.get_visible() and text.get_text().strip():
            size = text.get_fontsize()
            if size < MIN_FONT - 1e-9:
                problems.append(
                    f"text {text.get_text()[:30]!r} is {size:g} pt (< {MIN_FONT:g})"
                )
    return problems


def _axes_problems(ax) -> list[str]:
    if not ax.axison or hasattr(ax, "_colorbar"):
        return []
    problems = []
    where = f"axes {ax.get_title()[:30]!r}" if ax.get_title() else "an axes"
    for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
        ticks = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
        if ticks and not label.strip():
            problems.append(f"{where} has {axis.axis_name} tick labels but no label")
    for image in ax.images + [c for c in ax.collections if hasattr(c, "get_cmap")]:
        array = image.get_array()
        is_rgb = array is not None and getattr(array, "ndim", 2) == 3
        heat_map = isinstance(image, matplotlib.image.AxesImage) and not is_rgb
        if heat_map and image.colorbar is None:
            problems.append(f"{where} shows a heat map without a colour bar")
    legend = ax.get_legend()
    if legend is not None:
        for entry in legend.get_texts():
            if is_code_name(entry.get_text()):
                problems.append(
                    f"legend entry {entry.get_text()!r} is a code name: use "
                    "smaso.plotting.name"
                )
    return problems


def figure_problems(fig) -> list[str]:
    """What keeps ``fig`` from reading at 1x in the book: wider than :data:`WIDTH`,
    text under :data:`MIN_FONT` points, an axis with tick labels but no label, a heat
    map without a colour bar, a legend entry that is a code name."""
    fig.canvas.draw()
    width = fig.get_figwidth()
    problems = []
    if width > WIDTH + 1e-6:
        problems.append(f"figure is {width:g} in wide (> {WIDTH:g} in)")
    problems += _text_problems(fig)
    for ax in fig.axes:
        problems += _axes_problems(ax)
    return problems


def check_figure(fig) -> None:
    """Raise ``AssertionError`` listing :func:`figure_problems`, if there are any."""
    problems = figure_problems(fig)
    assert not problems, "figure does not read at 1x:\n  " + "\n  ".join(problems)
