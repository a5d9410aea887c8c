"""Optimizers from specs (common/specs.py): resolution, errors naming the flag, and builds equal to the flags'."""

import argparse
import json

import pytest
import torch

from common import baselines, harness, specs
from common.optim_flags import add_optimizer_args, build_optimizer, check_optimizer_args, spec_from_args

NAMES = ["HF", "AdamW", *baselines.BASELINES]


def parser():
    return add_optimizer_args(argparse.ArgumentParser())


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def train(opt, net, steps=3):
    torch.manual_seed(1)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds_from_a_minimal_spec(name):
    net = model()
    opt = specs.build_optimizer(net, {"optimizer": name.upper()})  # case-insensitive
    assert isinstance(opt, torch.optim.Optimizer)
    train(opt, net, steps=1)
    resolved = specs.resolve_spec({"optimizer": name.lower()})
    assert resolved["optimizer"] == name
    assert specs.resolve_spec(resolved) == resolved  # idempotent
    assert json.loads(json.dumps(resolved)) == resolved  # JSON round trip
    assert specs.spec_label(resolved).startswith(name)


def test_resolve_fills_defaults_and_drops_nothing_that_applies():
    hf = specs.resolve_spec({"optimizer": "metaoptimize"})
    assert hf["optimizer"] == "HF" and hf["alpha0"] == 1e-6 and hf["alg_base"] == "AdamW" and hf["hessian"] == "none"
    assert "lr" not in hf and "base_optimizer" not in hf and not any(k.startswith("prodigy_") for k in hf)
    around = specs.resolve_spec({"optimizer": "HF", "base_optimizer": "SGD", "base_args": '{"lr": 0.1}'})
    assert around["alpha0"] == 1.0 and around["base_args"] == {"lr": 0.1} and "alg_base" not in around
    assert specs.spec_label(around) == "HF around SGD/Lion a0=1"
    assert specs.spec_label(hf) == "HF AdamW/Lion a0=1e-06"
    prodigy = specs.resolve_spec({"optimizer": "prodigy", "prodigy_d0": 1e-5})
    assert prodigy["prodigy_d0"] == 1e-5 and prodigy["prodigy_lr"] == 1.0 and "alpha0" not in prodigy
    assert specs.spec_label(prodigy) == "Prodigy d0=1e-05"


@pytest.mark.parametrize("spec, flag", [
    ({"optimizer": "HF", "alpha0": -1.0}, "--alpha0"),
    ({"optimizer": "HF", "gamma": 2.0}, "--gamma"),
    ({"optimizer": "HF", "alg_base": "Nope"}, "--alg-base"),
    ({"optimizer": "HF", "stepsize_groups": "[1,x]"}, "--stepsize-groups"),
    ({"optimizer": "HF", "state_dtype": "int8"}, "--state-dtype"),
    ({"optimizer": "Nope"}, "--optimizer"),
    ({"alpha0": 1e-3}, "--optimizer"),
    ({"optimizer": "HF", "no_such_option": 1}, "--no-such-option"),
    ({"optimizer": "HF", "prodigy_d0": 1e-3}, "--prodigy-d0"),  # another optimizer's option
    ({"optimizer": "Prodigy", "alpha0": 1e-3}, "--alpha0"),
    ({"optimizer": "AdamW", "hessian": "hvp"}, "--hessian"),
    ({"optimizer": "HF", "base_optimizer": "SGD", "alg_base": "Lion"}, "--alg-base"),
    ({"optimizer": "HF", "base_optimizer": "SGD", "hessian": "hvp"}, "--hessian"),
    ({"optimizer": "HF", "base_optimizer": "NoSuchOpt"}, "--base-optimizer"),
    ({"optimizer": "HF", "base_optimizer": "SGD", "base_args": {"lr": -1}}, "--base-args"),
    ({"optimizer": "AdamW", "lr": 0.0}, "--lr"),
    ({"optimizer": "Prodigy", "prodigy_betas": "0.9"}, "--prodigy-betas"),
])
def test_bad_spec_is_a_value_error_naming_the_flag(spec, flag):
    with pytest.raises(ValueError, match=f"^{flag}"):
        specs.resolve_spec(spec)


def test_spec_from_default_flags_is_the_resolved_default():
    args = parser().parse_args([])
    assert spec_from_args(args) == specs.resolve_spec({"optimizer": "HF"})
    # the flags of other optimizers, at any value, stay out of the spec (as the command line always ignored them)
    prodigy = spec_from_args(parser().parse_args(["--optimizer", "prodigy", "--alpha0", "1e-3"]))
    assert prodigy == specs.resolve_spec({"optimizer": "Prodigy"})
    with pytest.raises(ValueError, match="^--hessian"):  # but options that change what is built are refused
        check_optimizer_args(parser().parse_args(["--optimizer", "AdamW", "--hessian", "hvp"]))


def test_check_runs_once_and_records_the_spec(monkeypatch):
    args = parser().parse_args(["--base-optimizer", "SGD", "--base-args", '{"lr": 0.1}'])
    calls = []
    resolve = specs.resolve_spec
    monkeypatch.setattr(specs, "resolve_spec", lambda s: calls.append(1) or resolve(s))
    harness.check_args(args)
    harness.check_args(args)  # start_run checks again: the optimizer's checks do not run twice
    assert len(calls) == 1 and args.alpha0 == 1.0 and args.optimizer_spec["base_args"] == {"lr": 0.1}
    args.alpha0 = -1.0  # a changed flag is checked again
    with pytest.raises(ValueError, match="^--alpha0"):
        harness.check_args(args)


@pytest.mark.parametrize("argv", [
    ["--alg-base", "Lion", "--Lion-beta2-base", "0.9", "--alg-meta", "Adam", "--normalizer-param-meta", "0.999",
     "--alpha0", "1e-3",
     "--stepsize-groups", "layerwise"],
    ["--base-optimizer", "Adam+SGD", "--base-args", '{"lr": 0.01}', "--base-args-rest", '{"lr": 0.1}'],
    ["--optimizer", "AdamW", "--lr", "0.01"],
    ["--optimizer", "DoG"],
])
def test_spec_built_equals_flag_built_step_for_step(argv):
    args = parser().parse_args(argv)
    spec = json.loads(json.dumps(spec_from_args(args)))  # through config.json and back
    a, b = model(), model()
    assert all(torch.equal(x, y) for x, y in zip(train(build_optimizer(a, args), a),
                                                    train(specs.build_optimizer(b, spec), b), strict=True))


def test_config_json_of_a_tiny_run_holds_the_spec(tmp_path):
    p = harness.ArgParser()
    harness.add_run_args(p)
    add_optimizer_args(p)
    args = p.parse_args(["--save-directory", str(tmp_path), "--device", "cpu", "--run-name", "r",
                         "--optimizer", "Prodigy", "--prodigy-d0", "1e-5"])
    run = harness.start_run(harness.check_args(args), "x")
    run.log({"train/loss": 1.0}, step=1)
    run.finish({})
    config = json.loads((run.dir / "config.json").read_text())
    assert config["optimizer_spec"] == specs.resolve_spec({"optimizer": "Prodigy", "prodigy_d0": 1e-5})
    assert config["optimizer"] == "Prodigy" and config["prodigy_d0"] == 1e-5  # the flags' keys stay
