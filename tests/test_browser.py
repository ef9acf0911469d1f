"""The built book as a reader sees it: every page of ``_build/html`` in a real headless
Chromium.

``make test`` builds the book first (``make book``), then pytest runs these tests. They
serve ``_build/html`` on 127.0.0.1 (a free port) and load each page in Debian's Chromium
through Playwright (the ``playwright`` package drives ``/usr/bin/chromium``; it
downloads no browser of its own). For every page of the book (the pages ``_toc.yml``
lists and every other HTML page in the built site):

* no JavaScript error, failed request or HTTP error, and nothing fetched from outside
  the book;
* MathJax (bundled, see ``book/_ext/smaso_mathjax.py``) finished, every equation
  rendered without a TeX error, and no raw ``$$``, ``\\(`` or ``\\[`` left in the text;
* every ``<img>`` loaded (``naturalWidth > 0``), sits in a captioned figure and has alt
  text;
* every link inside the site resolves to a file, and its ``#anchor`` to an id on that
  page; ``{eq}``/``{numref}`` links show the number their target has, and a numbered
  chapter numbers its equations and figures N.1, N.2, ... after its own chapter number
  N;
* no code block, output or table is wider than its column at a 1280 x 800 window (no
  sideways scrolling; collapsed cells are opened and measured too);
* a full-page screenshot goes to ``_build/screenshots/NAME.png`` for a person to look
  at.

Also: the search page finds "swish", the light/dark toggle switches the theme, and
``_build/html/index.html`` opened from disk with the network switched off renders its
equations.

Without Chromium these tests FAIL and say what to install; set ``SMASO_SKIP_BROWSER=1``
to skip them instead (for a machine where you cannot install a browser).
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import itertools
import re
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from browsing import SHOTS, VIEWPORT, Visit

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_build" / "html"
SEARCH_TERM = "swish"


# --------------------------------------------------------------------------------------
# Which pages: from _toc.yml and from the built site, never a fixed list.


def _toc_entries(entries: list[dict]) -> list[str]:
    files = []
    for entry in entries or []:
        if "file" in entry:
            files.append(entry["file"])
        files += _toc_entries(entry.get("sections", []))
    return files


def toc_files() -> list[str]:
    """Every document of ``_toc.yml`` (root, parts, chapters, sections), in reading
    order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + _toc_entries(toc.get("chapters", []))
    for part in toc.get("parts", []):
        files += _toc_entries(part.get("chapters", []))
    return files


def chapters_with_figures() -> list[str]:
    """The front page and the numbered chapters of the main parts (not the appendix
    or the back matter): no more than SCREENS_WITHOUT_FIGURE screens between figures."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    parts = [p for p in toc["parts"] if p["caption"] not in ("Appendix", "Back matter")]
    return [toc["root"]] + [c["file"] for p in parts for c in p["chapters"]]


def _is_page(rel: Path) -> bool:
    return (
        rel.parts[0] not in {"_static", "_sources", "_images"}
        and rel.name != "index.html"
    )


def site_pages() -> list[str]:
    """Every HTML page of the book: the toc's pages and whatever else the build holds
    (genindex, search), but not ``index.html``, which only redirects
    (``test_opens_offline_from_disk``)."""
    pages = {f"{name}.html" for name in toc_files()}
    if SITE.is_dir():
        pages |= {
            p.relative_to(SITE).as_posix()
            for p in SITE.rglob("*.html")
            if _is_page(p.relative_to(SITE))
        }
    return sorted(pages)


def shot_name(page: str) -> str:
    return page.removesuffix(".html").replace("/", "-")


# --------------------------------------------------------------------------------------
# What a page holds, read from the built files (for resolving links into other pages).


VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


class _Anchors(html.parser.HTMLParser):
    """ids (and names) of a page, and the number an equation or figure with an id
    shows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.numbers: dict[str, str] = {}
        self._open: list[
            tuple[str, str | None]
        ] = []  # (tag, id) of elements not yet closed
        self._grab: tuple[str, list[str]] | None = None  # (target id, text so far)
        self._grab_depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key):
                self.ids.add(attrs[key])
        if tag not in VOID:
            self._open.append((tag, attrs.get("id")))
        classes = (attrs.get("class") or "").split()
        if self._grab is None and ("eqno" in classes or "caption-number" in classes):
            owner = next((i for _, i in reversed(self._open[:-1]) if i), None)
            if owner and owner not in self.numbers:
                self._grab, self._grab_depth = (owner, []), len(self._open)

    def handle_startendtag(self, tag, attrs):  # <img ... />: nothing to close
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self._open.pop()

    def handle_endtag(self, tag):
        if tag in VOID or all(t != tag for t, _ in self._open):
            return
        if self._grab is not None and len(self._open) == self._grab_depth:
            owner, text = self._grab
            self.numbers[owner] = " ".join("".join(text).split())
            self._grab = None
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self._grab is not None:
            self._grab[1].append(data)


