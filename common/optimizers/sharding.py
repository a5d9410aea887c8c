"""Parameters sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): DTensors with Shard placements.

The step updates each rank's local shard; the layout gives every local shard the blocks of its
global rows, and z, summed locally, is summed across the shards, so that every rank makes the same
meta update as one process holding the whole model would.
"""

from __future__ import annotations

import torch

from .blocks import Layout


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


class Sharding:
    def __init__(self, layout: Layout, groups):
        self.layout, self.groups = layout, groups

    @staticmethod
    def of(params, global_layout: Layout) -> Sharding | None:
        """None unless some parameter is a DTensor; else the local layout and the process groups
        over which z is summed (the mesh dimensions the parameters are sharded along)."""
        dtensor = _dtensor_type()
        if dtensor is None or not any(isinstance(p, dtensor) for p in params):
            return None
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        starts, units, shapes, groups = [], [], [], {}
        for i, p in enumerate(params):
            if not isinstance(p, dtensor):
                raise ValueError("params: mixes sharded (DTensor) and plain parameters")
            local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            for dim, placement in enumerate(p.placements):
                if isinstance(placement, Shard):  # one all-reduce per set of ranks (each fully_shard call
                    group = p.device_mesh.get_group(dim)  # may make its own mesh over the same ranks)
                    groups[tuple(torch.distributed.get_process_group_ranks(group))] = group
                    if global_layout.kind != "tensor" and placement.dim != 0:
                        raise ValueError(f"stepsize_groups={global_layout.kind!r} needs parameters sharded along "
                                         f"their first dimension (FSDP2's default); got {placement}")
            start, shapes_i = global_layout.starts[i], tuple(local_shape)
            if global_layout.kind == "tensor":
                starts.append(start)
                units.append(1)
            elif global_layout.kind == "nodewise":
                starts.append(start + (offset[0] if len(offset) else 0))
                units.append(local_shape[0] if len(local_shape) else 1)
            else:  # weightwise: the local rows are consecutive weights of the global tensor
                row = 1
                for d in p.shape[1:]:
                    row *= d
                starts.append(start + (offset[0] * row if len(offset) else 0))
                units.append(torch.Size(local_shape).numel())
            shapes.append(shapes_i)
        return Sharding(Layout(global_layout.kind, starts, units, shapes, global_layout.num_blocks), list(groups.values()))

    @staticmethod
    def local(x):
        return x.to_local() if isinstance(x, _dtensor_type()) else x

    def sum_across_shards(self, z: torch.Tensor) -> None:
        for group in self.groups:
            torch.distributed.all_reduce(z, group=group)
