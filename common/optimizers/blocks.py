"""Step-size blocks (spec section 5): which weights share one log step size beta."""

from __future__ import annotations

from collections.abc import Sequence

# Named block lists of the paper: counts of consecutive parameter tensors.
NAMED_STEPSIZE_GROUPS = {
    "resnet18_blocks": [3, 12, 15, 15, 15, 2],
    "resnet50_blocks": [3, 30, 39, 57, 30, 2],
    "transformer_blocks_15m": [1, 9, 9, 9, 9, 9, 10],
}
GROUP_KINDS = ("scalar", "layerwise", "nodewise", "weightwise", "param_groups", "last_layer_and_others")


def parse_counts(spec: str) -> list[int]:
    """'[3,12,47]' (brackets optional) -> [3, 12, 47]; ValueError naming stepsize_groups otherwise."""
    try:
        counts = [int(x) for x in spec.strip().strip("[]() ").split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"stepsize_groups: unknown value {spec!r}; accepted: {', '.join(GROUP_KINDS + tuple(NAMED_STEPSIZE_GROUPS))}, "
            "or a list of tensor counts like [3,12,47]") from None
    if not counts or any(c <= 0 for c in counts):
        raise ValueError(f"stepsize_groups: block sizes must be positive integers, got {spec!r}")
    return counts


def resolve_stepsize_groups(spec, num_tensors: int, group_sizes: Sequence[int] | None = None):
    """A `stepsize_groups` value as ("tensor", counts) or ("nodewise" | "weightwise", None).

    `counts` lists how many consecutive parameter tensors each block holds; `group_sizes` are the
    tensor counts of the param groups (for "param_groups")."""
    if isinstance(spec, str):
        low = spec.strip().lower()
        if low == "scalar":
            return "tensor", [num_tensors]
        if low == "layerwise":
            return "tensor", [1] * num_tensors
        if low in ("nodewise", "weightwise"):
            return low, None
        if low == "param_groups":
            return "tensor", list(group_sizes or [num_tensors])
        if low == "last_layer_and_others":
            if num_tensors < 3:
                raise ValueError("stepsize_groups: last_layer_and_others needs at least 3 tensors")
            return "tensor", [num_tensors - 2, 2]
        counts = list(NAMED_STEPSIZE_GROUPS[low]) if low in NAMED_STEPSIZE_GROUPS else parse_counts(spec)
    else:
        counts = [int(x) for x in spec]
        if not counts or any(c <= 0 for c in counts):
            raise ValueError(f"stepsize_groups: block sizes must be positive integers, got {counts}")
    if sum(counts) != num_tensors:
        raise ValueError(f"stepsize_groups: block sizes {counts} add up to {sum(counts)}, "
                         f"but the optimizer was given {num_tensors} parameter tensors")
    return "tensor", counts


class Layout:
    """Where each tensor's blocks sit in the flat per-block vectors (beta, z, alpha): tensor i's
    entries are starts[i] .. starts[i] + units[i] - 1, of `num_blocks` in all."""

    def __init__(self, kind: str, starts: list[int], units: list[int], shapes: list, num_blocks: int):
        self.kind, self.starts, self.units, self.shapes, self.num_blocks = kind, starts, units, shapes, num_blocks

    @classmethod
    def of(cls, kind: str, counts, shapes, tensor_blocks=None, num_blocks: int | None = None) -> Layout:
        """The layout of tensors of `shapes` for a block kind of `resolve_stepsize_groups`.

        Tensor blocks: a tensor's entry is its block index and it has one unit; the blocks hold
        `counts` consecutive tensors each, or tensor i is in block `tensor_blocks[i]` (of num_blocks,
        default len(counts)). Nodewise: one block per index of the first dimension (one for a 0-d
        tensor). Weightwise: one block per weight."""
        if kind == "tensor":
            if tensor_blocks is None:
                tensor_blocks = [b for b, c in enumerate(counts) for _ in range(c)]
            return cls(kind, list(tensor_blocks), [1] * len(shapes), shapes,
                       len(counts) if num_blocks is None else num_blocks)
        units = [(s[0] if len(s) else 1) if kind == "nodewise" else _numel(s) for s in shapes]
        starts, total = [], 0
        for u in units:
            starts.append(total)
            total += u
        return cls(kind, starts, units, shapes, total)

    def view(self, flat, i: int):
        """Tensor i's entries of a flat per-block vector, broadcastable against the tensor."""
        if self.kind == "tensor":
            return flat[self.starts[i]]
        piece = flat[self.starts[i]:self.starts[i] + self.units[i]]
        shape = self.shapes[i]
        if self.kind == "weightwise":
            return piece.view(shape)
        return piece.view((-1,) + (1,) * (len(shape) - 1)) if len(shape) else piece.view(())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