@functools.cache
def anchors(path: Path) -> _Anchors:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


NUMBER = re.compile(r"\d+(?:\.\d+)*")


# --------------------------------------------------------------------------------------
# Fixtures: the built site, a local server (the browser: tests/conftest.py).


@pytest.fixture(scope="session")
def site() -> Path:
    if not (SITE / "index.html").is_file():
        pytest.fail(
            f"no built book in {SITE}: run `make book` first (`make test` does)"
        )
    return SITE


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="session")
def server(site: Path):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def visit(browser, server):
    visits = []

    def _open(**options) -> Visit:
        visits.append(Visit(browser, server, **options))
        return visits[-1]

    yield _open
    for v in visits:
        v.close()


# --------------------------------------------------------------------------------------
# In-page checks (JavaScript evaluated in the loaded page).

MATH_JS = """async () => {
  const math = [...document.querySelectorAll('div.math, span.math')];
  const out = {math: math.length,
               mathjax: !!(window.MathJax && window.MathJax.startup)};
  out.errors = [];
  if (out.mathjax) {
    await window.MathJax.startup.promise;
    // A TeX error shows as <merror>; an undefined macro (MathJax's noundefined
    // package) as its name in red.
    for (const item of window.MathJax.startup.document.math) {
      const mml = window.MathJax.startup.toMML(item.root);
      const what = /<merror/.test(mml) ? 'a TeX error'
        : /<mtext mathcolor="red">\\\\/.test(mml) ? 'an undefined macro' : null;
      if (what) out.errors.push(`${what}: ${item.math.trim().slice(0, 100)}`);
    }
  }
  out.unrendered = math.filter(e => !e.querySelector('mjx-container'))
    .map(e => e.textContent.trim().slice(0, 80));
  out.containers = document.querySelectorAll('mjx-container').length;
  const body = document.body.cloneNode(true);
  body.querySelectorAll('pre, code, script, style, textarea, mjx-container, .highlight')
    .forEach(e => e.remove());
  out.text = body.textContent;
  return out;
}"""

IMAGES_JS = """async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(img => img.complete ? null :
    new Promise(done => {
      img.addEventListener('load', done); img.addEventListener('error', done);
    })));
  const article = document.querySelector('article') || document.body;
  return imgs.map(img => ({
    src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0,
    content: article.contains(img), alt: (img.getAttribute('alt') || '').trim(),
    caption: ((img.closest('figure') || {querySelector: () => null})
      .querySelector('figcaption') || {textContent: ''}).textContent.trim(),
  }));
}"""

LINKS_JS = """() => [...document.querySelectorAll(
    'a[href], link[rel="next"], link[rel="prev"]')].map(a => ({
  href: a.href, raw: a.getAttribute('href'),
  text: a.textContent.trim().replace(/\\s+/g, ' '), cls: a.className,
}))"""

NUMBERS_JS = """() => {
  const h1 = document.querySelector(
    'article h1 .section-number, main h1 .section-number');
  return {
    chapter: h1 ? h1.textContent.trim() : null,
    equations: [...document.querySelectorAll('.eqno')]
      .map(e => e.firstChild.textContent.trim()),
    figures: [...document.querySelectorAll('figure .caption-number')]
      .map(e => e.textContent.trim()),
  };
}"""

