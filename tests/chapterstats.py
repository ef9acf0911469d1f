"""What a reader sees of a chapter, counted from its source (``book/NAME.md``) and its
executed copy (``book/NAME.ipynb``): visible code lines, how many of them are
bookkeeping, prose lines, visible ``glue`` calls, figures.

Used by ``tests/test_book.py`` (the limits) and runnable on its own for the counts:
``python tests/chapterstats.py`` prints a table, one row per chapter.

* A code cell is *visible* unless tagged ``remove-input``, ``remove-cell`` or
  ``hide-input`` (collapsed: the reader sees one "Show code cell source" line).
* A visible line is *bookkeeping* when it imports, glues, seeds, or checks the
  environment rather than the claim: ``import``/``from`` statements (with their
  continuation lines), ``glue(`` calls, ``manual_seed``, ``matplotlib.use``,
  ``warnings.``.
* Prose lines are the non-blank lines of markdown cells outside fenced directives
  (``{literalinclude}`` etc. are counted as included code instead).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import jupytext

HIDDEN = {"remove-input", "remove-cell", "hide-input"}
BOOKKEEPING = re.compile(
    r"^\s*(import\s|from\s+\S+\s+import\s|glue\(|torch\.manual_seed\(|"
    r"matplotlib\.use\(|warnings\.)"
)
GLUE = re.compile(r"(^|[^\w.])glue\(")


@dataclass
class Stats:
    name: str
    visible_code: int
    bookkeeping: int
    prose: int
    visible_glue: int
    figures: int

    @property
    def bookkeeping_share(self) -> float:
        return self.bookkeeping / self.visible_code if self.visible_code else 0.0


def _bookkeeping_lines(source: str) -> int:
    n, in_import = 0, False
    for line in source.splitlines():
        if not line.strip():
            continue
        if in_import:
            n += 1
            in_import = ")" not in line
            continue
        if BOOKKEEPING.match(line):
            n += 1
            in_import = line.rstrip().endswith("(") and "import" in line
    return n


def _figures(ipynb: Path) -> int:
    import nbformat

    nb = nbformat.read(ipynb, as_version=4)
    count = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            count += sum(kind.endswith(("image/png", "image/svg+xml")) for kind in data)
    return count


def stats(md: Path) -> Stats:
    nb = jupytext.read(md)
    visible = bookkeeping = prose = glue = 0
    for cell in nb.cells:
        tags = set(cell.metadata.get("tags", ()))
        if cell.cell_type == "code":
            if tags & HIDDEN:
                continue
            lines = [ln for ln in cell.source.splitlines() if ln.strip()]
            visible += len(lines)
            bookkeeping += _bookkeeping_lines(cell.source)
            glue += sum(bool(GLUE.search(ln)) for ln in lines)
        elif cell.cell_type == "markdown":
            fence = None
            for line in cell.source.splitlines():
                stripped = line.strip()
                if fence:
                    if stripped == fence:
                        fence = None
                    continue
                m = re.match(r"^(`{3,}|:{3,})\{", stripped)
                if m:
                    fence = m.group(1)
                    continue
                if stripped and not stripped.startswith(("(", "+++")):
                    prose += 1
    ipynb = md.with_suffix(".ipynb")
    figures = _figures(ipynb) if ipynb.exists() else 0
    return Stats(md.stem, visible, bookkeeping, prose, glue, figures)


def main(paths: list[str]) -> None:
    book = Path(__file__).resolve().parents[1] / "book"
    mds = [Path(p) for p in paths] or sorted(book.glob("*.md"))
    print(
        f"{'chapter':12} {'code':>5} {'bookk.':>7} {'share':>6} {'prose':>6} "
        f"{'glue':>5} {'figs':>5}"
    )
    for md in mds:
        if "format_name: myst" not in md.read_text().split("\n---", 1)[0]:
            continue
        s = stats(md)
        print(
            f"{s.name:12} {s.visible_code:5d} {s.bookkeeping:7d} "
            f"{s.bookkeeping_share:6.0%} {s.prose:6d} {s.visible_glue:5d} "
            f"{s.figures:5d}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
