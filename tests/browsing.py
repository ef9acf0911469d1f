"""What the browser tests share: how Chromium is found and started, where screenshots
go, and :class:`Visit`, one page in a fresh browser context that records what went
wrong while it loaded.

Used by ``tests/test_browser.py`` (the built book) and ``tests/test_jupyter.py`` (the
chapters in JupyterLab); ``tests/conftest.py`` turns :func:`launch_chromium` into the
session-wide ``browser`` fixture, so both start one Chromium between them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "_build" / "screenshots"
SKIP_VAR = "SMASO_SKIP_BROWSER"
# Chromium's own background traffic (updates, sync, field trials) would try the network:
# off.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = (
    "the browser tests need Debian's Chromium: `apt-get install chromium` (as root; "
    ".ci/run does it), "
    "or point SMASO_CHROMIUM at a Chromium/Chrome binary; and the Python driver "
    "`playwright` "
    "(`make env` installs it from requirements/constraints.txt). "
    f"To skip these tests instead, set {SKIP_VAR}=1."
)


def find_chromium() -> str | None:
    """``$SMASO_CHROMIUM``, else the first Chromium or Chrome on ``PATH``."""
    candidates = [os.environ.get("SMASO_CHROMIUM")] + [
        shutil.which(name)
        for name in (
            "chromium",
            "chromium-browser",
            "google-chrome",
            "google-chrome-stable",
        )
    ]
    return next((c for c in candidates if c and Path(c).is_file()), None)


@contextlib.contextmanager
def launch_chromium() -> Iterator:
    """Headless Chromium driven by Playwright; skipped if ``SMASO_SKIP_BROWSER=1``,
    else a failure that says what to install when Chromium or Playwright is missing."""
    if os.environ.get(SKIP_VAR, "") not in ("", "0"):
        pytest.skip(f"{SKIP_VAR} is set: not checked in a browser")
    executable = find_chromium()
    if executable is None:
        pytest.fail("no Chromium found: " + INSTALL_HINT, pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the Python package playwright is not installed: " + INSTALL_HINT,
            pytrace=False,
        )
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        # Playwright starts it with a new, empty profile (--user-data-dir) of its own.
        chromium = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


# The window every page is read in: a laptop's. No code block, output or table of the
# book may need sideways scrolling at this width (test_browser.check_layout;
# book/_static/smaso.css; ruff at 88 columns).
VIEWPORT = {"width": 1280, "height": 800}


class Visit:
    """One page in a fresh browser context (empty storage, as for a first-time reader),
    with everything that went wrong while it loaded: console errors, uncaught
    exceptions, failed or HTTP-error requests, and requests that left ``base``
    (aborted: the book, and JupyterLab serving it, must work offline)."""

    def __init__(self, browser, base: str, **context_options) -> None:
        self.base = base
        self.context = browser.new_context(viewport=VIEWPORT, **context_options)
        self.errors: list[str] = []
        self.external: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on(
            "console",
            lambda m: (
                m.type == "error" and self.errors.append(f"console error: {m.text}")
            ),
        )
        self.page.on(
            "pageerror", lambda e: self.errors.append(f"uncaught exception: {e}")
        )
        self.page.on("requestfailed", self._failed)
        self.page.on(
            "response",
            lambda r: (
                r.status >= 400 and self.errors.append(f"HTTP {r.status}: {r.url}")
            ),
        )

    def _route(self, route):
        url = route.request.url
        if url.startswith(self.base) or url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            self.external.append(url)
            route.abort()

    def _failed(self, request):
        if request.url not in self.external:
            self.errors.append(f"request failed ({request.failure}): {request.url}")

    def close(self) -> None:
        self.context.close()