RAW_TEX = [
    (re.compile(r"\$\$"), "$$"),
    (re.compile(r"\\\(|\\\)"), "\\( \\)"),
    (re.compile(r"\\\[|\\\]"), "\\[ \\]"),
    (re.compile(r"\\begin\{"), "\\begin{"),
    (re.compile(r"\$[^$\n]{0,200}?\\[A-Za-z]+[^$\n]{0,200}?\$"), "$...\\command...$"),
]


def check_math(page) -> list[str]:
    m = page.evaluate(MATH_JS)
    problems = []
    if m["math"] and not m["mathjax"]:
        problems.append(f"{m['math']} math elements, but MathJax did not load")
    problems += [f"equation not rendered by MathJax: {t!r}" for t in m["unrendered"]]
    problems += [f"equation shows {t}" for t in m["errors"]]
    for pattern, what in RAW_TEX:
        for hit in pattern.finditer(m["text"]):
            context = m["text"][max(0, hit.start() - 40) : hit.end() + 40].replace(
                "\n", " "
            )
            problems.append(f"raw TeX ({what}) left in the text: ...{context}...")
    return problems


def check_images(page) -> list[str]:
    problems = []
    for img in page.evaluate(IMAGES_JS):
        if not img["ok"]:
            problems.append(f"image did not load (naturalWidth 0): {img['src']}")
        if img["content"] and not img["alt"]:
            problems.append(f"image has no alt text: {img['src']}")
        if img["content"] and not img["caption"]:
            problems.append(f"image is not in a figure with a caption: {img['src']}")
    return problems


def resolve(url: str, base: str) -> tuple[Path, str] | None:
    """The file and fragment an in-site URL points at (None for a URL outside the
    site)."""
    if not url.startswith(base):
        return None
    parts = urlsplit(url)
    path = unquote(parts.path).lstrip("/")
    target = SITE / path
    if not path or path.endswith("/"):
        target = target / "index.html"
    return target, unquote(parts.fragment)


def check_links(page, base: str) -> list[str]:
    problems = []
    for link in page.evaluate(LINKS_JS):
        where = resolve(link["href"], base)
        if where is None:
            continue  # another site (or mailto:, javascript:): not the offline book
        target, fragment = where
        label = f"link {link['raw']!r} ({link['text'][:40]!r})"
        if not target.is_file():
            problems.append(f"{label}: no file {target.relative_to(SITE)}")
            continue
        if not fragment or target.suffix != ".html":
            continue
        found = anchors(target)
        if fragment not in found.ids:
            problems.append(
                f"{label}: no id {fragment!r} in {target.relative_to(SITE)}"
            )
            continue
        # {eq} and {numref} links show the number of their target: it must be the
        # target's number.
        if (
            fragment in found.numbers
            and NUMBER.search(link["text"])
            and "headerlink" not in link["cls"]
            and link["text"] != fragment  # a list of labels (sphinx-proof's index)
        ):
            shown, actual = (
                NUMBER.search(link["text"]).group(),
                NUMBER.search(found.numbers[fragment]),
            )
            if actual is None or shown != actual.group():
                problems.append(
                    f"{label} shows {shown}, but its target is numbered "
                    f"{found.numbers[fragment]!r}"
                )
    return problems


def check_numbers(page) -> list[str]:
    n = page.evaluate(NUMBERS_JS)
    problems = []
    for kind, labels in (("equation", n["equations"]), ("figure", n["figures"])):
        numbers = [
            NUMBER.search(label).group() if NUMBER.search(label) else label
            for label in labels
        ]
        if len(set(numbers)) != len(numbers):
            problems.append(f"{kind} numbers repeat on this page: {labels}")
        if n["chapter"]:
            chapter = n["chapter"].rstrip(".")
            expected = [f"{chapter}.{i}" for i in range(1, len(numbers) + 1)]
            if numbers != expected:
                problems.append(
                    f"chapter {chapter} numbers its {kind}s {numbers}, expected "
                    f"{expected}"
                )
    return problems


