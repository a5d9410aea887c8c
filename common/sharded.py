"""FSDP2 for the experiments: a model sharded with `torch.distributed.fsdp.fully_shard`, and its
sharded checkpoints (torch.distributed.checkpoint, DCP).

    model = shard_model(model, model.layers, device)   # each block, then the root; before the optimizer
    save(folder, model, optimizer)                     # every rank writes its shards (a collective)
    load(folder, model, optimizer)                     # into the model's and optimizer's own shards

Parameters become DTensors sharded along their first dimension over all ranks (FSDP2's default,
which MetaOptimize's node- and weight-wise blocks need). A checkpoint folder holds the model's
state_dict and the optimizer's, its parameter indices replaced by the parameters' names (so it
does not depend on the order of param groups); entries that every rank holds alike (MetaOptimize's
"meta" entry with beta, the steps, BatchNorm statistics) are written once, by the lowest rank.
Loading needs no throwaway optimizer step: the optimizer's state is laid out from the folder's
metadata, each tensor of a parameter's shape sharded like that parameter. DCP reshards, so a
folder loads on another number of ranks, or into an unsharded model (one process, no process group).

The run folder rules (names, atomic replacement) live in common/runfolder.py and common/harness.py.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def any_sharded(tensors) -> bool:
    """True when one of the tensors is a DTensor (a shard of a parameter of FSDP2)."""
    dtensor = _dtensor_type() if dist.is_available() else None
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are DTensors (the model went through `shard_model`)."""
    return any_sharded(model.parameters())


def shard_model(model: nn.Module, units, device) -> nn.Module:
    """fully_shard each module of `units` (a transformer block, a residual block), then the model
    itself (what is left: embeddings, stem, head), over all ranks of the default process group.

    Call it before the optimizer is built (the parameters become new DTensor objects). Returns
    the model, which stays the module to save, evaluate and step (FSDP2 changes its class in place).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """For gradient accumulation: with sync=False backward keeps the gradients unsharded and local;
    the next backward with sync=True reduce-scatters the accumulated sum (DDP's no_sync)."""
    model.set_requires_gradient_sync(sync)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, _dtensor_type()) else tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with whole tensors on every rank (a collective: every rank calls it)."""
    dtensor = _dtensor_type()
    return {k: v.full_tensor() if isinstance(v, dtensor) else v for k, v in model.state_dict().items()}


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's state_dict (names and bytes, sorted by name); sharded or not, every
    rank gets the digest of the whole model (a collective when sharded)."""
    state = full_state_dict(model) if is_sharded(model) else model.state_dict()
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _param_names(model: nn.Module, optimizer) -> list[str]:
    """The model's name of each optimizer parameter, in the optimizer's order (its state_dict indices)."""
    names = {}
    for name, p in model.named_parameters():  # tied weights: the first name, as state_dict() keeps
        names.setdefault(p, name)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(params) if p not in names]
    if missing:
        raise ValueError(f"the optimizer holds {len(missing)} tensor(s) that are not parameters of the model")
    return [names[p] for p in params]


def optimizer_state_by_name(model: nn.Module, optimizer) -> dict:
    """optimizer.state_dict() with the parameter indices replaced by the parameters' names."""
    sd = optimizer.state_dict()
    names = _param_names(model, optimizer)
    return {**sd, "state": {names[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def optimizer_state_by_index(model: nn.Module, optimizer, state: dict) -> dict:
    """Inverse of `optimizer_state_by_name`, for this optimizer's parameter order."""
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    try:
        return {**state, "state": {index[k]: s for k, s in state["state"].items()},
                "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in state["param_groups"]]}
    except KeyError as e:
        raise ValueError(f"the checkpoint has optimizer state for {e.args[0]}, which this model does not have") from None


def save(folder, model: nn.Module, optimizer=None) -> None:
    """Write the model's (and optimizer's) state into `folder` with DCP; every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer_state_by_name(model, optimizer)
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True),
                 planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    except dcp.CheckpointException as e:  # each rank's error, gathered: a full disk stays an OSError
        cause = _first_failure(e)
        if isinstance(cause, OSError):
            raise cause from None
        raise


def is_complete(folder) -> bool:
    """True when `folder` holds a finished `save` (DCP writes its metadata file last)."""
    return (Path(folder) / ".metadata").is_file()


def _optimizer_template(metadata, model: nn.Module) -> dict:
    """Something to load the optimizer entry of a checkpoint into, laid out from its metadata: a
    tensor of a parameter's shape sharded like the parameter, other tensors whole, other values None
    (DCP puts the saved object there)."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    params = dict(model.named_parameters())
    root: dict = {}
    for key, path in (metadata.planner_data or {}).items():
        if path[0] != "optimizer":
            continue
        item, value = metadata.state_dict_metadata[key], None
        if isinstance(item, TensorStorageMetadata):
            like = params.get(path[2]) if len(path) == 4 and path[1] == "state" else None
            if like is not None and tuple(like.shape) == tuple(item.size):
                value = torch.empty_like(like, dtype=item.properties.dtype)
            else:
                value = torch.empty(item.size, dtype=item.properties.dtype)
        set_element(root, path, value)
    return root["optimizer"]


def load(folder, model: nn.Module, optimizer=None) -> None:
    """Read a folder written by `save` into the model (and optimizer); every rank calls it.

    Raises ValueError when the folder does not fit (other model flags, another optimizer)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    state = {"model": model.state_dict()}
    if optimizer is not None:
        if not any(path[0] == "optimizer" for path in (metadata.planner_data or {}).values()):
            raise ValueError(f"{folder} holds no optimizer state")
        state["optimizer"] = _optimizer_template(metadata, model)
    try:
        with warnings.catch_warnings():  # one process without a process group is a use we mean
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)))
    except (dcp.CheckpointException, RuntimeError, ValueError) as e:  # a missing key, another shape, ...
        raise ValueError(f"{folder}: {_first_error(e)}") from None
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state_by_index(model, optimizer, state["optimizer"]))


def _first_failure(e: Exception) -> BaseException:
    """The error of the first failed rank inside DCP's CheckpointException (else `e`)."""
    failures = getattr(e, "failures", None)  # {rank: (exception, traceback summary)}
    if failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def _first_error(e: Exception) -> str:
    cause = _first_failure(e)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"
