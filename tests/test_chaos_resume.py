"""Chaos resumes (issue 28): a run interrupted by random SIGKILL / SIGTERM / SIGINT, some of the
SIGKILLs inside a checkpoint write, each time resumed with the same command plus --resume, ends
exactly as its uninterrupted twin: every tensor of the checkpoint, the RNG states, every metric
line and the summary (tests/test_experiments_resume.py: assert_same_run).

Each segment is the experiment's train.py run as __main__ in a process forked from this one (torch
is imported once, so a segment starts in well under a second), with one torch thread. The signal
schedule comes from a seeded random.Random: a failure reproduces with the same seed (printed in
the assertion message). A signal that lands before the harness installs its handlers kills the
segment as SIGKILL does; a SIGKILL before the first checkpoint leaves a folder that --resume starts
again from the beginning.
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
SEED = 28  # the signal schedules
_FORK = multiprocessing.get_context("fork")


def _segment(script, argv, log, write_pipe):
    """The child: train.py as `python3 train.py ARGV`, output into `log`. With `write_pipe`, the
    first checkpoint write says so on the pipe (before or after writing its bytes) and waits there
    to be killed."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    if write_pipe is not None:
        pipe, after = write_pipe
        real = harness.atomic_write_bytes

        def held_write(path, write):
            def written(f):
                if after:
                    write(f)
                    f.flush()
                os.write(pipe, b"w")
                time.sleep(60)  # the parent kills this process here: a temp file is left behind

            if Path(path).name != runfolder.CHECKPOINT:
                return real(path, write)
            return real(path, written)

        harness.atomic_write_bytes = held_write
    sys.argv = [str(script), *map(str, argv)]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(str(script), run_name="__main__")


def run_segment(script, argv, log, sig=None, delay=0.0, in_write=None, timeout=300):
    """One segment; `sig` after `delay` s (or, with `in_write` False/True, SIGKILL inside the first
    checkpoint write, before/after its bytes). Returns the exit code (negative: killed)."""
    pipe = os.pipe() if in_write is not None else None
    proc = _FORK.Process(target=_segment, args=(script, argv, log, (pipe[1], in_write) if pipe else None))
    proc.start()
    if pipe:
        os.close(pipe[1])
        import select

        ready, _, _ = select.select([pipe[0]], [], [], timeout)
        if ready and os.read(pipe[0], 1):
            os.kill(proc.pid, signal.SIGKILL)
        os.close(pipe[0])
    elif sig is not None:
        proc.join(delay)
        if proc.exitcode is None:
            os.kill(proc.pid, sig)
    proc.join(timeout)
    assert proc.exitcode is not None, f"segment hung: {Path(log).read_text()[-3000:]}"
    return proc.exitcode


def chaos(tmp_path, script, argv, signals, max_delay, kills_in_writes):
    """The twin, then the run cut by `signals` random interruptions (`kills_in_writes` of them
    SIGKILLs inside a checkpoint write), resumed to the end; both compared."""
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
            what = ("SIGKILL in a write", "after its bytes" if rng.random() < 0.5 else "before its bytes")
            code = run_segment(script, cut, log, in_write=what[1].startswith("after"))
        else:
            what = (rng.choice(["SIGKILL", "SIGTERM", "SIGINT"]), round(rng.uniform(0.05, max_delay), 3))
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
    return schedule


def test_cifar10_twenty_random_interruptions(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", n_train=40, n_test=10)  # 8 batches of 5: 24 steps in 3 epochs
    argv = ["--data-dir", data, "--batch-size", 5, "--eval-batch-size", 10, "--num-epochs", 3, "--device", "cpu",
            "--log-every", 3, "--augment", "--stepsize-groups", "resnet18_blocks"]
    schedule = chaos(tmp_path, REPO / "cifar10" / "train.py", argv, signals=20, max_delay=3.0, kills_in_writes=5)
    assert sum(s[0] == "SIGKILL in a write" for s in schedule) >= 3, schedule


def test_continual_batch_one_interruptions(tmp_path):
    data = write_fake_cifar100(tmp_path / "data", n_train=400, n_test=200)
    # 2 tasks of 2 classes, 8 images each at batch 1: 16 steps; a checkpoint after each task
    argv = ["--data-dir", data, "--device", "cpu", "--classes-per-task", 2, "--num-tasks", 2, "--acc-every", 4,
            "--log-every", 3, "--eval-batch-size", 3, "--stepsize-groups", "last_layer_and_others"]
    chaos(tmp_path, REPO / "continual_cifar100" / "train.py", argv, signals=8, max_delay=1.5, kills_in_writes=2)


def test_tinystories_interruptions(tmp_path, tinystories_data):  # noqa: F811
    argv = ["--data-dir", tinystories_data, "--vocab-size", VOCAB, "--dim", 32, "--n-layers", 2, "--n-heads", 2,
            "--n-kv-heads", 2, "--seq-len", 32, "--batch-size", 4, "--grad-accum", 2, "--device", "cpu",
            "--log-every", 5, "--alpha0", "1e-3", "--max-iters", 20, "--eval-every", 6, "--eval-iters", 2,
            "--stepsize-groups", "layerwise"]
    chaos(tmp_path, REPO / "tinystories" / "train.py", argv, signals=6, max_delay=2.0, kills_in_writes=2)


@pytest.fixture(autouse=True)
def _restore_signals():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, h in old.items():
        signal.signal(s, h)
