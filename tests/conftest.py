"""Fixtures shared by test files (use them with `pytestmark = pytest.mark.usefixtures(...)`)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small models on a shared CPU: one torch thread avoids contention (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
