"""The benchmark scripts without a test elsewhere, each in a quick mode on the CPU: they run to the
end and print (or write) every part of their output. Ratios are measurements, never asserted.

Elsewhere: bench_overhead.py (tests/test_bench_overhead.py), bench_baselines.py
(tests/test_benchmark.py), bench_continual.py (tests/test_continual.py), bench_tinystories.py
(tests/test_tinystories.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9][0-9,]*\.?[0-9]*)"


def bench(name, *args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stdout


def row(stdout, label):
    """The numbers on the line that starts with `label` (after its leading spaces)."""
    lines = [line for line in stdout.splitlines() if line.strip().startswith(label)]
    assert lines, (label, stdout)
    return [float(x.replace(",", "")) for x in re.findall(NUMBER, lines[0][lines[0].index(label) + len(label):])]


@pytest.mark.slow
def test_bench_optimizer_quick(tmp_path):
    out = bench("bench_optimizer.py", "--quick", "--rounds", 1, "--sets", "resnet18", "--inner", 3, "--threads", 1)
    assert "== optimizer.step() on the resnet18 parameter set: 62 tensors, 11,173,962 weights" in out
    # min ms, median, x fused, x foreach, state floats per weight (by construction: the README's counts)
    floats = {"torch AdamW fused": 2.0, "torch AdamW foreach": 2.0, "AdamW+Lion scalar": 3.0, "Lion+Lion scalar": 2.0,
              "AdamW+Adam scalar": 3.0, "AdamW+Lion resnet18_blocks": 3.0, "AdamW+Lion scalar, bf16 state": 1.5,
              "AdamW+Lion scalar, foreach": 3.0}
    for label, state in floats.items():
        low, median, x_fused, x_foreach, per_weight = row(out, label + " ")
        assert 0 < low <= median and x_fused > 0 and x_foreach > 0 and per_weight == state, label
    assert row(out, "torch AdamW fused ")[2] == 1.0 and row(out, "torch AdamW foreach ")[3] == 1.0
    # the memory floors the ratios are read against: pure passes over 7, 13 and 15 streams
    for label in ("floor 4R/3W (AdamW's w g m v)", "floor 7R/6W (weightwise Lion)", "floor 8R/7W (weightwise Adam)"):
        low, _, x_fused, _, per_weight = row(out, label + " ")
        assert low > 0 and x_fused > 0 and per_weight == 0.0, label
    for label in ("fused, empty kernel cache", "fused, cached kernel", "foreach"):
        first, second = row(out, "resnet18, weightwise, " + label + " ")
        assert first > 0 and second > 0, label
    assert "batch-size-1 training step (fwd + bwd + step) of the continual CNN" in out
    for label in ("AdamW+fixed", "AdamW+Adam scalar", "AdamW+Adam last_layer_and_others"):
        assert all(v > 0 for v in row(out, label + " ")), label


@pytest.mark.slow
def test_bench_optimizer_around_prints_the_ratio_and_its_floor():
    out = bench("bench_optimizer.py", "--around", "--skip-steps", "--skip-loop", "--skip-first-step", "--rounds", 1,
                "--sets", "resnet18", "--threads", 1)
    assert "== MetaOptimize.around(AdamW fused).step() on the resnet18 parameter set, cpu, 1 threads ==" in out
    for label, extra in (("around(AdamW fused) Adam, impl=fused", 2.0), ("around(AdamW fused) fixed, impl=fused", 1.0),
                         ("floor: AdamW + w0 copy + 4R/2W", 0.0)):
        low, median, x_fused, _, per_weight = row(out, label + " ")
        assert 0 < low <= median and x_fused > 0 and per_weight == extra, label


def test_bench_train_quick():
    out = bench("bench_train.py", "--device", "cpu", "--steps", 1, "--warmup", 1, "--repeats", 1, "--step-repeats", 1,
                "--batch-size", 2)
    for label in ("MetaOptimize (AdamW, Lion) ", "torch AdamW "):
        assert row(out, label)[0] > 0, label
    assert re.search(r"ratio MetaOptimize / AdamW: [0-9.]+ \(median of the 1 paired repetitions", out), out
    assert re.search(r"optimizer step alone: MetaOptimize \(AdamW, Lion\) [0-9.]+ ms, torch AdamW [0-9.]+ ms", out)
    assert re.search(r"projected 60-epoch CIFAR-10 run with MetaOptimize: [0-9.]+ h", out), out


@pytest.mark.slow
def test_bench_imagenet_quick_with_a_jpeg_folder(tmp_path):
    folder = tmp_path / "jpegs"
    assert "wrote 10 JPEGs under" in bench("bench_imagenet.py", "--make-folder", folder, "--classes", 2,
                                           "--per-class", 4)
    assert len(list((folder / "train").rglob("*.JPEG"))) == 8 and len(list((folder / "val").rglob("*.JPEG"))) == 2
    result = tmp_path / "result.json"
    out = bench("bench_imagenet.py", "--device", "cpu", "--batch-size", 2, "--image-size", 32, "--steps", 2, "--reps",
                1, "--warmup", 1, "--optimizers", "adamw,adamw-lion", "--data-dir", folder, "--workers", 0,
                "--json", result)
    data = json.loads(result.read_text())
    names = ["torch AdamW (cosine)", "MetaOptimize (AdamW, Lion)"]
    assert list(data["images_per_s"]) == names and all(v > 0 for v in data["images_per_s"].values())
    assert list(data["ratio"]) == names[1:] and data["ratio"][names[1]] > 0
    assert [len(v) for v in data["all"].values()] == [1, 1]
    assert data["loader_images_per_s"] > 0 and data["real_data_images_per_s"] > 0
    assert data["bottleneck"] in ("the data loader", "the model step (cpu)")
    assert f"bottleneck: {data['bottleneck']}" in out and "ratio to torch AdamW" in out
