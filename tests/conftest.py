"""Fixtures shared by the tests: one intra-op thread for the unit tests, and one
headless Chromium for the browser tests (tests/test_browser.py, tests/test_jupyter.py).
"""

import pytest
import torch
from browsing import launch_chromium


@pytest.fixture
def one_thread():
    """One intra-op thread: small linear-algebra calls are fastest, and steadiest on a
    shared CPU,
    without thread synchronisation. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (tests/browsing.py): skipped with ``SMASO_SKIP_BROWSER=1``, a
    failure saying what to install when Chromium or Playwright is missing."""
    with launch_chromium() as chromium:
        yield chromium
