"""Reading MetaOptimize checkpoints written before the current state format (STATE_FORMAT 2)."""

from __future__ import annotations


def convert_format_1(state: dict, param_groups: list, alg_base: str, trace_scale, index: dict) -> None:
    """Format 1 (no "format" entry in the state dict's "meta") kept AdamW's momentum and the
    normalizers as moving averages ((1 - rho) m, (1 - lambda) v) and, on CPU, the trace as
    h / trace_scale (one scale per parameter, at index[p]); turn the loaded `state` (parameter ->
    its state) into format 2 in place."""
    groups = {p: g for g in param_groups for p in g["params"]}
    for p, st in state.items():
        group = groups[p]
        if alg_base == "AdamW" and "momentum" in st:
            st["momentum"] = st["momentum"] / (1.0 - group["momentum_param_base"])
        if "normalizer" in st:
            st["normalizer"] = st["normalizer"] / (1.0 - group["normalizer_param_base"])
        if trace_scale is not None and "trace" in st:
            st["trace"] = st["trace"] * float(trace_scale[index[p]])
