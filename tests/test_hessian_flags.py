"""--hessian on the experiments (issue 15): cifar10/train.py and continual_cifar100/train.py train with
the Hessian-vector-product trace on generated data and resume bit for bit; the settings that cannot
keep the gradient's graph (--amp fp16, --compile, DDP, another --optimizer) are one error line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_fixtures import write_fake_cifar10, write_fake_cifar100  # noqa: E402
from script_modules import load_train  # noqa: E402

from common import harness  # noqa: E402
from common.optim_flags import add_optimizer_args, build_optimizer, check_optimizer_args, needs_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def read_metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_checkpoints(a: Path, b: Path) -> None:
    x, y = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    for k in x["model"]:
        assert torch.equal(x["model"][k], y["model"][k]), k
    assert torch.equal(x["optimizer"]["meta"]["beta"], y["optimizer"]["meta"]["beta"])
    for i, state in x["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(y["optimizer"]["state"][i][key])), (i, key)


@pytest.mark.slow
def test_cifar10_trains_with_the_hessian_trace_and_resumes_bit_for_bit(tmp_path):
    """ResNet-18, 2 steps of 10 images: hvp moves the step size otherwise than the Hessian-free trace,
    and a run stopped after step 1 and resumed ends where an uninterrupted one does."""
    train = load_train("cifar10", "cifar10_train_hessian")
    data = write_fake_cifar10(tmp_path / "data", n_train=20, n_test=10)
    common = ["--data-dir", str(data), "--save-directory", str(tmp_path / "out"), "--batch-size", "10",
              "--eval-batch-size", "10", "--num-epochs", "1", "--device", "cpu", "--log-every", "1",
              "--alg-base", "SGD", "--alg-meta", "SGD", "--alpha0", "0.05", "--meta-stepsize", "10"]
    assert train.main([*common, "--hessian", "hvp", "--run-name", "full"]) == 0
    assert train.main([*common, "--hessian", "hvp", "--run-name", "part", "--stop-at-step", "1"]) == 0
    assert not (tmp_path / "out" / "part" / "summary.json").exists()
    assert train.main([*common, "--hessian", "hvp", "--run-name", "part", "--resume"]) == 0
    assert read_metrics(tmp_path / "out" / "full") == read_metrics(tmp_path / "out" / "part")
    same_checkpoints(tmp_path / "out" / "full", tmp_path / "out" / "part")
    assert json.loads((tmp_path / "out" / "full" / "config.json").read_text())["hessian"] == "hvp"
    assert train.main([*common, "--run-name", "free"]) == 0
    hvp, free = (read_metrics(tmp_path / "out" / r)[1]["step_size/block_0"] for r in ("full", "free"))
    assert hvp != free  # the step after the first: z = h . g with h from a Hessian term or without


def test_continual_trains_with_the_hessian_trace_and_resumes_bit_for_bit(tmp_path):
    train = load_train("continual_cifar100", "continual_train_hessian")
    data = write_fake_cifar100(tmp_path / "data", n_train=400, n_test=200)
    common = ["--data-dir", str(data), "--save-directory", str(tmp_path / "out"), "--device", "cpu",
              "--classes-per-task", "2", "--num-tasks", "2", "--acc-every", "4", "--log-every", "3",
              "--eval-batch-size", "3", "--hessian", "hvp", "--stepsize-groups", "last_layer_and_others"]
    assert train.main([*common, "--run-name", "straight"]) == 0
    assert train.main([*common, "--run-name", "cut", "--stop-at-step", "5"]) == 0
    assert train.main([*common, "--run-name", "cut", "--resume"]) == 0
    assert read_metrics(tmp_path / "out" / "straight") == read_metrics(tmp_path / "out" / "cut")
    same_checkpoints(tmp_path / "out" / "straight", tmp_path / "out" / "cut")
    sizes = [r for r in read_metrics(tmp_path / "out" / "straight") if "step_size/block_0" in r]
    assert sizes[-1]["step_size/block_0"] != 1e-4  # tuned online


def parsed(*argv):
    parser = add_optimizer_args(argparse.ArgumentParser())
    parser.add_argument("--amp", default="none")
    parser.add_argument("--compile", action="store_true")
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv, needle", [
    (["--hessian", "hvp", "--amp", "fp16"], "--hessian hvp does not work with --amp fp16"),
    (["--hessian", "hvp", "--compile"], "--hessian hvp does not work with --compile"),
    (["--hessian", "hvp", "--optimizer", "AdamW"], "--hessian hvp: a trace option of MetaOptimize"),
    (["--hessian", "hvp", "--alg-meta", "fixed"], "--hessian: a fixed step size keeps no trace"),
    (["--hessian", "block_diagonal", "--stepsize-groups", "nodewise"], "not available for nodewise"),
])
def test_settings_that_cannot_keep_the_graph_are_refused_before_the_run(argv, needle):
    with pytest.raises(ValueError) as info:
        harness.check_args(parsed(*argv))
        build_optimizer([torch.nn.Parameter(torch.zeros(3, 2))], parsed(*argv))  # nodewise: at the model
    assert needle in str(info.value)


def test_the_flag_builds_the_trace_and_the_harness_keeps_the_graph():
    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(model, parsed("--hessian", "hvp", "--alg-base", "SGD"))
    assert opt.hessian == "hvp" and needs_graph(opt)
    assert not needs_graph(build_optimizer(model, parsed()))
    check_optimizer_args(parsed("--hessian", "hvp", "--amp", "bf16"))  # bf16 autocast: no scaler, allowed
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    harness.backward_and_step(model(torch.randn(4, 3)).pow(2).mean(), opt, scaler)  # create_graph inside
    assert all(p.grad is None for p in model.parameters())  # the graph is let go after the step
    assert opt.state[model.weight]["trace"].abs().sum() > 0


def test_ddp_is_refused_with_the_hessian_trace(monkeypatch):
    monkeypatch.setitem(harness._DIST, "world_size", 2)
    with pytest.raises(harness.UsageError, match="--hessian hvp does not work with DDP"):
        harness.distribute(torch.nn.Linear(2, 1), "cpu", argparse.Namespace(hessian="hvp"))


def test_bad_combination_is_one_error_line_from_the_command_line(tmp_path, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HARNESS_TRACEBACK", None)
    proc = subprocess.run([sys.executable, str(ROOT / "cifar10" / "train.py"), "--hessian", "hvp", "--amp", "fp16",
                           "--save-directory", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --hessian hvp does not work with --amp fp16")
    assert len(proc.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        load_train("continual_cifar100", "continual_train_hessian").parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--hessian {none,hvp,block_diagonal}" in help_text and "second backward" in " ".join(help_text.split())
