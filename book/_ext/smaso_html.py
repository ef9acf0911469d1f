"""Two fixes to the book's HTML that the browser test (tests/test_browser.py) asks for.

1. Offline MathJax: a copy of MathJax 3 inside ``_build/html/_static/mathjax``.
2. Each inline script once: a page must not raise "Identifier 'THEBE_JS_URL' has already
   been declared" in the reader's console.

**Offline MathJax.** Jupyter Book 1 (Sphinx's ``sphinx.ext.mathjax``) loads MathJax from
a CDN by default, so a book opened without network shows raw TeX. This extension copies
MathJax 3 from the PyPI package ``django-static-mathjax`` (a plain copy of the MathJax
release: Python module ``mathjax``, files in ``mathjax/static/mathjax/es5``; it does not
need Django) into the built site. ``_config.yml`` sets ``mathjax_path:
mathjax/tex-mml-chtml.js``, which Sphinx resolves against ``_static/``: the same
component Sphinx loads from the CDN by default, but from the book's own files.

Copied: ``tex-mml-chtml.js`` and the folders it loads lazily (fonts in ``output/chtml``,
TeX extensions in ``input/tex/extensions``, the menu in ``ui``, accessibility in
``a11y`` and ``sre``), about 10 MB; not the other prebuilt combinations
(``tex-svg-full.js`` and friends).

**Each inline script once.** Sphinx 7.4 writes an inline ``<script>`` that an extension
adds after the builder started (sphinx-thebe's ``const THEBE_JS_URL = ...``,
sphinx-togglebutton's selector) twice: once as added (file name ``None``), once when
``prepare_writing`` adds the registry's assets again (file name ``''``), and the two do
not compare equal. The second ``const`` is a SyntaxError on every page.
``_dedupe_scripts`` keeps the first of each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

COMPONENT = "tex-mml-chtml.js"
PACKAGE = "django-static-mathjax"


def mathjax_source() -> Path:
    """The folder of MathJax 3's browser components (``es5``) that the package
    installs."""
    try:
        import mathjax  # the module of the PyPI package django-static-mathjax
    except ImportError as err:
        raise ExtensionError(
            f"offline MathJax needs the PyPI package {PACKAGE}: "
            f"pip install -c requirements/constraints.txt {PACKAGE} (make env "
            "installs it)"
        ) from err
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (es5 / COMPONENT).is_file():
        raise ExtensionError(f"{PACKAGE} is installed but has no {es5 / COMPONENT}")
    return es5


def mathjax_version(es5: Path) -> str:
    package_json = es5.parent / "package.json"
    return json.loads(package_json.read_text())["version"]


def _check_config(app: Sphinx, config) -> None:
    path = config.mathjax_path
    if "://" in path or path.startswith("/"):
        raise ExtensionError(
            f"mathjax_path is {path!r}: the book bundles MathJax, set mathjax_path: "
            f"mathjax/{COMPONENT}"
        )
    if path != f"mathjax/{COMPONENT}":
        raise ExtensionError(
            f"mathjax_path is {path!r}; this extension provides mathjax/{COMPONENT}"
        )
    # fail early, before executing any chapter, if the package is missing
    mathjax_source()


def _copy(app: Sphinx, exc: Exception | None) -> None:
    if exc is not None or app.builder.format != "html":
        return
    es5 = mathjax_source()
    version = mathjax_version(es5)
    dest = Path(app.outdir) / "_static" / "mathjax"
    stamp = dest / ".version"
    if (
        stamp.is_file()
        and stamp.read_text() == version
        and (dest / COMPONENT).is_file()
    ):
        return  # already there (an incremental rebuild)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copy2(es5 / COMPONENT, dest / COMPONENT)
    for sub in sorted(p for p in es5.iterdir() if p.is_dir()):
        shutil.copytree(sub, dest / sub.name)
    shutil.copy2(es5.parent / "LICENSE", dest / "LICENSE")
    stamp.write_text(version)


def _dedupe_scripts(app: Sphinx, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        key = (
            getattr(js, "filename", js) or "",
            tuple(sorted(getattr(js, "attributes", {}).items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _check_config)
    app.connect("build-finished", _copy)
    app.connect(
        "html-page-context", _dedupe_scripts, priority=900
    )  # after the theme's handlers
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