# The page's article (the chapter's text), for the scripts below.
ARTICLE = """  const article = document.querySelector('article.bd-article')
    || document.querySelector('article') || document.body;
"""

# Every element inside the article: one whose content is wider than its box, where
# the box scrolls (overflow-x auto/scroll) or clips (hidden/clip); and one that sticks
# out of the column without a scrolling or clipping box around it. Display math included
# (MathJax's containers), as are tables' scrolling wrappers. Hidden elements and
# screen-reader-only text (clipped to 1 px) are skipped; so are inline elements' boxes
# (an inline box has no width of its own to scroll).
LAYOUT_JS = (
    """() => {
"""
    + ARTICLE
    + """  const box = article.getBoundingClientRect();
  const out = [];
  const text = e => (e.textContent || '').trim().replace(/\\s+/g, ' ').slice(0, 70);
  const clips = e => ['auto', 'scroll', 'hidden', 'clip']
    .includes(getComputedStyle(e).overflowX);
  // How far the visible content of e reaches past its box (scrollWidth also counts
  // MathJax's screen-reader copy, which is positioned out of sight).
  const spill = e => {
    const left = e.getBoundingClientRect().left + e.clientLeft;
    let right = left;
    for (const d of e.querySelectorAll('*')) {
      if (d.closest('mjx-assistive-mml')) continue;
      const r = d.getBoundingClientRect();
      if (r.width > 1 && r.height > 1) right = Math.max(right, r.right);
    }
    const walk = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
    const range = document.createRange();
    for (let t = walk.nextNode(); t; t = walk.nextNode()) {
      if (!t.textContent.trim()
          || t.parentElement.closest('mjx-assistive-mml')) continue;
      range.selectNodeContents(t);
      right = Math.max(right, range.getBoundingClientRect().right);
    }
    return Math.round(right - left - e.clientWidth);
  };
  for (const e of article.querySelectorAll('*')) {
    if (e.getClientRects().length === 0) continue;
    const r = e.getBoundingClientRect();
    if (r.width <= 1 || r.height <= 1) continue;
    const style = getComputedStyle(e);
    if (style.display !== 'inline' && clips(e)
        && e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 1) {
      const over = spill(e);
      if (over > 2) out.push({tag: e.tagName.toLowerCase(),
        cls: e.className.toString().slice(0, 40),
        what: style.overflowX === 'hidden' || style.overflowX === 'clip'
          ? 'clips' : 'scrolls sideways', over: over, line: text(e)});
      continue;
    }
    if (r.right > box.right + 1 || r.left < box.left - 1) {
      let p = e.parentElement, held = false;
      while (p && p !== article) { if (clips(p)) { held = true; break; }
                                   p = p.parentElement; }
      if (!held) out.push({tag: e.tagName.toLowerCase(),
        cls: e.className.toString().slice(0, 40), what: 'sticks out of the column',
        over: Math.round(Math.max(r.right - box.right, box.left - r.left)),
        line: text(e)});
    }
  }
  return out;
}"""
)


def check_layout(page) -> list[str]:
    """Nothing in the article is wider than the column: no code block, output, table,
    table wrapper or display equation scrolls sideways, clips its content, or sticks
    out. Collapsed cells (``hide-input``) are opened first: a reader who opens them must
    not have to scroll either."""
    page.evaluate(
        "() => document.querySelectorAll('details').forEach(d => d.open = true)"
    )
    seen, problems = set(), []
    for o in page.evaluate(LAYOUT_JS):
        key = (o["what"], o["line"])
        if key in seen:  # an element and its wrapper: one problem
            continue
        seen.add(key)
        problems.append(
            f"a <{o['tag']} class={o['cls']!r}> {o['what']} by {o['over']} px: "
            f"{o['line']!r}"
        )
    return problems


