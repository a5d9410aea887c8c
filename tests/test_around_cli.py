"""MetaOptimize around a torch optimizer from the command line (--base-optimizer, --base-args,
--base-args-rest): the flags build the same optimizer as the library, every experiment runs it,
config.json records it, a run resumes bit for bit, and bad input is one `error:` line naming the flag."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checks import assert_same  # noqa: E402
from cifar_fixtures import write_fake_cifar10, write_fake_cifar100  # noqa: E402

from common.optim_flags import add_optimizer_args, build_optimizer  # noqa: E402
from common.optimizers import MetaOptimize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def parse(*argv):
    return add_optimizer_args(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def train(opt, model, steps=4):
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_flags_build_what_the_library_builds():
    model = net()
    opt = build_optimizer(model, parse("--base-optimizer", "nadam", "--base-args", '{"lr": 0.01, "betas": [0.8, 0.9]}',
                                       "--alg-meta", "Adam", "--momentum-param-meta", ".9",
                                       "--normalizer-param-meta", ".999", "--stepsize-groups", "layerwise"))
    twin_model = net()
    twin = MetaOptimize.around(torch.optim.NAdam(twin_model.parameters(), lr=0.01, betas=(0.8, 0.9)),
                               alg_meta="Adam", alpha0=1.0, momentum_param_meta=0.9, normalizer_param_meta=0.999,
                               lion_beta2_meta=0.9, stepsize_groups="layerwise", model=twin_model)
    assert opt.alpha0 == 1.0  # the default around a base: exactly the base at the start
    assert [g["lr"] for g in opt.param_groups] == [0.01] and opt.param_groups[0]["betas"] == [0.8, 0.9]
    train(opt, model)
    train(twin, twin_model)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.step_sizes(), twin.step_sizes())


def test_muon_for_the_matrices_and_adamw_for_the_rest():
    model = net()
    opt = build_optimizer(model, parse("--base-optimizer", "Muon+AdamW", "--base-args", '{"lr": 0.02}',
                                       "--base-args-rest", '{"lr": 0.001, "weight_decay": 0.0}', "--alpha0", "0.5"))
    muon, adamw = opt.bases
    assert type(muon) is torch.optim.Muon and type(adamw) is torch.optim.AdamW
    assert {p.dim() for g in muon.param_groups for p in g["params"]} == {2}
    assert {p.dim() for g in adamw.param_groups for p in g["params"]} == {1}
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.001] and opt.alpha0 == 0.5
    train(opt, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_third_party_optimizer_by_module_path():
    from lion_pytorch import Lion

    opt = build_optimizer(net(), parse("--base-optimizer", "lion_pytorch.Lion", "--base-args", '{"lr": 1e-4}'))
    assert type(opt.bases[0]) is Lion


@pytest.mark.parametrize("argv, message", [
    (["--base-optimizer", "Adamm"], "--base-optimizer: unknown optimizer 'Adamm'; accepted: a torch.optim name"),
    (["--base-optimizer", "nosuchpkg.Opt"], "--base-optimizer: cannot import 'nosuchpkg.Opt'"),
    (["--base-optimizer", "json.JSONDecoder"], "--base-optimizer: 'json.JSONDecoder' is not a torch.optim.Optimizer"),
    (["--base-optimizer", "Muon+AdamW+SGD"], "--base-optimizer: 'Muon+AdamW+SGD' is not NAME or A+B"),
    (["--base-optimizer", "AdamW", "--base-args", "{lr: 1}"], "--base-args: not valid JSON"),
    (["--base-optimizer", "AdamW", "--base-args", "[1]"], "--base-args: expected a JSON object"),
    (["--base-optimizer", "AdamW", "--base-args", '{"lrr": 1}'], "--base-args: AdamW: "),
    (["--base-optimizer", "AdamW", "--base-args", '{"lr": -1}'], "--base-args: AdamW: Invalid learning rate"),
    (["--base-optimizer", "Muon+AdamW", "--base-args-rest", '{"betas": 3}'], "--base-args-rest: AdamW: "),
    (["--base-optimizer", "AdamW", "--alg-meta", "Adamm"], "--alg-meta: unknown value 'Adamm'"),
    (["--base-optimizer", "AdamW", "--gamma", "2"], "--gamma must be"),
    (["--base-optimizer", "AdamW", "--optimizer", "DoG"], "--base-optimizer: MetaOptimize's base (--optimizer HF)"),
    (["--base-optimizer", "AdamW", "--hessian", "hvp"], "--hessian: a trace option of MetaOptimize's built-in"),
])
def test_bad_input_is_one_error_line_naming_the_flag(argv, message):
    proc = subprocess.run([sys.executable, str(REPO / "cifar10" / "train.py"), *argv, "--data-dir", "/nonexistent"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0], lines[0]


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_train_around", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cifar10_runs_around_adamw_records_it_and_resumes_bit_for_bit(tmp_path):
    train_mod = _module(REPO / "cifar10" / "train.py")
    data = write_fake_cifar10(tmp_path / "data", n_train=20, n_test=10)
    out = tmp_path / "out"
    common = ["--data-dir", str(data), "--save-directory", str(out), "--batch-size", "10", "--eval-batch-size", "10",
              "--num-epochs", "2", "--device", "cpu", "--log-every", "1", "--base-optimizer", "AdamW",
              "--base-args", '{"lr": 1e-3, "weight_decay": 0.1}', "--stepsize-groups", "resnet18_blocks"]
    assert train_mod.main([*common, "--run-name", "full"]) == 0
    config = json.loads((out / "full" / "config.json").read_text())
    assert (config["base_optimizer"], json.loads(config["base_args"]), config["alpha0"]) == (
        "AdamW", {"lr": 1e-3, "weight_decay": 0.1}, 1.0)
    records = [json.loads(line) for line in (out / "full" / "metrics.jsonl").read_text().splitlines()]
    assert sum(k.startswith("step_size/block_") for k in records[0]) == 6
    assert train_mod.main([*common, "--run-name", "part", "--stop-at-step", "3"]) == 0
    assert train_mod.main([*common, "--run-name", "part", "--resume"]) == 0
    full, part = (torch.load(out / r / "checkpoint.pt", weights_only=True) for r in ("full", "part"))
    for key in ("model", "optimizer", "step"):
        assert_same(full[key], part[key], key)


def test_continual_runs_around_muon_and_adamw(tmp_path):
    train_mod = _module(REPO / "continual_cifar100" / "train.py")
    data = write_fake_cifar100(tmp_path / "data", n_train=200, n_test=100)
    out = tmp_path / "out"
    argv = ["--data-dir", str(data), "--save-directory", str(out), "--run-name", "r", "--device", "cpu",
            "--num-tasks", "2", "--base-optimizer", "Muon+AdamW", "--base-args", '{"lr": 0.01}',
            "--base-args-rest", '{"lr": 1e-3}', "--alg-meta", "Adam", "--normalizer-param-meta", ".999"]
    assert train_mod.main(argv) == 0
    summary = json.loads((out / "r" / "summary.json").read_text())
    assert summary["finished"] is True
