"""The training step every experiment shares, from values rather than flags: autocast for a
mixed-precision mode, the GradScaler that goes with it, torch.compile, and backward-and-step (with
the gradient's graph when the optimizer reads it). common/harness.py maps --amp / --compile here.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from common.optim_flags import needs_graph

__all__ = ["AMP_DTYPES", "autocast", "backward_and_step", "compile_model", "graph_backward", "scaler"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the mixed-precision modes; "none": float32


def autocast(amp: str | None, device):
    """Autocast context for `amp` "bf16"/"fp16" (a no-op context for "none" or None)."""
    if amp in (None, "none"):
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp: {amp!r} is not one of none, {', '.join(AMP_DTYPES)}")
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[amp])


def scaler(amp: str | None, device) -> torch.amp.GradScaler:
    """GradScaler, enabled only for `amp` "fp16" (when disabled its calls pass through)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")


def compile_model(model, compile: bool):
    """torch.compile(model) when `compile`. Save the unwrapped module's state_dict in checkpoints."""
    return torch.compile(model) if compile else model


def backward_and_step(loss, optimizer, scaler, scheduler=None) -> None:
    """zero_grad, (scaled) backward, optimizer step (the scaler skips it on overflow), schedule step.

    An optimizer that reads the gradient's graph (MetaOptimize with a Hessian trace) gets
    `backward(create_graph=True)`, and its gradients are dropped after the step (they hold the graph)."""
    optimizer.zero_grad(set_to_none=True)
    graph = graph_backward(scaler.scale(loss), optimizer)
    scaler.step(optimizer)
    scaler.update()
    if graph:
        optimizer.zero_grad(set_to_none=True)  # frees this step's graph before the next forward
    if scheduler is not None:
        scheduler.step()


def graph_backward(loss, optimizer) -> bool:
    """`loss.backward()`, with create_graph=True when the optimizer's step needs the gradient's graph
    (a Hessian trace); returns whether it did."""
    if not needs_graph(optimizer):
        loss.backward()
        return False
    with warnings.catch_warnings():  # torch warns of the param <-> grad cycle; we drop the grads each step
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        loss.backward(create_graph=True)
    return True