# Figures, in the page as a reader first sees it (collapsed cells closed): how much each
# image is shrunk (natural width / shown width), and where each figure is.
FIGURES_JS = (
    """() => {
"""
    + ARTICLE
    + """  const top = article.getBoundingClientRect().top + window.scrollY;
  const imgs = [...article.querySelectorAll('img')].filter(i => i.clientWidth > 0);
  return {height: article.scrollHeight,
    images: imgs.map(i => ({src: i.getAttribute('src'), natural: i.naturalWidth,
      shown: i.clientWidth,
      y: i.getBoundingClientRect().top + window.scrollY - top}))};
}"""
)
SHRINK = 1.25  # a figure may be shown at most this much smaller than it was drawn
SCREENS_WITHOUT_FIGURE = 6  # in a chapter, at most this many screens between figures


def check_figures_read(figures: dict) -> list[str]:
    """Every figure (``figures``: FIGURES_JS's result) is shown at no less than
    1/SHRINK of its drawn width (so its fonts stay as drawn: smaso.plotting)."""
    return [
        f"figure {i['src']} is drawn {i['natural']} px wide and shown at "
        f"{i['shown']} px (shrunk {i['natural'] / i['shown']:.2f}x > {SHRINK}x)"
        for i in figures["images"]
        if i["natural"] > SHRINK * i["shown"]
    ]


def screens_without_figure(f: dict) -> tuple[float, list[float]]:
    """The longest stretch of the article without a figure (from its top, between
    figures, to its end; ``f``: FIGURES_JS's result), in screens of the test's window;
    and where the figures are (in screens)."""
    screen = VIEWPORT["height"]
    ys = sorted(i["y"] for i in f["images"])
    edges = [0.0, *ys, float(f["height"])]
    gaps = [(b - a) / screen for a, b in itertools.pairwise(edges)]
    return max(gaps), [y / screen for y in ys]


def load(v: Visit, url: str) -> None:
    v.page.goto(url, wait_until="load")


# --------------------------------------------------------------------------------------
# The tests.


def test_every_toc_page_is_built_and_current(site: Path):
    """Every page of _toc.yml is in the build, and no newer than its source (else
    `make book`)."""
    for name in toc_files():
        html_file = site / f"{name}.html"
        assert html_file.is_file(), (
            f"{name} is in _toc.yml but not in {site}: run `make book`"
        )
        sources = [
            ROOT / f"{name}{ext}"
            for ext in (".md", ".ipynb", ".rst")
            if (ROOT / f"{name}{ext}").is_file()
        ]
        if sources:
            assert html_file.stat().st_mtime >= sources[0].stat().st_mtime, (
                f"{html_file.relative_to(ROOT)} is older than "
                f"{sources[0].relative_to(ROOT)}: run `make book`"
            )


@pytest.mark.parametrize("page_path", site_pages())
def test_page(visit, server, page_path: str):
    assert (SITE / page_path).is_file(), f"{page_path} was not built: run `make book`"
    v = visit()
    load(v, server + page_path)
    problems = (
        check_math(v.page)
        + check_images(v.page)
        + check_links(v.page, server)
        + check_numbers(v.page)
    )
    figures = v.page.evaluate(FIGURES_JS)
    problems += check_figures_read(figures)
    if page_path.removesuffix(".html") in chapters_with_figures():
        longest, _ = screens_without_figure(figures)
        if longest > SCREENS_WITHOUT_FIGURE:
            problems.append(
                f"{longest:.1f} screens without a figure (at most "
                f"{SCREENS_WITHOUT_FIGURE}): plot a result"
            )
    v.page.screenshot(path=str(SHOTS / f"{shot_name(page_path)}.png"), full_page=True)
    problems += check_layout(v.page)
    problems += v.errors + [
        f"tried to load from outside the book: {url}" for url in v.external
    ]
    assert not problems, f"{page_path}:\n  " + "\n  ".join(problems)


