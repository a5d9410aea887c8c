"""The compiled step (CompiledImpl, torch.compile), forced on CPU: a failure at its first call falls
back to foreach for the rest of the run (impl="auto") or raises (impl="fused"), and a changing set
of tensors with gradients does not multiply its compilations."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.optimizers import MetaOptimize
from common.optimizers import impl as impl_mod

GROUPS = ["scalar", "layerwise", "nodewise", "weightwise"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/device_check.sh)")


def model_and_data(seed=0):
    torch.manual_seed(seed)
    # two layers of one shape: tensors that share a compiled function
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Linear(5, 1))
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(8)]
    return model, data


def no_grad_on(step, params):
    """Tensors without a gradient this step: a changing subset (frozen layers, unused branches)."""
    return [p for k, p in enumerate(params) if (k + step) % 3 == 0 or (step % 4 == 3 and k < 4)]


def train(impl, groups, drop=None, steps=8, device="cpu"):
    model, data = model_and_data()
    model.to(device)
    data = [(x.to(device), y.to(device)) for x, y in data]
    params = list(model.parameters())
    opt = MetaOptimize(model, alg_base="AdamW", alg_meta="Adam", alpha0=1e-2, meta_stepsize=1e-2, gamma=0.9,
                       stepsize_groups=groups, normalizer_param_meta=0.999, impl=impl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, (x, y) in enumerate(data[:steps]):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            for p in (drop(step, params) if drop else []):
                p.grad = None
            opt.step()
    ours = [w for w in caught if "MetaOptimize" in str(w.message)]
    return params, opt, ours


def assert_same_run(a, b, exact=True):
    (pa, oa), (pb, ob) = a, b
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-7))
    for x, y in zip(pa, pb):
        assert check(x, y), (x - y).abs().max()
    assert check(oa.step_sizes(), ob.step_sizes())
    for x, y in zip(pa, pb):
        for name, v in oa.state[x].items():
            if torch.is_tensor(v):
                assert check(v, ob.state[y][name]), name


@pytest.mark.parametrize("groups", GROUPS)
def test_auto_falls_back_to_foreach_when_torch_compile_fails(compiled, groups):
    def broken(*args, **kwargs):
        raise RuntimeError("triton: no usable driver")

    compiled.setattr(torch, "compile", broken)
    params, opt, caught = train("auto", groups)
    assert isinstance(opt._impl, impl_mod.CompiledImpl) and opt.impl == "foreach"
    assert len(caught) == 1 and "torch.compile" in str(caught[0].message) and "no usable driver" in str(caught[0].message)
    fparams, fopt, none = train("foreach", groups)
    assert not none
    assert_same_run((params, opt), (fparams, fopt))


@pytest.mark.parametrize("groups", GROUPS)
def test_a_first_call_that_fails_after_writing_leaves_the_state_untouched(compiled, groups):
    """A kernel that writes its outputs and then fails (a launch error): the first call runs on
    copies, so the step redone by foreach is the foreach step exactly."""

    def writes_then_fails(gm, example_inputs):
        def run(*args):
            gm.forward(*args)
            raise RuntimeError("CUDA error: an illegal memory access")
        return run

    compiled.setattr(impl_mod, "_COMPILE_BACKEND", writes_then_fails)
    params, opt, caught = train("auto", groups)
    assert opt.impl == "foreach" and len(caught) == 1 and "illegal memory access" in str(caught[0].message)
    fparams, fopt, _ = train("foreach", groups)
    assert_same_run((params, opt), (fparams, fopt))


@pytest.mark.parametrize("groups", GROUPS)
def test_a_failure_in_the_middle_of_a_step_redoes_only_the_rest(compiled, groups):
    """The first tensors' functions compile, a later one fails: those tensors are not stepped twice."""
    built = []

    def fails_from_the_second(gm, example_inputs):
        built.append(gm)
        if len(built) > 2:  # the first function compiles twice (static, then symbolic scalars)
            raise RuntimeError("inductor: out of shared memory")
        return gm.forward

    compiled.setattr(impl_mod, "_COMPILE_BACKEND", fails_from_the_second)
    params, opt, caught = train("auto", groups, drop=no_grad_on)
    assert opt.impl == "foreach" and len(caught) == 1
    fparams, fopt, _ = train("foreach", groups, drop=no_grad_on)
    assert_same_run((params, opt), (fparams, fopt), exact=False)


