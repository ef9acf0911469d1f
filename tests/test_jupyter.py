"""A chapter as a reader runs it in JupyterLab (``make lab``), in a real browser.

The test starts this environment's JupyterLab on 127.0.0.1 (a free port, a random
token) as ``make lab`` does: with jupytext's server extension (installed with jupytext)
and the project's JupyterLab settings in ``.jupyter/`` (a chapter's ``.md`` opens as a
notebook). It serves a temporary folder holding a copy of one short chapter,
``book/intro.md`` with its paired ``book/intro.ipynb`` and the book's pairing
configuration ``book/jupytext.toml``: the committed chapter is never touched. Headless
Chromium (tests/browsing.py) then does what a reader does:

* in the file browser, double-click ``book/intro.md``: it opens as a notebook and
  starts its kernel;
* Run > Run All Cells: every code cell runs, top to bottom in one kernel, in the
  chapter's folder, with this checkout's ``smaso``; no error output, and the kernel
  never dies;
* after Run All, the markdown cells show MyST as the book does (jupyterlab-myst, part
  of the ``make lab`` environment): a ``{doc}`` role is a link, not raw text, and a
  display equation is typeset;
* edit a code cell and save (Ctrl+S): the edit is in both ``intro.md`` (still MyST
  markdown) and ``intro.ipynb``, and the two hold the same cells.

No JavaScript error, failed request or request leaving the server is allowed either.
Screenshots: ``_build/screenshots/jupyter-*.png``; a failure names its screenshot and
prints the end of the server's log. Like the book's browser test, it fails without
Chromium (saying what to install) and is skipped with ``SMASO_SKIP_BROWSER=1``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jupytext
import pytest
from browsing import ROOT, SHOTS, Visit

BOOK = ROOT / "book"
# The shortest chapter: two small code cells. (The others train or sweep; the book
# build and nbval execute every chapter in full.)
CHAPTER = "intro"
# JupyterLab settings `make lab` passes (JUPYTER_CONFIG_PATH): .md opens as a notebook.
LAB_CONFIG = ROOT / ".jupyter"
FACTORY = "Jupytext Notebook"  # the JupyterLab document factory of jupytext
# Time limits in seconds, generous: the machine running the tests may be busy.
SERVER_START, PAGE_READY, RUN_ALL, SAVED = 90, 120, 180, 60
DEAD = ("dead", "restarting", "autorestarting")


@dataclass
class Lab:
    base: str  # http://127.0.0.1:PORT/
    token: str
    root: Path  # the temporary folder it serves
    log: Path

    @property
    def chapter(self) -> Path:
        return self.root / "book" / f"{CHAPTER}.md"

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"\n--- end of JupyterLab's log ({self.log}) ---\n{text[-chars:]}"


# --------------------------------------------------------------------------------------
# The server.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(state: Path) -> dict[str, str]:
    """This environment's Python first on PATH, the project's JupyterLab settings as
    ``make lab`` gives them, and every per-user Jupyter, IPython and jupytext setting
    in ``state`` (empty), so that nothing of the user running the tests applies."""
    env = dict(os.environ)
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        JUPYTER_CONFIG_PATH=str(LAB_CONFIG),
        JUPYTER_CONFIG_DIR=str(state / "config"),
        JUPYTER_DATA_DIR=str(state / "data"),
        JUPYTER_RUNTIME_DIR=str(state / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(state / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(state / "lab-workspaces"),
        IPYTHONDIR=str(state / "ipython"),
        XDG_CONFIG_HOME=str(state / "xdg"),
        XDG_CONFIG_DIRS=str(state / "xdg"),
    )
    # No "get Jupyter news?" question over the page.
    news = state / "lab-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    return env


def _wait_until_up(proc: subprocess.Popen, lab: Lab) -> None:
    deadline = time.monotonic() + SERVER_START
    request = urllib.request.Request(
        lab.base + "api/status", headers={"Authorization": f"token {lab.token}"}
    )
    while True:
        if proc.poll() is not None:
            pytest.fail(
                f"JupyterLab exited (status {proc.returncode}) before it served"
                + lab.log_tail(),
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                json.load(r)
                return
        except (OSError, ValueError):  # not listening yet (URLError is an OSError)
            if time.monotonic() > deadline:
                pytest.fail(
                    f"JupyterLab did not answer on {lab.base} within {SERVER_START} s"
                    + lab.log_tail(),
                    pytrace=False,
                )
            time.sleep(0.25)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server shuts its kernels down), then SIGKILL to whatever is left of
    its process group. A kernel whose server is gone exits by itself (ipykernel's
    parent poller)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def lab(browser, tmp_path_factory):
    """JupyterLab serving a temporary copy of the chapter; stopped however the tests
    end. (``browser`` first: without a browser no server is started.)"""
    root = tmp_path_factory.mktemp("lab")
    book = root / "book"
    book.mkdir()
    # The .ipynb first: the .md, the source a reader edits, is the newer of the pair.
    for name in ("jupytext.toml", f"{CHAPTER}.ipynb", f"{CHAPTER}.md"):
        shutil.copy(BOOK / name, book / name)
    port = _free_port()
    lab = Lab(
        f"http://127.0.0.1:{port}/", secrets.token_hex(16), root, root / "lab.log"
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={lab.token}",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.terminals_enabled=False",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        # window.jupyterapp: the test reads the kernel's status and the cells' outputs
        "--LabApp.expose_app_in_browser=True",
        "--allow-root",  # containers and CI run as root
    ]
    with lab.log.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=_server_env(root.parent / f"{root.name}-state"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: _stop ends all of it
        )
        try:
            _wait_until_up(proc, lab)
            yield lab
        finally:
            _stop(proc)


# --------------------------------------------------------------------------------------
# In-page probes: window.jupyterapp is the JupyterLab application.

CURRENT = "const w = window.jupyterapp.shell.currentWidget;"
KERNEL = (
    "(w && w.sessionContext && w.sessionContext.session"
    " && w.sessionContext.session.kernel ? w.sessionContext.session.kernel : null)"
)

OPENED_JS = (
    "(path) => { const a = window.jupyterapp; if (!a || !a.shell) return {};"
    " const w = a.shell.currentWidget; const k = " + KERNEL + "; return {"
    " factory: (a.docRegistry.defaultWidgetFactory(path) || {}).name || null,"
    " path: w && w.context ? w.context.path : null,"
    " notebook: !!(w && w.content && w.content.model && w.content.model.cells),"
    " kernel: k ? k.status : null,"
    " }; }"
)
DIALOGS_JS = "() => [...document.querySelectorAll('.jp-Dialog')].map(d => d.innerText)"

WATCH_KERNEL_JS = (
    "() => {" + CURRENT + " const seen = window.smasoKernelStatus = [];"
    " w.sessionContext.statusChanged.connect((_, s) => seen.push(s)); }"
)

STATE_JS = (
    "() => {" + CURRENT + " const k = " + KERNEL + "; const cells = [];"
    " for (const c of w.content.model.cells) { const j = c.toJSON();"
    " cells.push({type: j.cell_type, count: j.execution_count ?? null,"
    " outputs: j.outputs || []}); }"
    " const prompts = [...document.querySelectorAll('.jp-InputPrompt')];"
    " return {cells, statuses: window.smasoKernelStatus || [],"
    " kernel: k ? k.status : null, dirty: w.context.model.dirty,"
    " busy: prompts.some(p => p.textContent.includes('*'))}; }"
)

# Run code in the notebook's kernel, outside the notebook (no cell, no history).
KERNEL_JS = (
    "async (code) => {" + CURRENT + " const k = " + KERNEL + "; let out = '';"
    " const f = k.requestExecute({code, store_history: false});"
    " f.onIOPub = (m) => { const c = m.content;"
    " if (m.header.msg_type === 'stream') out += c.text;"
    " if (m.header.msg_type === 'error') out += c.ename + ': ' + c.evalue; };"
    " await f.done; return out; }"
)
WHERE = (
    "import json, os, smaso; print(json.dumps("
    "[os.getcwd(), smaso.__file__, get_ipython().execution_count - 1]))"
)


def _state(v: Visit) -> dict:
    return v.page.evaluate(STATE_JS)


def _fail(v: Visit, lab: Lab, message: str, shot: str) -> None:
    path = SHOTS / f"jupyter-{shot}.png"
    v.page.screenshot(path=str(path))
    pytest.fail(f"{message}\n(screenshot: {path}){lab.log_tail()}", pytrace=False)


def _evaluate(v: Visit, js: str, arg=None, default=None):
    """``page.evaluate``; ``default`` while a navigation replaces the page (JupyterLab
    loading)."""
    from playwright.sync_api import Error  # (there is a browser: it is installed)

    try:
        return v.page.evaluate(js, arg)
    except Error as e:
        if "context was destroyed" not in str(e):
            raise
        return default


def _no_dialog(v: Visit, lab: Lab, shot: str) -> None:
    dialogs = _evaluate(v, DIALOGS_JS)
    if dialogs:
        _fail(v, lab, f"JupyterLab shows: {dialogs}", f"{shot}-dialog")


def _wait(
    v: Visit,
    lab: Lab,
    done: Callable[[], object],
    seconds: float,
    message: Callable[[], str],
    shot: str,
):
    """Poll ``done()`` until it is truthy, and return that; after ``seconds``, fail
    with ``message()`` and a screenshot ``jupyter-{shot}.png``. A dialog JupyterLab
    shows (an error opening or saving a file, a dead kernel) fails at once."""
    deadline = time.monotonic() + seconds
    while not (value := done()):
        _no_dialog(v, lab, shot)
        if time.monotonic() > deadline:
            _fail(v, lab, f"after {seconds} s: {message()}", shot)
        v.page.wait_for_timeout(250)
    return value


def _no_page_problems(v: Visit) -> None:
    problems = v.errors + [
        f"tried to load from outside the server: {url}" for url in v.external
    ]
    assert not problems, "JupyterLab in the browser:\n  " + "\n  ".join(problems)


def _died(state: dict) -> bool:
    return state["kernel"] in DEAD or any(s in DEAD for s in state["statuses"])


# --------------------------------------------------------------------------------------
# The reader's steps.


def _open_chapter(v: Visit, lab: Lab) -> None:
    """Open the chapter as a reader does: the file browser in book/, a double-click."""
    rel = f"book/{CHAPTER}.md"
    v.page.goto(f"{lab.base}lab/tree/book?token={lab.token}", wait_until="load")
    _wait(
        v,
        lab,
        lambda: _evaluate(v, "() => !!(window.jupyterapp && window.jupyterapp.shell)"),
        PAGE_READY,
        lambda: "JupyterLab did not start in the browser",
        "start",
    )

    def opened() -> dict:
        return _evaluate(v, OPENED_JS, rel, default={})

    def opens_as() -> str | None:
        return opened().get("factory")

    # A double-click opens a file with its type's default viewer, once jupytext has
    # registered its file types and the settings have made it the default for .md.
    _wait(
        v,
        lab,
        lambda: opens_as() == FACTORY,
        30,
        lambda: (
            f"JupyterLab opens {rel} with {opens_as()!r}, not as a notebook "
            f"({FACTORY!r}): are jupytext's JupyterLab extension and the settings "
            f"{LAB_CONFIG.name}/labconfig/default_setting_overrides.json in place?"
        ),
        "not-a-notebook",
    )
    item = v.page.locator(".jp-DirListing-item", has_text=f"{CHAPTER}.md").first
    item.wait_for(timeout=PAGE_READY * 1000)
    item.dblclick()

    def ready():
        state = opened()
        return (
            state.get("path") == rel
            and state.get("notebook")
            and state.get("kernel") == "idle"
        )

    _wait(
        v,
        lab,
        ready,
        PAGE_READY,
        lambda: f"{rel} did not open as a notebook with an idle kernel: {opened()}",
        "open",
    )
    v.page.evaluate(WATCH_KERNEL_JS)


@pytest.fixture(scope="module")
def notebook(browser, lab):
    """The chapter open in JupyterLab, in a fresh browser context."""
    v = Visit(browser, lab.base)
    try:
        _open_chapter(v, lab)
        yield v
    finally:
        v.close()


def _menu(v: Visit, menu: str, item: str) -> None:
    v.page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=menu).first.click()
    v.page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()


# --------------------------------------------------------------------------------------
# The tests.


def _errors(code: list[dict]) -> list[str]:
    return [
        f"code cell {i}: {o.get('ename')}: {o.get('evalue')}"
        for i, c in enumerate(code)
        for o in c["outputs"]
        if o.get("output_type") == "error"
    ]


def test_chapter_runs_top_to_bottom(notebook: Visit, lab: Lab):
    v = notebook
    # The stored outputs and execution counts (from the .ipynb) go first: what is
    # left after Run All was computed here.
    _menu(v, "Edit", "Clear Outputs of All Cells")
    _wait(
        v,
        lab,
        lambda: all(
            c["count"] is None and not c["outputs"] for c in _state(v)["cells"]
        ),
        10,
        lambda: "Edit > Clear Outputs of All Cells left outputs in the notebook",
        "clear",
    )
    _menu(v, "Run", "Run All Cells")

    def finished():  # every cell ran, or one failed (Run All stops there), or died
        s = _state(v)
        code = [c for c in s["cells"] if c["type"] == "code"]
        ran = all(c["count"] is not None for c in code) or _errors(code)
        return (
            s if _died(s) or (ran and not s["busy"] and s["kernel"] == "idle") else None
        )

    s = _wait(
        v,
        lab,
        finished,
        RUN_ALL,
        lambda: f"Run All Cells did not finish: {_state(v)}",
        "run-all-timeout",
    )
    v.page.screenshot(path=str(SHOTS / "jupyter-run-all.png"), full_page=True)
    if _died(s):
        _fail(v, lab, f"the kernel died: statuses {s['statuses']}", "kernel-died")
    code = [c for c in s["cells"] if c["type"] == "code"]
    errors = _errors(code)
    assert not errors, "error output in the chapter run in JupyterLab:\n" + "\n".join(
        errors
    )
    # Top to bottom, in one kernel, in the chapter's folder (relative paths such as
    # ../shared/data work), with the smaso package of this checkout.
    counts = [c["count"] for c in code]
    where = v.page.evaluate(KERNEL_JS, WHERE)
    cwd, package, executed = json.loads(where.strip().splitlines()[-1])
    assert counts == list(range(1, len(code) + 1)) and executed == len(code), (
        f"the code cells did not run top to bottom in one kernel: counts {counts}, "
        f"{executed} executions in the kernel"
    )
    assert any(c["outputs"] for c in code), "no code cell printed anything"
    assert Path(cwd) == lab.chapter.parent, f"the kernel ran in {cwd}"
    assert Path(package).resolve().parent == ROOT / "smaso", (
        f"the kernel imported smaso from {package}, not from {ROOT}"
    )
    _no_page_problems(v)


# The rendered markdown cells: raw MyST left visible, the links and typeset display
# equations (KaTeX from jupyterlab-myst, or JupyterLab's MathJax).
MYST_JS = (
    "() => { const cells = [...document.querySelectorAll('.jp-Notebook"
    " .jp-MarkdownCell')]; const text = cells.map(c => c.innerText).join('\\n');"
    " return { cells: cells.length,"
    " raw: (text.match(/\\{(doc|eq|cite|cite:t|glue:text)\\}\\S*/g) || []).slice(0, 5),"
    " links: cells.flatMap(c => [...c.querySelectorAll('a')]).map("
    "a => [a.innerText.trim(), a.getAttribute('href') || '']),"
    " display: cells.flatMap(c => [...c.querySelectorAll("
    "'.katex-display, mjx-container[display=\"true\"]')]).length }; }"
)


def test_myst_is_rendered(notebook: Visit, lab: Lab):
    """After Run All (the previous test), the chapter's MyST reads as in the book: the
    role {doc}`gmm` of the intro is a link to that chapter, no role is left as raw
    text, and the intro's display equation (Eq. 1) is typeset."""
    v = notebook
    _no_dialog(v, lab, "myst")

    def rendered() -> dict:
        return _evaluate(v, MYST_JS, default={}) or {}

    def doc_links(r: dict) -> list:
        return [a for a in r.get("links", []) if "gmm" in a[1] or a[0] == "gmm"]

    r = _wait(
        v,
        lab,
        lambda: (r := rendered()) and doc_links(r) and r["display"] and r,
        30,
        lambda: (
            f"MyST is not rendered in JupyterLab (is jupyterlab-myst installed?): "
            f"{rendered()}"
        ),
        "myst",
    )
    v.page.screenshot(path=str(SHOTS / "jupyter-myst.png"), full_page=True)
    assert not r["raw"], f"raw MyST left in the rendered cells: {r['raw']}"
    _no_page_problems(v)


