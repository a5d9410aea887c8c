"""Chaos resumes (issue 28): a run interrupted by random SIGKILL / SIGTERM / SIGINT, some of the
SIGKILLs inside a checkpoint write, each time resumed with the same command plus --resume, ends
exactly as its uninterrupted twin: every tensor of the checkpoint, the RNG states, every metric
line and the summary (tests/test_experiments_resume.py: assert_same_run).

Each segment is the experiment's train.py run as __main__ in a process forked from this one (torch
is imported once, so a segment starts in well under a second), with one torch thread. The signal
schedule comes from a seeded random.Random: a failure reproduces with the same seed (printed in
the assertion message). Each signal is sent once its segment has reached a random number of
steps (0: while it starts), so the schedule does not depend on the machine's speed. A signal that
lands before the harness installs its handlers kills the segment as SIGKILL does; a SIGKILL before
the first checkpoint leaves a folder that --resume starts again from the beginning.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import runpy
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from cifar_fixtures import write_fake_cifar10, write_fake_cifar100
from test_experiments_resume import assert_same_run, tinystories_data  # noqa: F401 (a fixture)
from test_tinystories import VOCAB

from common import harness, runfolder

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("CHAOS_SEED", "28"))  # the signal schedules (another: CHAOS_SEED=N)
_FORK = multiprocessing.get_context("fork")


def _segment(script, argv, log, pipe, hold_write):
    """The child: train.py as `python3 train.py ARGV`, output into `log`. It tells the parent on
    `pipe` each step it reaches ("s", at every should_stop call) and each checkpoint write ("w");
    with `hold_write` "before" / "after", its first checkpoint write waits there (before or after
    writing its bytes) to be killed."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # Python's own streams too (pytest's capture replaced them): a KeyboardInterrupt's traceback lands in `log`
    sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    torch.set_num_threads(1)
    should_stop, real_write = harness.Run.should_stop, runfolder.atomic_write

    def reporting_should_stop(self, step=None):
        os.write(pipe, b"s")
        return should_stop(self, step)

    def reporting_write(path, write, check=None, **where):
        if Path(path).name != runfolder.CHECKPOINT or hold_write is None:
            return real_write(path, write, check, **where)

        def held(f):
            if hold_write == "after":
                write(f)
                f.flush()
            os.write(pipe, b"w")
            time.sleep(60)  # the parent kills this process here: a temp file is left behind

        return real_write(path, held, check, **where)

    harness.Run.should_stop, runfolder.atomic_write = reporting_should_stop, reporting_write
    sys.argv = [str(script), *map(str, argv)]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(str(script), run_name="__main__")


def run_segment(script, argv, log, sig=None, after_steps=0, hold_write=None, timeout=300):
    """One segment: `sig` once it has reached `after_steps` more steps, or with `hold_write`
    ("before" / "after" its bytes) SIGKILL inside its first checkpoint write; None: to the end.
    Returns the exit code (negative: killed by that signal)."""
    read, write = os.pipe()
    proc = _FORK.Process(target=_segment, args=(script, argv, log, write, hold_write))
    proc.start()
    os.close(write)
    steps, deadline = 0, time.monotonic() + timeout
    if sig is not None and after_steps == 0:
        time.sleep(0.2)  # while it starts: parsing, claiming the folder, loading data or the checkpoint
        os.kill(proc.pid, sig)
        sig = None
    with os.fdopen(read, "rb", buffering=0) as pipe:
        while (sig is not None or hold_write is not None) and time.monotonic() < deadline:
            byte = pipe.read(1)
            if not byte:  # the segment ended first
                break
            steps += byte == b"s"
            if (hold_write is not None and byte == b"w") or (hold_write is None and steps >= after_steps):
                os.kill(proc.pid, signal.SIGKILL if hold_write is not None else sig)
                break
        proc.join(max(deadline - time.monotonic(), 1))
    assert proc.exitcode is not None, f"segment hung: {Path(log).read_text()[-3000:]}"
    return proc.exitcode


