"""Fixtures shared by the unit tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: small linear-algebra calls are fastest, and steadiest on a
    shared CPU,
    without thread synchronisation. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
