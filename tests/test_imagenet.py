"""ImageNet experiment (issue 5): data checks, ResNet-18 blocks, one epoch, resume, torchrun.

Runs imagenet/train.py as a subprocess on a tiny generated ImageFolder (6 classes of 40x48
JPEGs, 32 px crops) or on --dummy data, on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from wandb_records import assert_wandb_matches_metrics

from common.optimizers import NAMED_STEPSIZE_GROUPS

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "imagenet" / "train.py"
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 4, 2  # 24 training images: 3 steps of 8
SMALL = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--log-every", "1"]


def load_data_module():
    spec = importlib.util.spec_from_file_location("imagenet_data", ROOT / "imagenet" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_image_folder(root: Path, classes=CLASSES, train=TRAIN_PER_CLASS, val=VAL_PER_CLASS, seed=0) -> Path:
    """root/{train,val}/classK/imgI.JPEG: small JPEGs whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (rng.integers(0, 60, (40, 48, 3)) + c * 35).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", quality=85)
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imagenet") / "tiny")


def env():
    e = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("HARNESS_TRACEBACK", None)
    return e


def train(*args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, str(TRAIN), *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checksums(text: str) -> dict[int, str]:
    return {int(r): c for r, c in re.findall(r"weights-checksum rank=(\d+) (\w+)", text)}


# --------------------------------------------------------------------------------------


def test_resnet18_blocks_match_torchvision_parameter_order():
    names = [n for n, _ in torchvision.models.resnet18().named_parameters()]
    counts = NAMED_STEPSIZE_GROUPS["resnet18_blocks"]
    assert counts == [3, 12, 15, 15, 15, 2] and len(names) == sum(counts) == 62
    prefixes = [("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",), ("fc.",)]
    start = 0
    for count, prefix in zip(counts, prefixes):
        block = names[start:start + count]
        assert all(n.startswith(prefix) for n in block), block
        start += count
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "layer2.0.downsample.0.weight" in names[15:30] and names[-2:] == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("case, expected", [
    ("nothing", "no such directory"),
    ("no_train", "missing train/"),
    ("no_val", "missing val/"),
    ("no_classes", "has no class folders"),
    ("flat_val", "sort them into one folder per class"),
    ("empty_class", "no images in"),
    ("class_mismatch", "class folders differ"),
])
def test_malformed_data_dir_is_one_clear_error(tmp_path, case, expected):
    data = load_data_module()
    root = tmp_path / "data"
    if case != "nothing":
        write_image_folder(root, classes=2, train=1, val=1)
    if case == "no_train":
        shutil.rmtree(root / "train")
    elif case == "no_val":
        shutil.rmtree(root / "val")
    elif case in ("no_classes", "flat_val"):
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
        if case == "flat_val":
            (root / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    elif case == "empty_class":
        (root / "train" / "class9").mkdir()
        (root / "val" / "class9").mkdir()
    elif case == "class_mismatch":
        (root / "val" / "class0").rename(root / "val" / "other")
    with pytest.raises(ValueError, match="--data-dir") as info:
        data.image_folders(str(root), 32)
    assert expected in str(info.value)


def test_wrong_data_dir_exits_with_one_error_line(tmp_path):
    proc = train("--data-dir", tmp_path / "missing", "--save-directory", tmp_path, *SMALL, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --data-dir") and "no such directory" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written for bad input


def test_truncated_jpeg_is_one_error_line_naming_it_and_resumes_once_replaced(tmp_path):
    folder = write_image_folder(tmp_path / "tiny")
    bad = folder / "train" / "class3" / "img2.JPEG"
    good = bad.read_bytes()
    bad.write_bytes(good[:300])  # a download cut short
    args = ["--data-dir", folder, "--save-directory", tmp_path / "out", "--run-name", "r", "--epochs", "1", *SMALL]
    proc = train(*args, "--workers", "2", check=False)  # the error comes from a loader worker process
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: --data-dir: cannot read image {bad} (OSError: ") and \
        lines[0].endswith("; remove or replace it"), lines[0]
    state = torch.load(tmp_path / "out" / "r" / "checkpoint.pt", weights_only=True)  # the steps done are kept
    assert state["epoch"] == 0 and state["batch"] == state["step"] < 3 and "note: checkpoint of step" in proc.stderr
    bad.write_bytes(good)
    train(*args, "--resume")
    assert json.loads((tmp_path / "out" / "r" / "summary.json").read_text())["finished"]


def test_one_epoch_metaoptimize_logs_top1_top5_and_step_sizes(image_folder, tmp_path):
    proc = train("--data-dir", image_folder, "--save-directory", tmp_path, "--run-name", "hf", "--epochs", "1",
                 "--alg-base", "AdamW", "--alg-meta", "Lion", "--alpha0", "1e-6",
                 "--stepsize-groups", "resnet18_blocks", "--channels-last", "--wandb", *SMALL)
    assert "top-5" in proc.stdout and "top-1" in proc.stdout
    rows = read_metrics(tmp_path / "hf")
    steps = [r for r in rows if "step_size/block_0" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(f"step_size/block_{i}" in steps[0] for i in range(6)) and "step_size/block_6" not in steps[0]
    assert all("train/loss" in r and r["images_per_s"] > 0 for r in steps)
    epoch = [r for r in rows if "test/acc" in r]
    assert len(epoch) == 1 and epoch[0]["epoch"] == 1 and epoch[0]["step"] == 3
    assert 0 <= epoch[0]["test/acc"] <= epoch[0]["test/acc5"] <= 100
    summary = json.loads((tmp_path / "hf" / "summary.json").read_text())
    assert summary["finished"] and "test/acc5" in summary["final"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["experiment"] == "imagenet" and config["batch_size"] == 8
    assert_wandb_matches_metrics(tmp_path / "hf", runs=1)  # every line, value by value, and the summary


def test_cosine_adamw_epoch_sigterm_and_resume(image_folder, tmp_path):
    args = ["--data-dir", image_folder, "--save-directory", tmp_path, "--run-name", "cos", "--epochs", "2",
            "--optimizer", "AdamW", "--lr", "1e-3", "--warmup-steps", "2", *SMALL, "--workers", "2"]
    proc = train(*args, "--stop-at-step", "4")  # mid-way through epoch 2
    assert "stopped (SIGTERM) at epoch 2, batch 1/3" in proc.stderr
    assert not (tmp_path / "cos" / "summary.json").exists()
    state = torch.load(tmp_path / "cos" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 1, 4)
    train(*args, "--resume")
    rows = read_metrics(tmp_path / "cos")
    logged = [r["step"] for r in rows if "lr" in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # no step twice, none missing
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(1e-3)  # after warm-up steps 1, 2
    assert lrs[-1] < lrs[2] < lrs[1]  # cosine decay
    assert [r["epoch"] for r in rows if "test/acc5" in r] == [1, 2]
    assert json.loads((tmp_path / "cos" / "summary.json").read_text())["finished"]


@pytest.mark.slow
def test_mid_epoch_resume_gives_the_same_weights(tmp_path):
    args = ["--dummy", "--dummy-size", "32", "--epochs", "2", "--save-directory", tmp_path, "--weights-checksum",
            "--alg-base", "Lion", "--Lion-beta2-base", "0.9", "--momentum-param-base", "0.99", "--alg-meta", "Lion",
            "--stepsize-groups", "resnet18_blocks", *SMALL]
    straight = checksums(train(*args, "--run-name", "a").stdout)
    train(*args, "--run-name", "b", "--stop-at-step", "6")  # 4 steps/epoch: stop in epoch 2
    resumed = checksums(train(*args, "--run-name", "b", "--resume").stdout)
    assert straight and straight == resumed
    assert [r["step"] for r in read_metrics(tmp_path / "b") if "train/loss" in r and "test/acc" not in r] == \
        list(range(1, 9))


@pytest.mark.slow
def test_torchrun_two_ranks_identical_weights(image_folder, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRAIN),
           "--data-dir", str(image_folder), "--save-directory", str(tmp_path), "--run-name", "ddp", "--epochs", "1",
           "--weights-checksum", "--stepsize-groups", "resnet18_blocks", *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sums = checksums(proc.stdout)
    assert set(sums) == {0, 1} and sums[0] == sums[1], proc.stdout + proc.stderr[-3000:]
    assert "2 rank(s) x 4 images" in proc.stderr
    rows = read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows if "step_size/block_0" in r] == [1, 2, 3]  # rank 0 logs, once
    epoch = [r for r in rows if "test/acc" in r]
    assert len(epoch) == 1
    # every val image counted once over the two ranks: accuracies are multiples of 100/12 %
    n = CLASSES * VAL_PER_CLASS
    for key in ("test/acc", "test/acc5"):
        assert epoch[0][key] * n / 100 == pytest.approx(round(epoch[0][key] * n / 100))


def test_an_fp16_overflow_the_scaler_skipped_does_not_end_the_run(tmp_path, monkeypatch):
    """Issue 28 item 6: one step whose loss overflows under --amp fp16 (the GradScaler skips it) leaves its
    batch out of the epoch's sums, so the window averages after it stay finite and the run finishes. Before,
    the epoch's cumulative sums kept the inf and the next log of the window ended the run as diverged."""
    spec = importlib.util.spec_from_file_location("imagenet_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def spiking(out, labels, **kwargs):  # the 2nd training loss overflows (inf or nan gradients: a skipped step)
        calls.append(out.requires_grad)
        loss = torch.nn.functional.cross_entropy(out, labels, **kwargs)
        return loss * float("inf") if calls.count(True) == 2 and out.requires_grad else loss

    monkeypatch.setattr(module, "F", type("F", (), {"cross_entropy": staticmethod(spiking)}))
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["--dummy", "--dummy-size", "32", "--epochs", "1", "--amp", "fp16", "--save-directory", tmp_path,
            "--run-name", "o", "--alg-base", "AdamW", "--alg-meta", "Lion", "--alpha0", "1e-4", *SMALL]
    args[args.index("--log-every") + 1] = "2"  # the overflow falls inside a window, not at its end
    assert module.main([str(a) for a in args]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["finished"] and not summary.get("diverged")
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "o") if "train/loss" in r]
    assert len(losses) == 3 and all(v is not None and np.isfinite(v) for v in losses)  # steps 2, 4 and the epoch
    state = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)
    assert state["scaler"]["scale"] < 65536.0  # the scaler did skip a step (and halved its scale)
