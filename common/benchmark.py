"""Side-by-side timing for the benchmark scripts in scripts/.

Every benchmark times its variants in one process, in interleaved rounds, so that slow drifts of
a shared machine (clock changes, other jobs) hit every variant alike; device work is synchronised
around each timed call, so the times include it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    wall: list[float] = field(default_factory=list)  # seconds per timed call
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per timed call


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    *,
    warmup_rounds: int = 0,
    before: Callable[[str], object] | None = None,
    on_round: Callable[[int, dict[str, Timings]], object] | None = None,
) -> dict[str, Timings]:
    """Time one call of every variant per round, round-robin, in reverse order every other round
    (A B, B A, ...). The first `warmup_rounds` rounds are not recorded; `before(name)` runs untimed
    before each call; `on_round(r, timings)` runs after each recorded round (progress lines)."""
    timings = {name: Timings() for name in variants}
    names = list(variants)
    for r in range(warmup_rounds + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if before is not None:
                before(name)
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            sync(device)
            if r >= warmup_rounds:
                timings[name].wall.append(time.perf_counter() - wall)
                timings[name].cpu.append(time.process_time() - cpu)
        if r >= warmup_rounds and on_round is not None:
            on_round(r - warmup_rounds, timings)
    return timings