@pytest.mark.parametrize("groups", GROUPS)
def test_a_failure_at_a_later_call_falls_back_with_one_warning(compiled, groups):
    """A compiled function that ran for some steps fails later (a recompile on new guards, before it
    writes): the tensors not stepped yet, and every later step, go to foreach, with one warning."""
    calls = []

    def fails_later(gm, example_inputs):
        def run(*args):
            calls.append(1)
            if len(calls) == 40:  # after both calls on copies of every function and a few steps
                raise RuntimeError("inductor: recompilation failed")
            return gm.forward(*args)
        return run

    compiled.setattr(impl_mod, "_COMPILE_BACKEND", fails_later)
    params, opt, caught = train("auto", groups)
    assert opt.impl == "foreach" and len(caught) == 1 and "recompilation failed" in str(caught[0].message)
    fparams, fopt, _ = train("foreach", groups)
    assert_same_run((params, opt), (fparams, fopt), exact=False)


def test_fused_raises_when_the_compiled_step_fails(compiled):
    def broken(*args, **kwargs):
        raise RuntimeError("triton: no usable driver")

    compiled.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match="impl='fused'.*no usable driver"):
        train("fused", "scalar")


@pytest.mark.parametrize("groups", GROUPS)
def test_a_changing_set_of_gradients_compiles_once_per_shape(compiled, groups):
    """Tensors drop in and out of the step (grad None): the compilations are bounded by the distinct
    (shape, dtype) of the tensors, not by the subsets, and every call runs compiled (dynamo's cache
    limit never turns the step eager)."""
    counts = {"compiles": 0, "calls": 0}

    def counting(gm, example_inputs):
        counts["compiles"] += 1

        def run(*args):
            counts["calls"] += 1
            return gm.forward(*args)
        return run

    compiled.setattr(impl_mod, "_COMPILE_BACKEND", counting)
    params, opt, caught = train("auto", groups, drop=no_grad_on)
    assert not caught and opt.impl == "fused"
    shapes = {tuple(p.shape) for p in params}  # (5, 4), (5,), (5, 5), (1, 5), (1,)
    # measured: 10 compilations (2 per shape: static, then symbolic scalars) for 8 steps with 8
    # different subsets of the 8 tensors
    assert counts["compiles"] <= 2 * len(shapes) == 10, counts
    stepped = sum(len(params) - len(no_grad_on(s, params)) for s in range(8))
    assert counts["calls"] == stepped + 2 * len(opt._impl._compiled), counts  # + the two calls on copies
    fparams, fopt, _ = train("foreach", groups, drop=no_grad_on)
    assert_same_run((params, opt), (fparams, fopt), exact=False)


# ---- on a GPU (scripts/device_check.sh): the real CompiledImpl, inductor and triton ----------------


@cuda
@pytest.mark.parametrize("groups", ["scalar", "weightwise"])
def test_cuda_auto_falls_back_to_foreach_when_compilation_fails(monkeypatch, groups):
    torch._dynamo.reset()

    def broken(gm, example_inputs):
        raise RuntimeError("triton: no usable driver")

    monkeypatch.setattr(impl_mod, "_COMPILE_BACKEND", broken)
    params, opt, caught = train("auto", groups, device="cuda")
    assert isinstance(opt._impl, impl_mod.CompiledImpl) and opt.impl == "foreach"
    assert len(caught) == 1 and "no usable driver" in str(caught[0].message)
    fparams, fopt, _ = train("foreach", groups, device="cuda")
    assert_same_run((params, opt), (fparams, fopt))


@cuda
@pytest.mark.parametrize("groups", ["scalar", "weightwise"])
def test_cuda_compiled_step_runs_fused_and_follows_foreach(groups):
    torch._dynamo.reset()
    params, opt, caught = train("auto", groups, drop=no_grad_on, device="cuda")
    assert not caught and isinstance(opt._impl, impl_mod.CompiledImpl) and opt.impl == "fused"
    fparams, fopt, _ = train("foreach", groups, drop=no_grad_on, device="cuda")
    assert_same_run((params, opt), (fparams, fopt), exact=False)
