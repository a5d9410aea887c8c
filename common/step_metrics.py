"""Step sizes and finiteness as metrics: the step sizes any optimizer applies now
(`effective_step_sizes`), the key rule every logger of step sizes names them by
(`step_size_metrics`: the harness, common/integrations.py), and the one-host-sync check that step
sizes and weights are finite (`check_state`).

Keys: `step_size/block_i` per block, or beyond MAX_LOGGED_BLOCKS blocks `step_size/min`,
`step_size/median`, `step_size/max` (docs/CONTRACTS.md); MetaOptimize's count of meta updates
skipped on a non-finite z as `meta/skipped_nonfinite`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from common import baselines, sharded

__all__ = ["MAX_LOGGED_BLOCKS", "StateCheck", "check_state", "effective_step_sizes", "step_size_metrics"]

MAX_LOGGED_BLOCKS = 64  # more blocks than this: log step_size/min, /median, /max instead


def effective_step_sizes(optimizer) -> Tensor:
    """The step size(s) any optimizer applies now, as a 1-D tensor (one entry per block or group):
    its own `effective_step_sizes()` where it has one (MetaOptimize, MetaOptimize.around and the
    packaged class: lr alpha per block, a device tensor, no host sync; the baselines), the d-adapted
    lr of Prodigy and D-Adaptation, else the lr of each param group. Looks through wrappers that
    keep the optimizer in `.optimizer` (accelerate, Lightning)."""
    while not hasattr(optimizer, "effective_step_sizes") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if hasattr(optimizer, "effective_step_sizes"):
        return optimizer.effective_step_sizes()
    sizes = baselines.d_adapted_step_sizes(optimizer)
    if sizes is not None:
        return sizes
    return torch.tensor([float(g["lr"]) for g in optimizer.param_groups])


def step_size_metrics(sizes: Tensor, prefix: str = "") -> tuple[list[str], Tensor]:
    """The metric keys of a 1-D tensor of step sizes and the values logged under them (a tensor on
    the sizes' device: no host sync): `step_size/<prefix>block_i` per block, or beyond
    MAX_LOGGED_BLOCKS blocks `step_size/<prefix>min`, `/<prefix>median`, `/<prefix>max`."""
    sizes = sizes.detach().reshape(-1)
    if sizes.numel() > MAX_LOGGED_BLOCKS:
        return [f"step_size/{prefix}{k}" for k in ("min", "median", "max")], torch.stack(
            [sizes.min(), sizes.median(), sizes.max()])
    return [f"step_size/{prefix}block_{i}" for i in range(sizes.numel())], sizes


class StateCheck:
    """What `check_state` read: the metrics, and why the state is not finite (None when it is)."""

    __slots__ = ("metrics", "problem")

    def __init__(self, metrics: dict, problem: str | None):
        self.metrics, self.problem = metrics, problem


def check_state(optimizer, world_size: int = 1) -> StateCheck:
    """The step sizes of `optimizer` as metrics, and whether they and its weights are finite, in one
    host sync. Under several ranks with sharded parameters each rank checks its own shards and the
    ranks agree (an all-reduce)."""
    sizes = effective_step_sizes(optimizer).detach().float().reshape(-1)
    keys, shown = step_size_metrics(sizes)
    many = sizes.numel() > MAX_LOGGED_BLOCKS
    params = [p for g in optimizer.param_groups for p in g["params"]]
    finite = torch.stack([torch.isfinite(sharded.local(p).detach()).all().to(sizes.device) for p in params]).all() \
        if params else torch.ones((), dtype=torch.bool, device=sizes.device)
    if world_size > 1 and sharded.any_sharded(params):  # each rank checked its own shards
        finite = finite.float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    nonfinite_sizes = (~torch.isfinite(sizes)).sum()
    # MetaOptimize's count of meta updates skipped on a non-finite z, read in the same host sync
    skipped = getattr(optimizer, "skipped_nonfinite", None)
    extra = [skipped.to(sizes.device).float().reshape(1)] if torch.is_tensor(skipped) else []
    *values, nonfinite_sizes, weights_finite = torch.cat(
        [shown, *extra, torch.stack([nonfinite_sizes.float(), finite.float()])]).tolist()
    if extra:
        keys = [*keys, "meta/skipped_nonfinite"]
        values[-1] = int(values[-1])
    problem = None
    if nonfinite_sizes:
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        which = f"the step size of block {bad} is {values[bad]}" if not many and bad is not None \
            else "a step size is not finite"
        problem = f"{which} ({int(nonfinite_sizes)} of {sizes.numel()} blocks)"
    elif not weights_finite:
        problem = "a weight is not finite"
    return StateCheck(dict(zip(keys, values)), problem)
