"""Run an experiment's train.py, pausing at one optimizer step until a real signal stops it (tests only).

    python tests/paused_train.py STEP path/to/train.py ARGS...

train.py runs as __main__ with ARGS, unchanged, except that the first `Run.should_stop(step)` call
with step >= STEP prints "paused at step <step>" on stdout and waits (at most 10 minutes) until the
harness's own signal handler has run: the test sends SIGTERM or SIGUSR1 from outside at that
moment, so the run stops at a known step through the real handler, flag and checkpoint path.
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import harness  # noqa: E402

WAIT_S = 600


def main():
    pause_at, script, *argv = sys.argv[1:]
    pause_at = int(pause_at)
    should_stop = harness.Run.should_stop
    paused = []

    def pausing_should_stop(self, step=None):
        if not paused and step is not None and step >= pause_at:
            paused.append(step)
            print(f"paused at step {step}", flush=True)
            deadline = time.monotonic() + WAIT_S
            while not self._stop_flag and time.monotonic() < deadline:
                time.sleep(0.01)  # the handler runs between these sleeps
        return should_stop(self, step)

    harness.Run.should_stop = pausing_should_stop
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).resolve().parent))  # the script's sibling modules, as python3 does
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
