"""Continual CIFAR-100 experiment (issue 6): task split, label remapping, the augmented stream,
accumulated accuracy, short runs of both optimizers, resume, --seeds, bad input.

Runs continual_cifar100/train.py on a generated CIFAR-100 in the real `cifar-100-python` layout
(4 training and 2 test images per class), on the CPU: in-process through `main(argv)` where
possible (fast), as a subprocess for exit codes and the wandb (offline) run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cifar_fixtures import write_fake_cifar100
from wandb_records import assert_wandb_matches_metrics

from common import harness
from common.data import split_classes

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "continual_cifar100" / "train.py"
TIMING_KEYS = ("time", "images_per_s")


def load_train_module():
    spec = importlib.util.spec_from_file_location("continual_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ct = load_train_module()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar100"), n_train=400, n_test=200)


def small(data_dir, out, name, *extra):
    """2 tasks of 2 classes, 8 images each: 16 steps."""
    return ["--data-dir", str(data_dir), "--save-directory", str(out), "--run-name", name, "--device", "cpu",
            "--classes-per-task", "2", "--num-tasks", "2", "--acc-every", "4", "--log-every", "3",
            "--eval-batch-size", "3", *map(str, extra)]


def read_metrics(run_dir: Path, drop_timing=False) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if drop_timing:
        rows = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    return rows


def run_cli(*args, check=True):
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("HARNESS_TRACEBACK", None)
    proc = subprocess.run([sys.executable, str(TRAIN), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


def test_defaults_are_the_papers_continual_run():
    args = ct.parse_args([])
    assert (args.optimizer, args.alg_base, args.alg_meta, args.stepsize_groups) == ("HF", "AdamW", "Adam", "scalar")
    assert (args.alpha0, args.gamma, args.meta_stepsize) == (1e-4, 0.999, 1e-3)
    assert (args.weight_decay_base, args.momentum_param_base, args.normalizer_param_base) == (0.1, 0.9, 0.999)
    assert (args.momentum_param_meta, args.normalizer_param_meta) == (0.9, 0.999)
    assert (args.classes_per_task, args.epochs_per_task, args.batch_size, args.model) == (10, 1, 1, "cnn")
    assert (args.num_tasks, args.seeds, args.log_every, args.acc_every) == (None, None, 200, 200)
    assert ct.parse_args(["--seeds", "0,1,2,3,4"]).seeds == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("per_task", [10, 20])
def test_task_split_covers_each_class_once_and_follows_the_seed(per_task):
    tasks = ct.task_split(100, per_task, seed=3)
    assert len(tasks) == 100 // per_task and all(len(t) == per_task for t in tasks)
    assert sorted(c for t in tasks for c in t) == list(range(100))
    assert tasks == ct.task_split(100, per_task, seed=3) == split_classes(100, per_task, 3)
    assert tasks != ct.task_split(100, per_task, seed=4)
    assert ct.task_split(100, per_task, seed=3, num_tasks=2) == tasks[:2]


def test_labels_are_remapped_to_0_k_minus_1_per_task():
    y = torch.tensor([5, 7, 2, 5, 9, 7, 0])
    x = torch.arange(len(y), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    classes = [7, 5, 9]
    assert ct.remap_labels(y, classes, 10).tolist() == [1, 0, -1, 1, 2, 0, -1]
    xt, yt = ct.task_subset(x, y, classes, 10)
    assert yt.tolist() == [1, 0, 1, 2, 0]  # dataset order kept, class classes[j] -> j
    assert xt[:, 0, 0, 0].tolist() == [0, 1, 3, 4, 5]  # the images of the task's classes only


def test_epoch_stream_is_shuffled_augmented_and_follows_seed_and_key():
    n = 64
    y = torch.arange(n) % 4
    x = (y + 1).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()  # image colour = label + 1
    xs, ys = ct.epoch_stream(x, y, seed=0, key=0)
    assert xs.dtype == torch.float32 and xs.shape == x.shape and float(xs.max()) <= 1.0  # no normalisation
    assert sorted(ys.tolist()) == sorted(y.tolist()) and ys.tolist() != y.tolist()
    for img, label in zip(xs, ys):  # labels follow their images; padding shows as zeros at the borders
        values = set(torch.unique(img * 255).round().long().tolist())
        assert values <= {0, int(label) + 1} and int(label) + 1 in values
    assert bool((xs == 0).any())  # some crops were shifted
    again = ct.epoch_stream(x, y, seed=0, key=0)
    assert torch.equal(xs, again[0]) and torch.equal(ys, again[1])
    assert not torch.equal(ys, ct.epoch_stream(x, y, seed=0, key=1)[1])
    assert not torch.equal(ys, ct.epoch_stream(x, y, seed=1, key=0)[1])


def test_train_step_counts_predictions_made_before_each_update():
    args = ct.parse_args(["--device", "cpu", "--alpha0", "1e-2"])
    torch.manual_seed(0)
    model = ct.MODELS["cnn"](num_classes=3)
    optimizer = ct.build_optimizer(model, args)
    scaler = ct.harness.grad_scaler(args, "cpu")
    hits = torch.zeros(2, dtype=torch.int64)
    loss_sum = torch.zeros(())
    xs, ys = torch.rand(12, 3, 32, 32), torch.arange(12) % 3
    expected_hits, expected_loss = 0, 0.0
    for i in range(12):
        with torch.no_grad():
            out = model(xs[i:i + 1])
        expected_hits += int(out.argmax(1) == ys[i])
        expected_loss += float(torch.nn.functional.cross_entropy(out, ys[i:i + 1]))
        ct.train_step(model, optimizer, scaler, xs[i:i + 1], ys[i:i + 1], hits, loss_sum, args)
    assert hits.tolist() == [expected_hits, expected_hits]
    assert math.isclose(float(loss_sum), expected_loss, rel_tol=1e-5)
    assert ct.accuracy(3, 4) == 75.0 and math.isnan(ct.accuracy(0, 0))


def test_seeds_summary_mean_and_std():
    s = ct.seeds_summary({0: {"online/acc": 50.0, "task/test_acc_mean": 40.0, "steps": 10},
                          1: {"online/acc": 70.0, "task/test_acc_mean": 60.0, "steps": 10}})
    assert s["seeds"] == [0, 1] and s["mean"]["online/acc"] == 60.0 and s["mean"]["steps"] == 10
    assert math.isclose(s["std"]["online/acc"], math.sqrt(200)) and s["std"]["steps"] == 0.0
    assert ct.seeds_summary({3: {"online/acc": 5.0}})["std"]["online/acc"] == 0.0
    s = ct.seeds_summary({0: {"online/acc": 50.0}}, {1: "diverged at step 7: train/loss is nan"})
    assert s["seeds"] == [0] and s["mean"]["online/acc"] == 50.0 and s["diverged"] == {"1": "diverged at step 7: "
                                                                                       "train/loss is nan"}
    assert ct.seeds_summary({}, {0: "x"})["mean"] == {}  # every seed diverged: nothing averaged


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def check_run(run_dir: Path, blocks: int, steps: int = 16, steps_per_task: int = 8):
    rows = read_metrics(run_dir)
    assert all(isinstance(r["step"], int) and isinstance(r["time"], float) for r in rows)
    online = [r for r in rows if "online/acc" in r and "task/test_acc" not in r]
    assert [r["step"] for r in online] == list(range(4, steps + 1, 4))
    assert all("train/loss" in r and "images_per_s" in r and r["task"] == (r["step"] - 1) // steps_per_task
               for r in online)
    sizes = [r for r in rows if "step_size/block_0" in r]
    assert [r["step"] for r in sizes] == list(range(3, steps + 1, 3))
    assert all(f"step_size/block_{blocks - 1}" in r and f"step_size/block_{blocks}" not in r for r in sizes)
    ends = [r for r in rows if "task/test_acc" in r]
    assert [(r["step"], r["task"]) for r in ends] == [(steps_per_task * (t + 1), t) for t in range(len(ends))]
    for r in ends:
        assert 0 <= r["task/train_acc"] <= 100 and 0 <= r["task/test_acc"] <= 100
    # online accuracy is accumulated over every step since the first, across task switches
    train_accs = [r["task/train_acc"] for r in ends]
    assert math.isclose(ends[-1]["online/acc"], sum(train_accs) / len(train_accs), rel_tol=1e-9)
    assert math.isclose(ends[0]["online/acc"], train_accs[0])
    for r in online:  # a whole number of correct predictions over every image seen so far
        assert abs(r["online/acc"] * r["step"] / 100 - round(r["online/acc"] * r["step"] / 100)) < 1e-6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True
    final = summary["final"]
    assert final["steps"] == steps and final["tasks"] == len(ends)
    assert math.isclose(final["online/acc"], ends[-1]["online/acc"])
    assert math.isclose(final["task/test_acc_mean"], sum(r["task/test_acc"] for r in ends) / len(ends))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["experiment"] == "continual_cifar100"
    return rows, sizes


def test_short_run_fixed_adamw_logs_every_metric(data_dir, tmp_path, capsys):
    assert ct.main(small(data_dir, tmp_path, "fixed", "--alg-meta", "fixed")) == 0
    _, sizes = check_run(tmp_path / "fixed", blocks=1)
    assert all(r["step_size/block_0"] == pytest.approx(1e-4, rel=1e-6) for r in sizes)  # a fixed step
    out = capsys.readouterr().out
    assert "average online accuracy" in out and "average end-of-task test accuracy" in out


def test_short_run_metaoptimize_blockwise_logs_every_metric_with_wandb(data_dir, tmp_path):
    proc = run_cli(*small(data_dir, tmp_path, "blocks", "--stepsize-groups", "last_layer_and_others", "--wandb"))
    assert "average online accuracy" in proc.stdout and "average end-of-task test accuracy" in proc.stdout
    _, sizes = check_run(tmp_path / "blocks", blocks=2)
    # tuned online: alpha0 1e-4 in float32 reads 1.0000000000000e-4 to ~3e-9 relative; (AdamW, Adam) with eta
    # 1e-3 moved the blocks to 0.9908e-4 and 0.9840e-4 by step 15 (|log ratio| 0.0093 and 0.0161, measured)
    for block in ("step_size/block_0", "step_size/block_1"):
        assert abs(math.log(sizes[-1][block] / 1e-4)) > 2e-3, sizes[-1]
    config = json.loads((tmp_path / "blocks" / "config.json").read_text())
    assert (config["alg_base"], config["alg_meta"], config["gamma"]) == ("AdamW", "Adam", 0.999)
    assert_wandb_matches_metrics(tmp_path / "blocks", runs=1)  # every line, value by value, and the summary


def test_resume_equals_uninterrupted(data_dir, tmp_path):
    flags = ("--epochs-per-task", "2", "--batch-size", "3", "--stepsize-groups", "last_layer_and_others")
    assert ct.main(small(data_dir, tmp_path, "straight", *flags)) == 0
    # stop mid-epoch (step 2), then at the first task's last step (evaluated before stopping), then finish
    assert ct.main(small(data_dir, tmp_path, "cut", *flags, "--stop-at-step", 2)) == 0
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert ct.main(small(data_dir, tmp_path, "cut", *flags, "--stop-at-step", 6, "--resume")) == 0
    assert ct.main(small(data_dir, tmp_path, "cut", *flags, "--resume")) == 0
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert read_metrics(straight, drop_timing=True) == read_metrics(cut, drop_timing=True)
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["optimizer"]["meta"]["beta"], b["optimizer"]["meta"]["beta"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, cut))
    assert sa["final"] == sb["final"] and sa["tasks"] == sb["tasks"]


def test_max_time_stops_with_a_checkpoint_and_resumes(data_dir, tmp_path, capsys):
    # --max-time counts from the harness import (process start), long past in-process: stops at step 1
    assert ct.main(small(data_dir, tmp_path, "timed", "--max-time", "0.001")) == 0
    assert "stopped (--max-time" in capsys.readouterr().err
    assert not (tmp_path / "timed" / "summary.json").exists()
    assert (tmp_path / "timed" / "checkpoint.pt").exists()
    assert ct.main(small(data_dir, tmp_path, "timed", "--resume")) == 0
    assert ct.main(small(data_dir, tmp_path, "straight")) == 0
    assert read_metrics(tmp_path / "timed", drop_timing=True) == read_metrics(tmp_path / "straight", drop_timing=True)


def test_seeds_runs_each_seed_and_writes_mean_and_std(data_dir, tmp_path):
    args = small(data_dir, tmp_path, "five", "--seeds", "0,1", "--num-tasks", "1")
    assert ct.main(args) == 0
    finals = {}
    for seed in (0, 1):
        run_dir = tmp_path / "five" / f"seed{seed}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert json.loads((run_dir / "config.json").read_text())["seed"] == seed
        assert summary["task_classes"] == split_classes(100, 2, seed)[:1]
        finals[seed] = summary["final"]
    s = json.loads((tmp_path / "five" / "seeds_summary.json").read_text())
    assert s["seeds"] == [0, 1] and s["per_seed"] == {str(k): v for k, v in finals.items()}
    values = [finals[k]["online/acc"] for k in (0, 1)]
    assert math.isclose(s["mean"]["online/acc"], sum(values) / 2)
    assert math.isclose(s["std"]["online/acc"], abs(values[0] - values[1]) / math.sqrt(2))
    assert "task/test_acc_mean" in s["mean"] and "task/test_acc_mean" in s["std"]
    # finished seeds are skipped on --resume; the summary is written again
    (tmp_path / "five" / "seeds_summary.json").unlink()
    assert ct.main([*args, "--resume"]) == 0
    assert json.loads((tmp_path / "five" / "seeds_summary.json").read_text()) == s


def test_diverging_seeds_are_reported_not_averaged(data_dir, tmp_path, capsys):
    # the report: a huge SGD meta step gives nan step sizes from step 6 (seed 0), 12 (seed 1)
    args = small(data_dir, tmp_path, "nan", "--seeds", "0,1", "--alg-meta", "SGD", "--meta-stepsize", "1e3")
    assert ct.main(args) == harness.EXIT_DIVERGED
    s = json.loads((tmp_path / "nan" / "seeds_summary.json").read_text())
    assert s["seeds"] == [] and s["mean"] == {} and sorted(s["diverged"]) == ["0", "1"]
    # a non-finite z skips the meta update (step sizes stay finite): the weights show it
    assert "diverged at step 6: a weight is not finite" in s["diverged"]["0"]
    seed1 = json.loads((tmp_path / "nan" / "seed1" / "summary.json").read_text())
    assert (seed1["diverged"], seed1["finished"], seed1["diverged_at_step"], seed1["checkpoint_step"]) == \
        (True, False, 12, 8)  # the end of task 1 was the last finite state
    assert torch.load(tmp_path / "nan" / "seed1" / "checkpoint.pt", weights_only=True)["step"] == 8
    assert "every seed diverged" in capsys.readouterr().out
    assert ct.main([*args, "--resume"]) == harness.EXIT_DIVERGED  # said again, nothing retrained
    assert json.loads((tmp_path / "nan" / "seed1" / "summary.json").read_text()) == seed1


@pytest.mark.parametrize("flags, needle", [
    (["--classes-per-task", "7"], "--classes-per-task"),
    (["--num-tasks", "11"], "--num-tasks"),
    (["--seeds", "0,a"], "--seeds"),
    (["--model", "resnet"], "--model"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_flags_are_one_error_line(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        ct.parse_args(flags)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


def test_bad_optimizer_flag_exits_2_with_one_line_and_writes_nothing(data_dir, tmp_path):
    proc = run_cli("--data-dir", data_dir, "--save-directory", tmp_path, "--device", "cpu",
                   "--stepsize-groups", "bogus", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "--stepsize-groups" in lines[0] and "last_layer_and_others" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_bench_continual_runs_and_prints_the_ratio():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_continual.py"), "--steps", "4", "--chunk",
                           "2", "--images", "50", "--device", "cpu", "--full-steps", "100"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ratio MetaOptimize / fixed:" in proc.stdout and "projected 100-step run" in proc.stdout
