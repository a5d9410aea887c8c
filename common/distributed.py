"""One process or many: the process group (torchrun's environment, or a group of one for FSDP2),
this rank, the device it trains on, and DDP wrapping. Takes values, not flags (common/harness.py
reads the flags); FSDP2 sharding and its checkpoints live in common/sharded.py.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common import sharded
from common.cli import UsageError

__all__ = ["cleanup_distributed", "distribute", "gradient_sync", "is_main", "rank", "resolve_device", "setup",
           "unwrap", "world_size"]

# this process's place among the ranks; one dict so that tests can set a field (monkeypatch.setitem)
_DIST = {"rank": 0, "world_size": 1, "local_rank": 0, "initialised": False, "group_of_one": False}


def setup(group: bool = False, device: str = "auto") -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; initialises the process group.

    nccl on CUDA, gloo otherwise. Not under torchrun (or WORLD_SIZE=1): (0, 1, 0), and no process
    group unless `group` asks for one (a group of one process: FSDP2 and its checkpoints need one).
    `device`: the --device text (a cpu device keeps CUDA out). Safe to call more than once.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wants_group = world > 1 or group
    # an earlier call without a group (another run in this process) set up none: make it now
    if _DIST["initialised"] and not (wants_group and not (dist.is_available() and dist.is_initialized())):
        return _DIST["rank"], _DIST["world_size"], _DIST["local_rank"]
    if wants_group:
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            backend = "nccl" if use_cuda else "gloo"
            if world > 1:
                dist.init_process_group(backend=backend)
            else:  # no torchrun: an in-process store, no port
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
                _DIST["group_of_one"] = True
        _DIST.update(rank=rank, world_size=world, local_rank=local_rank)
    _DIST["initialised"] = True
    return _DIST["rank"], _DIST["world_size"], _DIST["local_rank"]


def rank() -> int:
    return _DIST["rank"]


def world_size() -> int:
    return _DIST["world_size"]


def is_main() -> bool:
    """True on rank 0 (and always when not distributed)."""
    return _DIST["rank"] == 0


def cleanup_distributed(barrier: bool = False) -> None:
    """Tear the process group down. `barrier=True` (a normal end) first waits until every rank is
    done communicating: a rank that destroys gloo while its peer still uses it can abort at exit."""
    if (_DIST["world_size"] > 1 or _DIST["group_of_one"]) and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _DIST.update(rank=0, world_size=1, local_rank=0, initialised=False, group_of_one=False)


def resolve_device(text: str = "auto") -> torch.device:
    """--device: auto (cuda if available, on this rank's GPU under torchrun), cpu, cuda, cuda:N, mps."""
    text = str(text or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {text!r}; accepted: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", _DIST["local_rank"] if _DIST["world_size"] > 1 else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available on this machine")
    return device


def distribute(model, device):
    """Wrap in DistributedDataParallel under torchrun (world size > 1); unchanged otherwise, and
    for a model that FSDP2 sharded (it does the gradient reduction itself)."""
    if _DIST["world_size"] <= 1 or sharded.is_sharded(model):
        return model
    device = torch.device(device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(net, sync: bool):
    """A context for the forward and backward of one micro-batch of gradient accumulation: with
    sync=False the gradients only accumulate on this rank (DDP's no_sync; FSDP2 keeps them unsharded),
    the backward with sync=True reduces their sum. A no-op for one process without FSDP2."""
    wrapped = getattr(net, "_orig_mod", net)  # under torch.compile
    if isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if sharded.is_sharded(wrapped):
        sharded.set_gradient_sync(wrapped, sync)
    return contextlib.nullcontext()


def unwrap(model):
    """The plain module under torch.compile / DDP wrappers (its state_dict keys have no prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model
