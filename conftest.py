"""pytest configuration shared by the unit tests and the nbval run of the chapters.

nbval compares every stored output of a chapter with a fresh run (strict mode). It
already leaves ``image/png`` and ``image/jpeg`` outputs out of the comparison, but not
the *glued* figures: myst-nb's ``glue`` stores a figure under
``application/papermill.record/image/png``, which nbval compares byte for byte, so a
pixel moved by another CPU's rounding fails the cell. Rule of this book: **figures are
never compared as bytes.** What a figure shows is checked by ``assert``s on the numbers
it plots, in the cell that plots them; the browser test checks that every figure loads,
has alt text and a caption. Text outputs (printed numbers, glued text) stay compared.
"""

from __future__ import annotations

# Every image MIME type a chapter's outputs may hold: displayed, or glued by myst-nb.
IMAGES = ("image/png", "image/jpeg", "image/svg+xml")
NOT_COMPARED = IMAGES + tuple(f"application/papermill.record/{m}" for m in IMAGES)


def pytest_collection_modifyitems(items):
    """Leave every image MIME type out of nbval's comparison (the rule above)."""
    try:
        from nbval.plugin import IPyNbFile
    except ImportError:  # nbval not installed: nothing to configure
        return
    for notebook in {
        item.parent for item in items if isinstance(item.parent, IPyNbFile)
    }:
        notebook.skip_compare = tuple(notebook.skip_compare) + NOT_COMPARED