def test_layout_check_finds_a_planted_overflow(visit, server):
    """The layout check fails on what it is for: a display equation, a table and a
    code block planted into a real chapter, each wider than the column."""
    v = visit()
    load(v, f"{server}{toc_files()[1]}.html")
    assert check_layout(v.page) == []
    v.page.evaluate(
        """() => {
      const article = document.querySelector('article.bd-article');
      const bs = String.fromCharCode(92);  // a backslash: \\[ ... \\]
      article.insertAdjacentHTML('beforeend',
        `<div class="math notranslate nohighlight" id="planted-math">
         ${bs}[ ${'x + '.repeat(200)} y ${bs}]</div>
         <div class="pst-scrollable-table-container"><table><tr>
         <td>${'t'.repeat(400)}</td></tr></table></div>
         <div class="highlight"><pre>${'p'.repeat(400)}</pre></div>`);
      return MathJax.typesetPromise([document.getElementById('planted-math')]);
    }"""
    )
    problems = check_layout(v.page)
    assert any("x+x+x" in p.replace(" ", "") for p in problems), problems
    assert any("tttt" in p for p in problems), problems
    assert any("pppp" in p for p in problems), problems


def test_search_finds_the_term(visit, server):
    v = visit()
    load(v, f"{server}search.html?q={SEARCH_TERM}")
    v.page.wait_for_function(
        "() => document.querySelectorAll('#search-results ul.search li').length > 0"
        " || /did not match|no "
        "results/i.test((document.querySelector('#search-results') || {}).textContent "
        "|| '')",
        timeout=30_000,
    )
    results = v.page.locator("#search-results ul.search li")
    assert results.count() > 0, f"searching the book for {SEARCH_TERM!r} found nothing"
    hits = [
        results.nth(i).locator("a").first.get_attribute("href")
        for i in range(results.count())
    ]
    assert any(h and ".html" in h for h in hits), (
        f"search results link to no page: {hits}"
    )
    v.page.screenshot(path=str(SHOTS / "search-results.png"), full_page=True)
    assert not v.errors and not v.external, v.errors + v.external


def test_dark_mode_toggle(visit, server):
    v = visit()
    first = toc_files()[0]
    load(v, f"{server}{first}.html")
    html = v.page.locator("html")
    button = v.page.locator(".theme-switch-button:visible").first
    background = "() => getComputedStyle(document.body).backgroundColor"
    seen = {html.get_attribute("data-theme"): v.page.evaluate(background)}
    for _ in range(
        3
    ):  # the button cycles auto -> light -> dark (from wherever it starts)
        button.click()
        seen[html.get_attribute("data-theme")] = v.page.evaluate(background)
    assert {"light", "dark"} <= set(seen), (
        f"the theme switch gave data-theme values {sorted(seen)}"
    )
    assert seen["light"] != seen["dark"], (
        f"dark and light mode have the same background {seen['dark']}"
    )
    for _ in range(3):
        if html.get_attribute("data-theme") == "dark":
            break
        button.click()
    v.page.reload(wait_until="load")  # the reader's choice is kept
    assert html.get_attribute("data-theme") == "dark", (
        "dark mode was not kept across a reload"
    )
    v.page.evaluate(
        "() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null"
    )
    v.page.screenshot(
        path=str(SHOTS / f"{shot_name(first + '.html')}-dark.png"), full_page=True
    )
    assert not v.errors and not v.external, v.errors + v.external


def test_opens_offline_from_disk(visit, site: Path):
    """`_build/html/index.html` opened as a file, with the network off, renders its
    equations."""
    v = visit(offline=True)
    v.page.goto((site / "index.html").as_uri(), wait_until="load")
    first = toc_files()[0]
    v.page.wait_for_url(
        f"**/{first}.html", timeout=15_000
    )  # index.html redirects to the front page
    v.page.wait_for_load_state("load")
    problems = check_math(v.page) + check_images(v.page)
    count = v.page.evaluate("() => document.querySelectorAll('mjx-container').length")
    assert count > 0, f"{first}.html from disk shows no rendered equation"
    problems += v.errors + [
        f"tried to load from outside the book: {url}" for url in v.external
    ]
    assert not problems, "opened from disk, offline:\n  " + "\n  ".join(problems)
