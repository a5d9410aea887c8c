"""Resume is bit for bit: every base x meta pair x every kind of step-size block x both step
implementations of MetaOptimize, and the authors' packaged class.

A run of 3 + 3 steps is compared with a run of 3 steps, a checkpoint (torch.save, then
torch.load(weights_only=True) as the harness does) loaded into a fresh model and optimizer built
from other weights, and 3 more steps: the weights, the step sizes and every entry of the
optimizer's state_dict must be equal, bit for bit. The model is a 2-layer MLP (4 tensors); one
tensor gets no gradient on odd steps, so the blocks a step leaves out are resumed too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from checks import assert_same, through_checkpoint

from common.optimizers import BASE_ALGS, META_ALGS, MetaOptimize, MetaOptimize_AdamW_Lion_hg

BASES = sorted(set(BASE_ALGS.values()))
METAS = sorted(set(META_ALGS.values()))
# every kind of block: one, per tensor, per row, per weight, a list of counts, the named split,
# and a block per param group (whose groups also carry their own base hyperparameters)
GROUPS = ["scalar", "layerwise", "nodewise", "weightwise", [3, 1], "last_layer_and_others", "param_groups"]
IMPLS = ["foreach", "fused"]
STEPS_BEFORE, STEPS_AFTER = 3, 3

HP = dict(weight_decay_base=0.1, momentum_param_base=0.9, normalizer_param_base=0.999, lion_beta2_base=0.9,
          weight_decay_meta=0.01, momentum_param_meta=0.9, normalizer_param_meta=0.99, lion_beta2_meta=0.9)
SECOND_GROUP = {"weight_decay_base": 0.3, "momentum_param_base": 0.5, "normalizer_param_base": 0.9,
                "lion_beta2_base": 0.5}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def metaoptimize(base, meta, groups, impl):
    def build(model):
        params = list(model.parameters())
        arg = [{"params": params[:2]}, {"params": params[2:], **SECOND_GROUP}] if groups == "param_groups" else params
        return MetaOptimize(arg, alg_base=base, alg_meta=meta, alpha0=1e-2, meta_stepsize=0.05, gamma=0.9,
                            stepsize_groups=groups, impl=impl, **HP)
    return build


def packaged(blocks):
    def build(model):
        return MetaOptimize_AdamW_Lion_hg(model.parameters(), meta_stepsize=0.05, alpha0=1e-2, stepsize_blocks=blocks,
                                          gamma=0.9, weight_decay=0.1)
    return build


def train(model, opt, steps, start):
    """Steps start .. start + steps - 1, each on its own fixed batch; the first layer's bias gets
    no gradient on odd steps (a tensor skipped by the step keeps its state and its blocks)."""
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        if i % 2:
            model[0].bias.grad = None
        opt.step()


def check_resume(build):
    model = make_model(0)
    opt = build(model)
    train(model, opt, STEPS_BEFORE + STEPS_AFTER, 0)

    part = make_model(0)
    part_opt = build(part)
    train(part, part_opt, STEPS_BEFORE, 0)
    saved = through_checkpoint({"model": part.state_dict(), "optimizer": part_opt.state_dict()})
    resumed = make_model(1)  # other weights: the checkpoint must set everything
    resumed_opt = build(resumed)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    train(resumed, resumed_opt, STEPS_AFTER, STEPS_BEFORE)

    assert_same(model.state_dict(), resumed.state_dict(), "model")
    assert_same(opt.step_sizes(), resumed_opt.step_sizes(), "step_sizes")
    assert_same(through_checkpoint(opt.state_dict()), through_checkpoint(resumed_opt.state_dict()), "optimizer")
    return opt


@pytest.mark.parametrize("groups", GROUPS, ids=str)
@pytest.mark.parametrize("meta", METAS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_resume_is_bit_for_bit(impl, base, meta, groups):
    opt = check_resume(metaoptimize(base, meta, groups, impl))
    assert opt.impl == impl
    sizes = opt.step_sizes()
    if meta == "fixed":
        assert torch.equal(sizes, torch.full_like(sizes, 1e-2))
    else:  # a resume that lost beta or the meta state would show: the step sizes moved
        assert not torch.equal(sizes, torch.full_like(sizes, 1e-2))


@pytest.mark.parametrize("blocks", ["scalar", "layerwise", [3, 1]], ids=str)
def test_packaged_class_resume_is_bit_for_bit(blocks):
    opt = check_resume(packaged(blocks))
    assert not torch.equal(opt.step_sizes(), torch.full_like(opt.step_sizes(), 1e-2))


def _bad(saved, change):
    bad = through_checkpoint(saved)
    change(bad)
    return bad


def check_refused(build, saved, cases):
    """Each bad state dict is a ValueError naming the parameter and the key, and the optimizer that
    refused it is exactly as before (and still steps)."""
    model = make_model(1)
    opt = build(model)
    train(model, opt, 1, 0)
    before = through_checkpoint(opt.state_dict())
    for change, needle in cases:
        with pytest.raises(ValueError, match=needle):
            opt.load_state_dict(_bad(saved, change))
        assert_same(through_checkpoint(opt.state_dict()), before, "optimizer")
    train(model, opt, 1, 1)


def _saved(build):
    model = make_model(0)
    opt = build(model)
    train(model, opt, 2, 0)
    return through_checkpoint(opt.state_dict())


def _set(key, value, index=0):
    return lambda sd: sd["state"][index].__setitem__(key, value(sd["state"][index][key]))


def _delete(key, index):
    return lambda sd: sd["state"][index].pop(key)


@pytest.mark.parametrize("impl", IMPLS)
def test_load_state_dict_validates_everything_before_it_changes_anything(impl):
    build = metaoptimize("AdamW", "Lion", "layerwise", impl)
    saved = _saved(build)
    check_refused(build, saved, [
        # the same count of values in another shape: the fused step wrote out of bounds
        (_set("trace", lambda t: t.reshape(-1)), r"parameter 0 \(shape \(4, 5\)\): 'trace' has shape \(20,\)"),
        (_set("momentum", lambda t: t[:2]), r"parameter 0 .*'momentum' has shape \(2, 5\)"),
        (_delete("trace", 3), r"parameter 3 .*no 'trace'"),  # the last one: nothing half-loaded
        (_set("normalizer", lambda t: t.to(torch.int32), 2), r"parameter 2 .*'normalizer' must be a floating"),
        (_set("step", lambda s: -1, 1), r"parameter 1 .*'step' must be a number"),
        (lambda sd: sd["meta"].__setitem__("beta", torch.zeros(7)), r"meta 'beta' must be .* of 4 values"),
        (lambda sd: sd["meta"].__setitem__("momentum", torch.zeros(1)), r"meta 'momentum' must be .* of 4 values"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "param group 0 has 3 parameters"),
    ])


def test_packaged_load_state_dict_validates_before_it_changes_anything():
    build = packaged("layerwise")
    saved = _saved(build)
    check_refused(build, saved, [
        (_set("h", lambda t: t.reshape(-1)), r"parameter 0 .*'h' has shape \(20,\)"),
        (_delete("base_momentum", 3), r"parameter 3 .*no 'base_momentum'"),
        (lambda sd: sd["meta_state"][1].__setitem__("beta", torch.zeros(3)), r"block 1: 'beta'"),
    ])