def chaos(tmp_path, script, argv, signals, max_steps, kills_in_writes):
    """The twin, then the run cut by `signals` random interruptions (each after 0 to `max_steps` steps
    of its segment; `kills_in_writes` of them SIGKILLs inside a checkpoint write), resumed to the
    end; both compared. Returns the schedule: (signal, steps or where, exit code) per segment."""
    out = tmp_path / "out"
    rng = random.Random(SEED)
    assert run_segment(script, [*argv, "--save-directory", out, "--run-name", "twin"], tmp_path / "twin.log") == 0
    cut = [*argv, "--save-directory", out, "--run-name", "cut", "--resume"]
    in_writes = set(rng.sample(range(signals), kills_in_writes))
    schedule = []
    for i in range(signals):
        if runfolder.run_state(out / "cut") == "finished":
            break
        log = tmp_path / f"segment{i}.log"
        if i in in_writes:
            what = ("SIGKILL in a write", rng.choice(["before", "after"]))
            code = run_segment(script, cut, log, hold_write=what[1])
        else:  # after 0 steps: while it starts (loading, building, resuming)
            what = (rng.choice(["SIGKILL", "SIGTERM", "SIGINT"]), rng.randint(0, max_steps))
            code = run_segment(script, cut, log, getattr(signal, what[0]), what[1])
        schedule.append((*what, code))
        text = log.read_text()
        why = (SEED, schedule, text[-3000:])
        assert code in (0, 1, -signal.SIGKILL, -signal.SIGTERM) and "error:" not in text, why
        if code == 0:  # finished, or stopped by SIGTERM / SIGINT with a checkpoint
            assert "Traceback" not in text, why
        if code == 1:  # only a SIGINT before the harness's handlers exist ends it so
            assert what[0] == "SIGINT" and "KeyboardInterrupt" in text, why
    log = tmp_path / "last.log"
    assert run_segment(script, cut, log) == 0, log.read_text()[-3000:]
    assert_same_run(out / "twin", out / "cut")
    print(f"schedule (seed {SEED}): {schedule}")
    return schedule


def test_cifar10_twenty_random_interruptions(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", n_train=40, n_test=10)  # 8 batches of 5: 24 steps in 3 epochs
    argv = ["--data-dir", data, "--batch-size", 5, "--eval-batch-size", 10, "--num-epochs", 3, "--device", "cpu",
            "--log-every", 3, "--augment", "--stepsize-groups", "resnet18_blocks"]
    schedule = chaos(tmp_path, REPO / "cifar10" / "train.py", argv, signals=20, max_steps=3, kills_in_writes=5)
    assert len(schedule) == 20 and sum(s[0] == "SIGKILL in a write" for s in schedule) == 5, schedule


def test_continual_batch_one_interruptions(tmp_path):
    data = write_fake_cifar100(tmp_path / "data", n_train=400, n_test=200)
    # 2 tasks of 2 classes, 8 images each at batch 1: 16 steps; a checkpoint after each task
    argv = ["--data-dir", data, "--device", "cpu", "--classes-per-task", 2, "--num-tasks", 2, "--acc-every", 4,
            "--log-every", 3, "--eval-batch-size", 3, "--stepsize-groups", "last_layer_and_others"]
    chaos(tmp_path, REPO / "continual_cifar100" / "train.py", argv, signals=8, max_steps=4, kills_in_writes=2)


def test_tinystories_interruptions(tmp_path, tinystories_data):  # noqa: F811
    argv = ["--data-dir", tinystories_data, "--vocab-size", VOCAB, "--dim", 32, "--n-layers", 2, "--n-heads", 2,
            "--n-kv-heads", 2, "--seq-len", 32, "--batch-size", 4, "--grad-accum", 2, "--device", "cpu",
            "--log-every", 5, "--alpha0", "1e-3", "--max-iters", 20, "--eval-every", 6, "--eval-iters", 2,
            "--stepsize-groups", "layerwise"]
    chaos(tmp_path, REPO / "tinystories" / "train.py", argv, signals=6, max_steps=5, kills_in_writes=2)


@pytest.fixture(autouse=True)
def _restore_signals():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, h in old.items():
        signal.signal(s, h)