def test_edit_is_saved_to_both_paired_files(notebook: Visit, lab: Lab):
    v = notebook
    _no_dialog(v, lab, "edit")
    md, ipynb = lab.chapter, lab.chapter.with_suffix(".ipynb")
    marker = f"# edited in JupyterLab by tests/test_jupyter.py {secrets.token_hex(4)}"
    v.page.locator(".jp-Notebook .jp-CodeCell .cm-content").first.click()
    v.page.keyboard.press("Control+Home")
    v.page.keyboard.type(marker)
    v.page.keyboard.press("Enter")
    _wait(
        v,
        lab,
        lambda: _state(v)["dirty"],
        10,
        lambda: "typing into the first code cell left the notebook unchanged",
        "edit",
    )
    v.page.keyboard.press("Control+s")

    def where_saved() -> str:
        return ", ".join(
            f"{'in' if marker in p.read_text() else 'NOT in'} {p.name}"
            for p in (md, ipynb)
        )

    # Saved (JupyterLab clears "dirty" once the server has written the files), and
    # written to the .md a reader edits: then the paired .ipynb must hold the edit too.
    _wait(
        v,
        lab,
        lambda: not _state(v)["dirty"] and marker in md.read_text(),
        SAVED,
        lambda: f"saving in JupyterLab did not finish: the edit is {where_saved()}",
        "save",
    )
    v.page.screenshot(path=str(SHOTS / "jupyter-saved.png"), full_page=True)
    assert marker in ipynb.read_text(), (
        f"saved in JupyterLab, the edit is {where_saved()}: {md.name} and "
        f"{ipynb.name} are not paired (pairing: {BOOK.relative_to(ROOT)}/jupytext.toml)"
    )

    text, paired = jupytext.read(md), jupytext.read(ipynb)
    fmt = text.metadata.get("jupytext", {}).get("text_representation", {})
    assert fmt.get("format_name") == "myst", (
        f"{md.name} is no longer a MyST markdown notebook after saving: {fmt}"
    )
    assert [(c.cell_type, c.source) for c in text.cells] == [
        (c.cell_type, c.source) for c in paired.cells
    ], f"{md.name} and {ipynb.name} hold different cells after saving"
    first = next(c for c in paired.cells if c.cell_type == "code")
    assert first.source.startswith(marker + "\n"), first.source[:200]
    assert marker not in (BOOK / f"{CHAPTER}.md").read_text()
    _no_page_problems(v)
