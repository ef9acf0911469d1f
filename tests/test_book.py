"""Checks of the book's sources that nbval alone cannot make.

* every chapter in ``_toc.yml`` exists, and every notebook chapter (``book/NAME.md`` in
  MyST notebook format) has its paired, committed ``book/NAME.ipynb`` holding the same
  cells;
* every committed notebook is fully executed, top to bottom (nbval silently skips code
  cells whose ``execution_count`` is null, so an unexecuted cell would never be
  checked);
* stored outputs hold nothing that varies from run to run (memory addresses), which
  would make the strict nbval comparison flaky.
"""

from __future__ import annotations

import re
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part.get("chapters", [])]
    return files


def _is_notebook_chapter(md: Path) -> bool:
    head = md.read_text().split("\n---", 1)[0]
    return "format_name: myst" in head


NOTEBOOK_CHAPTERS = sorted(md for md in BOOK.glob("*.md") if _is_notebook_chapter(md))
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [
        (cell.cell_type, cell.source.strip(), tuple(cell.metadata.get("tags", ())))
        for cell in nb.cells
    ]


def test_toc_chapters_exist():
    for name in _toc_files():
        assert (ROOT / f"{name}.md").exists(), (
            f"_toc.yml lists {name}, but {name}.md does not exist"
        )


def test_there_are_notebook_chapters():
    assert NOTEBOOK_CHAPTERS, "no MyST notebook chapters found in book/"
    assert BOOK / "intro.md" in NOTEBOOK_CHAPTERS


@pytest.mark.parametrize("md", NOTEBOOK_CHAPTERS, ids=lambda p: p.name)
def test_chapter_pair_holds_the_same_cells(md: Path):
    ipynb = md.with_suffix(".ipynb")
    assert ipynb.exists(), (
        f"{md.name} has no paired {ipynb.name}: run `make notebook NB=book/{md.name}`"
    )
    from_md = _cells(jupytext.read(md))
    from_ipynb = _cells(jupytext.read(ipynb))
    assert len(from_md) == len(from_ipynb), (
        f"{md.name} has {len(from_md)} cells, {ipynb.name} has {len(from_ipynb)}: "
        f"run `make notebook NB=book/{md.name}`"
    )
    for i, (a, b) in enumerate(zip(from_md, from_ipynb, strict=True)):
        assert a == b, (
            f"cell {i} differs between {md.name} and {ipynb.name}: run `make notebook "
            f"NB=book/{md.name}`"
        )


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_paired(ipynb: Path):
    assert ipynb.with_suffix(".md").exists(), (
        f"{ipynb.name} has no source {ipynb.with_suffix('.md').name}"
    )


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_fully_executed(ipynb: Path):
    nb = nbformat.read(ipynb, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code, f"{ipynb.name} has no code cells"
    counts = [c.execution_count for c in code]
    missing = [i for i, n in enumerate(counts) if n is None]
    assert not missing, (
        f"{ipynb.name}: code cells {missing} were never executed (nbval would skip "
        "them)"
    )
    assert counts == list(range(1, len(code) + 1)), (
        f"{ipynb.name} was not executed once from top to bottom (execution counts "
        f"{counts})"
    )


ADDRESS = re.compile(r"\b0x[0-9a-f]{6,}\b")


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_hold_no_memory_addresses(ipynb: Path):
    nb = nbformat.read(ipynb, as_version=4)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")] + [
                v
                for k, v in out.get("data", {}).items()
                if k.startswith("text/") and isinstance(v, str)
            ]
            for text in texts:
                assert not ADDRESS.search(text), (
                    f"{ipynb.name} cell {i} prints a memory address "
                    f"({ADDRESS.search(text).group()}): "
                    "end the plotting line with ';' or print something stable"
                )


def test_nbval_runs_strict():
    config = (ROOT / "pyproject.toml").read_text()
    assert "--nbval " in config and "--nbval-lax" not in config


# What a reader sees (tests/chapterstats.py): the machinery out of the reading path.
MAX_BOOKKEEPING = 0.15


@pytest.mark.parametrize("md", NOTEBOOK_CHAPTERS, ids=lambda p: p.name)
def test_chapter_shows_no_machinery(md: Path):
    from chapterstats import stats

    s = stats(md)
    assert s.visible_glue == 0, (
        f"{md.name} shows {s.visible_glue} glue calls: put them in a cell tagged "
        "remove-input (or remove-cell)"
    )
    assert s.bookkeeping_share <= MAX_BOOKKEEPING, (
        f"{md.name}: {s.bookkeeping} of its {s.visible_code} visible code lines are "
        f"imports, glue or seeds ({s.bookkeeping_share:.0%} > {MAX_BOOKKEEPING:.0%}): "
        "move them into a hidden set-up cell"
    )


@pytest.mark.parametrize("md", NOTEBOOK_CHAPTERS, ids=lambda p: p.name)
def test_shown_code_fits_the_column(md: Path):
    """Every code line a reader can see (visible or collapsed cells) is at most 88
    columns, the width the book's column holds (ruff's line length)."""
    for i, cell in enumerate(jupytext.read(md).cells):
        tags = set(cell.metadata.get("tags", ()))
        if cell.cell_type != "code" or tags & {"remove-input", "remove-cell"}:
            continue
        for line in cell.source.splitlines():
            assert len(line) <= 88, (
                f"{md.name} cell {i}: a code line of {len(line)} columns (> 88): "
                f"{line[:60]!r}..."
            )
