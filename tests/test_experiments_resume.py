"""Each experiment resumes after a real SIGTERM, a real --max-time and a real SIGUSR1 to exactly the
run an uninterrupted twin makes: weights, optimizer state, schedule, loss scale, the loop's
counters, the RNG states, every metric line and the summary.

Every segment is `python3 <experiment>/train.py` in its own process, with the experiment's speed
and data flags: CIFAR-10 with --augment --amp bf16 (and wandb offline, compared value by value
with metrics.jsonl over the four processes), continual CIFAR-100 with --amp fp16 (the GradScaler's
state is in every checkpoint; its augmentation is always on), TinyStories with --compile --dtype
float16 and gradient clipping (the scaler's unscale path), ImageNet with --amp bf16 --channels-last
and the real JPEG augmentation in 2 loader workers (each image's crop is seeded by seed, epoch and
index). --compile is the harness's one `maybe_compile` for every experiment: it runs with the
cheapest model to compile (a cold inductor cache costs about 35 s of CPU for the tiny transformer,
50 s for the continual CNN, 84 s for ResNet-18).

A segment stopped by a signal runs through tests/paused_train.py, which holds the loop at a
known step until the test has sent the signal from outside. Not here: ResNet-18 (CIFAR-10,
ImageNet) with --compile (84 s for one 4-step CIFAR-10 process on this 2-core CPU) or --amp fp16
(284 s: CPU fp16 convolutions); on a GPU a bit-exact twin would also need deterministic cuDNN
algorithms, which the experiments do not ask for (ImageNet sets cudnn.benchmark).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checks import assert_same, child_env
from cifar_fixtures import write_fake_cifar10, write_fake_cifar100
from test_imagenet import write_image_folder
from test_tinystories import VOCAB, sha256, write_archive
from wandb_records import assert_wandb_matches_metrics

REPO = Path(__file__).resolve().parents[1]
PAUSED = REPO / "tests" / "paused_train.py"
TIMING = ("time", "images_per_s", "tokens_per_s", "window_time")  # wall-clock measurements: differ between any two runs


def start(script, argv, log, pause_at=None):
    """train.py in a process of its own (through paused_train.py when it is to pause at a step)."""
    prefix = [sys.executable] + ([str(PAUSED), str(pause_at)] if pause_at is not None else [])
    return subprocess.Popen([*prefix, str(script), *map(str, argv)], stdout=subprocess.PIPE, text=True,
                            stderr=open(log, "w"), env=child_env(WANDB_SILENT="true"), cwd=REPO)  # noqa: SIM115 (the child holds it)


def finish(proc, log, timeout=600):
    stdout, _ = proc.communicate(timeout=timeout)
    stderr = Path(log).read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-4000:]}"
    assert "Traceback" not in stderr, stderr[-4000:]
    return stdout, stderr


def signalled(script, argv, log, pause_at, sig):
    """A segment that reaches step `pause_at`, gets `sig` from this process, saves and exits 0."""
    proc = start(script, argv, log, pause_at)
    for line in proc.stdout:
        if line.startswith("paused at step"):
            break
    else:
        proc.wait(timeout=60)
        raise AssertionError(f"never paused (exit {proc.returncode}):\n{Path(log).read_text()[-4000:]}")
    proc.send_signal(sig)
    return finish(proc, log)


def checkpoint(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def strip(value):
    """`value` without the wall-clock measurements (nested dicts and lists)."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, (list, tuple)):
        return [strip(v) for v in value]
    return value


