"""Fixtures shared by test files (use them with `pytestmark = pytest.mark.usefixtures(...)`)."""

import os

import pytest
import torch

# Under pytest-xdist (`-n N`) the workers share the machine's cores: each takes its share of threads,
# so that N workers do not oversubscribe the CPU.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture
def one_thread():
    """Small models on a shared CPU: one torch thread avoids contention (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def compiled(monkeypatch):
    """CompiledImpl (CUDA's torch.compile step) forced on CPU with a cheap backend; returns the
    monkeypatch (set `impl._COMPILE_BACKEND` or `torch.compile` through it to replace them)."""
    from common.optimizers import impl

    torch._dynamo.reset()
    monkeypatch.setattr(impl, "_FORCE_COMPILED", True)
    monkeypatch.setattr(impl, "_COMPILE_BACKEND", "eager")
    return monkeypatch
