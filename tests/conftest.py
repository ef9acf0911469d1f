"""Fixtures shared by the tests: one intra-op thread for the unit tests (or the thread
count restored after a test that sets it), and one headless Chromium for the browser
tests (tests/test_browser.py, tests/test_jupyter.py). Shared set-up that is not a
fixture (tiny runs of the experiment runner) is in tests/helpers.py."""

import pytest
import torch
from browsing import launch_chromium


@pytest.fixture
def restore_threads():
    """torch's intra-op thread count as it was before the test (for tests whose code
    sets it, e.g. ``--threads 1`` on the command line)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread(restore_threads):
    """One intra-op thread: small linear-algebra calls are fastest, and steadiest on a
    shared CPU, without thread synchronisation. Restored afterwards."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (tests/browsing.py): skipped with ``SMASO_SKIP_BROWSER=1``, a
    failure saying what to install when Chromium or Playwright is missing."""
    with launch_chromium() as chromium:
        yield chromium


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (benchmarks/gpu.py runs these)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