def read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def resume_chain(tmp_path, script, argv, sigterm_at, sigusr1_at):
    """The twin (uninterrupted) and the run cut by SIGTERM at `sigterm_at`, then by --max-time 0.001
    (used up by the first check after the resume), then by SIGUSR1 at `sigusr1_at`, then resumed to
    the end. Returns (twin folder, cut folder, the checkpoint step after each stop).

    The twin runs alongside the cut run; with --compile it runs first, so that only it compiles and
    the four processes of the cut run load its kernels from inductor's cache."""
    out = tmp_path / "out"
    twin = start(script, [*argv, "--save-directory", out, "--run-name", "twin"], tmp_path / "twin.log")
    if "--compile" in argv:
        finish(twin, tmp_path / "twin.log")
    cut = [*argv, "--save-directory", out, "--run-name", "cut"]
    steps = []
    _, err = signalled(script, cut, tmp_path / "1.log", sigterm_at, signal.SIGTERM)
    assert "stopped (SIGTERM)" in err and not (out / "cut" / "summary.json").exists(), err[-2000:]
    steps.append(checkpoint(out / "cut")["step"])
    assert steps[-1] == sigterm_at
    _, err = finish(start(script, [*cut, "--resume", "--max-time", "0.001"], tmp_path / "2.log"), tmp_path / "2.log")
    assert "stopped (--max-time 0.001)" in err and not (out / "cut" / "summary.json").exists(), err[-2000:]
    steps.append(checkpoint(out / "cut")["step"])
    assert steps[-1] == sigterm_at + 1  # its first step after the resume
    _, err = signalled(script, [*cut, "--resume"], tmp_path / "3.log", sigusr1_at, signal.SIGUSR1)
    assert "stopped (SIGUSR1)" in err and not (out / "cut" / "summary.json").exists(), err[-2000:]
    steps.append(checkpoint(out / "cut")["step"])
    assert steps[-1] == sigusr1_at
    finish(start(script, [*cut, "--resume"], tmp_path / "4.log"), tmp_path / "4.log")
    finish(twin, tmp_path / "twin.log")
    assert_same_run(out / "twin", out / "cut")
    return out / "twin", out / "cut", steps


def assert_same_run(twin, cut):
    a, b = checkpoint(twin), checkpoint(cut)
    ha, hb = a.pop("harness"), b.pop("harness")
    assert_same(strip(a), strip(b), "checkpoint")  # model, optimizer, scheduler, scaler, loop state
    for key in ("rng_torch", "rng_numpy", "rng_python"):  # every random draw of the twin, and no other
        assert_same(ha[key], hb[key], key)
    assert strip(read_jsonl(twin / "metrics.jsonl")) == strip(read_jsonl(cut / "metrics.jsonl"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (twin, cut))
    assert sa["finished"] is sb["finished"] is True
    assert strip({k: v for k, v in sa.items() if k != "wall_time"}) == \
        strip({k: v for k, v in sb.items() if k != "wall_time"})
    return a


# ---- CIFAR-10 --------------------------------------------------------------------------------


@pytest.mark.slow
def test_cifar10_augment_bf16_wandb(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", n_train=20, n_test=10)  # 4 batches of 5: 8 steps in 2 epochs
    argv = ["--data-dir", data, "--batch-size", 5, "--eval-batch-size", 10, "--num-epochs", 2, "--device", "cpu",
            "--log-every", 1, "--augment", "--amp", "bf16", "--stepsize-groups", "resnet18_blocks", "--wandb",
            "--wandb-project", "test"]
    # SIGUSR1 after the last batch of epoch 1: stopped before that epoch's evaluation, which the
    # resumed process runs first
    twin, cut, steps = resume_chain(tmp_path, REPO / "cifar10" / "train.py", argv, sigterm_at=2, sigusr1_at=4)
    state = checkpoint(cut)
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 8) and state["scaler"] is not None
    assert state["optimizer"]["meta"]["beta"].numel() == 6
    assert not torch.equal(state["optimizer"]["meta"]["beta"], torch.full((6,), float(torch.tensor(1e-6).log())))
    # wandb offline: the twin's one run and the cut run's four processes hold every metric line
    for run_dir, runs in ((twin, 1), (cut, 4)):
        rows, summary = assert_wandb_matches_metrics(run_dir, runs)
        assert [r["step"] for r in rows if "step_size/block_5" in r] == list(range(1, 9))
        assert summary["best/test/acc"] == json.loads((run_dir / "summary.json").read_text())["best"]["test/acc"]


# ---- continual CIFAR-100 ---------------------------------------------------------------------


@pytest.mark.slow
def test_continual_fp16(tmp_path):
    data = write_fake_cifar100(tmp_path / "data", n_train=400, n_test=200)
    # 2 tasks of 2 classes, 8 images each at batch 1: 16 steps; the harness's fp16 scaler
    argv = ["--data-dir", data, "--device", "cpu", "--classes-per-task", 2, "--num-tasks", 2, "--acc-every", 4,
            "--log-every", 3, "--eval-batch-size", 3, "--stepsize-groups", "last_layer_and_others", "--amp", "fp16"]
    # SIGUSR1 at step 8, the end of task 1: the loop asks after that task's evaluation
    _, cut, _ = resume_chain(tmp_path, REPO / "continual_cifar100" / "train.py", argv, sigterm_at=3, sigusr1_at=8)
    state = checkpoint(cut)
    assert state["step"] == 16 and len(state["history"]) == 2
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]


