"""What many tests share: exact comparison of nested state, the checkpoint round trip of the
harness, and the environment of a child process.

    from checks import assert_same, child_env, free_port, gloo_group, through_checkpoint
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def assert_same(a, b, path="state", rtol=0.0):
    """Equal nested state (dicts, lists, tensors, numbers): tensors bit for bit with their dtype and
    shape, or floating tensors to `rtol` where it is given; nan equals nan."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        if rtol and a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=rtol, atol=0, msg=path)
        else:
            assert torch.equal(a, b), f"{path}: differs by up to {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]", rtol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", rtol)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def through_checkpoint(obj):
    """What a checkpoint gives back: torch.save, then torch.load(weights_only=True) on the CPU."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


def child_env(**extra) -> dict:
    """A train.py child's environment: one thread, wandb offline, no network, this checkout's
    `common`, no traceback switch and no SLURM job of the test's own."""
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # no network: refuse at once
        e[k] = "http://127.0.0.1:9"
    e.pop("HARNESS_TRACEBACK", None)
    for k in [k for k in e if k.startswith("SLURM_")]:
        e.pop(k)
    e.update(extra)
    return e


def free_port() -> int:
    """A TCP port free on localhost now: the MASTER_PORT of a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """A rank of a `torch.multiprocessing.spawn`ed test in its gloo process group on localhost (one
    torch thread); on a normal exit every rank is done with gloo before any tears it down (a rank
    that destroys gloo while its peer still uses it can abort at exit)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
