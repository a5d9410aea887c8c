"""When a run stops early: SIGTERM / SIGUSR1 / SIGINT (the handlers only set a flag; the loop
checkpoints between steps), --max-time counted from process start, the hidden test flag
--stop-at-step, and under several ranks their agreement (an all-reduce every
DDP_STOP_CHECK_EVERY checks). Takes values; common/harness.py's `Run` holds one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

__all__ = ["DDP_STOP_CHECK_EVERY", "PROCESS_START", "StopControl"]

PROCESS_START = time.monotonic()  # --max-time counts from here (the import happens at process start)
DDP_STOP_CHECK_EVERY = 20  # under DDP, ranks agree on stopping every this many should_stop() calls
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopControl:
    """`max_time`: seconds since process start (None: no limit), named `max_time_text` in the
    reason; `stop_at`: from this step on rank 0 sends itself SIGTERM (None: never)."""

    def __init__(self, max_time: float | None = None, max_time_text=None, stop_at: int | None = None,
                 is_main: bool = True, world_size: int = 1, device="cpu"):
        self.max_time, self.max_time_text, self.stop_at = max_time, max_time_text, stop_at
        self.is_main, self.world_size, self.device = is_main, world_size, device
        self.flag = False
        self.reason: str | None = None
        self._calls = 0
        self._old_handlers: dict = {}

    def install(self) -> None:
        """Our handlers for SIGTERM, SIGUSR1, SIGINT (none outside the main thread)."""
        for sig in SIGNALS:
            with contextlib.suppress(ValueError, OSError):  # not the main thread: no handlers
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # started with Ctrl-C ignored (nohup, `&` in a script): keep it so
                self._old_handlers[sig] = signal.signal(sig, self.on_signal)

    def restore(self) -> None:
        """The handlers from before `install`."""
        for sig, handler in self._old_handlers.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)
        self._old_handlers = {}

    def on_signal(self, signum, frame):  # only sets a flag; the loop saves between steps
        self.flag = True
        self.reason = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\nCtrl-C: stopping with a checkpoint after this step (press it again to abort)", file=sys.stderr)

    def should_stop(self, step: int | None = None) -> bool:
        """True once the time is used up or a signal arrived. No device sync on one process; under
        several ranks call it the same number of times on every rank (see the module's text)."""
        if self.stop_at is not None and step is not None and step >= self.stop_at and self.is_main \
                and not self.flag:
            if signal.SIGTERM in self._old_handlers:
                os.kill(os.getpid(), signal.SIGTERM)  # our handler runs before the next bytecode
            else:  # no handler of ours (not the main thread): only what it would do
                self.flag, self.reason = True, "SIGTERM"
        if not self.flag and self.max_time is not None and time.monotonic() - PROCESS_START >= self.max_time:
            self.flag = True
            self.reason = f"--max-time {self.max_time_text}"
        if self.world_size <= 1:
            return self.flag
        self._calls += 1
        if self._calls % DDP_STOP_CHECK_EVERY and self.stop_at is None:  # --stop-at-step: every call
            return False
        flag = torch.tensor([float(self.flag)], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and not self.flag:
            self.flag, self.reason = True, "another rank stopped"
        return self.flag