# ---- TinyStories -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tinystories_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tinystories")
    archive = write_archive(folder / "src")
    data = folder / "data"
    prepare = REPO / "tinystories" / "prepare.py"
    for args in (["download", "--url", archive.as_uri(), "--sha256", sha256(archive), "--size", archive.stat().st_size],
                 ["train_vocab", "--vocab-size", VOCAB], ["pretokenize", "--vocab-size", VOCAB, "--workers", 1]):
        subprocess.run([sys.executable, str(prepare), *map(str, args), "--data-dir", str(data)], check=True,
                       capture_output=True, env=child_env(), timeout=300)
    return data


@pytest.mark.slow
def test_tinystories_compile_float16_grad_clip(tmp_path, tinystories_data):
    argv = ["--data-dir", tinystories_data, "--vocab-size", VOCAB, "--dim", 32, "--n-layers", 2, "--n-heads", 2,
            "--n-kv-heads", 2, "--seq-len", 32, "--batch-size", 4, "--grad-accum", 2, "--device", "cpu",
            "--log-every", 5, "--alpha0", "1e-3", "--max-iters", 10, "--eval-every", 4, "--eval-iters", 2,
            "--compile", "--dtype", "float16", "--grad-clip", 0.5, "--stepsize-groups", "layerwise"]
    # every stop inside a --log-every window (2, 3 and 7 of the windows 1-5, 6-10): its mean loss is
    # in the checkpoint
    _, cut, _ = resume_chain(tmp_path, REPO / "tinystories" / "train.py", argv, sigterm_at=2, sigusr1_at=7)
    state = checkpoint(cut)
    assert state["step"] == 10 and state["scaler"] is not None and state["best"]
    assert [r["step"] for r in read_jsonl(cut / "metrics.jsonl") if "train/loss" in r] == [4, 5, 8, 10, 10]


# ---- ImageNet --------------------------------------------------------------------------------


@pytest.mark.slow
def test_imagenet_bf16_channels_last_jpeg_augmentation(tmp_path):
    folder = write_image_folder(tmp_path / "images")  # 24 training JPEGs: 3 steps of 8 per epoch
    argv = ["--data-dir", folder, "--image-size", 32, "--batch-size", 8, "--workers", 2, "--device", "cpu",
            "--log-every", 2, "--epochs", 2, "--amp", "bf16", "--channels-last", "--stepsize-groups",
            "resnet18_blocks"]
    # the stops at steps 1, 2 (--max-time) and 5 fall inside the --log-every 2 windows (1-2; 5-6 of epoch 2)
    _, cut, _ = resume_chain(tmp_path, REPO / "imagenet" / "train.py", argv, sigterm_at=1, sigusr1_at=5)
    state = checkpoint(cut)
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 6)

