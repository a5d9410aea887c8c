"""Complex parameters step as their real views (torch.view_as_real), as in torch's optimizers:
state, trace and z over the real and imaginary parts, so a run equals the run on the real views."""

import pytest
import torch
import torch.nn as nn

from common.optimizers import MetaOptimize, MetaOptimize_AdamW_Lion_hg
from common.optimizers import impl as impl_mod


def twins(seed=0):
    gen = torch.Generator().manual_seed(seed)
    complex_params = [nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.complex64)),
                      nn.Parameter(torch.randn(3, generator=gen, dtype=torch.complex64)),
                      nn.Parameter(torch.randn(2, generator=gen))]
    real_params = [nn.Parameter(torch.view_as_real(p.detach()).clone() if p.is_complex() else p.detach().clone())
                   for p in complex_params]
    return complex_params, real_params


def real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def set_twin_grads(cps, rps, gen):
    """One random gradient per real twin, the same numbers as the complex tensor's gradient."""
    for cp, rp in zip(cps, rps):
        g = torch.randn(rp.shape, generator=gen)
        cp.grad = torch.view_as_complex(g) if cp.is_complex() else g.clone()
        rp.grad = g.clone()


@pytest.mark.parametrize("impl", ["foreach", "fused", "compiled"])
@pytest.mark.parametrize("groups", ["scalar", "layerwise", "nodewise", "weightwise"])
@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_complex_parameters_step_as_their_real_views(groups, impl, state_dtype, monkeypatch):
    if impl == "compiled":  # the CUDA step (torch.compile) on CPU, with a cheap backend
        monkeypatch.setattr(impl_mod, "_FORCE_COMPILED", True)
        monkeypatch.setattr(impl_mod, "_COMPILE_BACKEND", "eager")
        impl = "fused"
    cps, rps = twins()
    kw = dict(alg_base="AdamW", alg_meta="Adam", alpha0=1e-2, meta_stepsize=1e-2, gamma=0.9,
              normalizer_param_meta=0.999, stepsize_groups=groups, impl=impl, state_dtype=state_dtype)
    copt, ropt = MetaOptimize(cps, **kw), MetaOptimize(rps, **kw)
    assert copt.num_blocks == ropt.num_blocks and copt.impl == ropt.impl
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        set_twin_grads(cps, rps, gen)
        if step == 3:  # a tensor without a gradient keeps its blocks
            cps[1].grad = rps[1].grad = None
        copt.step()
        ropt.step()
    for cp, rp in zip(cps, rps):
        assert torch.equal(real(cp.detach()), rp.detach())
        for name, v in copt.state[cp].items():
            assert (v == ropt.state[rp][name]) if name == "step" else torch.equal(real(v), ropt.state[rp][name]), name
        if cp.is_complex():  # torch's form: complex state (or its real view in a real state_dtype)
            assert copt.state[cp]["momentum"].is_complex() == (state_dtype is None)
    assert torch.equal(copt.step_sizes(), ropt.step_sizes())
    assert not torch.equal(copt.step_sizes(), torch.full_like(copt.step_sizes(), 1e-2))  # beta moved


def test_complex_parameters_survive_a_state_dict_round_trip():
    cps, _ = twins()
    opt = MetaOptimize(cps, alpha0=1e-2, meta_stepsize=1e-2, stepsize_groups="nodewise")
    for p in cps:
        p.grad = torch.ones_like(p)
    opt.step()
    again = MetaOptimize(cps, alpha0=1e-2, meta_stepsize=1e-2, stepsize_groups="nodewise")
    again.load_state_dict(opt.state_dict())
    opt.step()
    again.step()
    assert torch.equal(opt.step_sizes(), again.step_sizes())


@pytest.mark.parametrize("blocks", ["scalar", "layerwise"])
def test_packaged_class_steps_complex_parameters_as_their_real_views(blocks):
    """MetaOptimize_AdamW_Lion_hg (held against its spec in test_optimizers.py) on complex parameters
    equals its run on their real views: complex state as torch keeps it, z over both parts."""
    cps, rps = twins()
    kw = dict(meta_stepsize=1e-2, alpha0=1e-2, stepsize_blocks=blocks, gamma=0.9, weight_decay=0.1)
    copt, ropt = MetaOptimize_AdamW_Lion_hg(cps, **kw), MetaOptimize_AdamW_Lion_hg(rps, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        set_twin_grads(cps, rps, gen)
        copt.step()
        ropt.step()
    for cp, rp in zip(cps, rps):
        assert torch.equal(real(cp.detach()), rp.detach())
        for name, v in copt.state[cp].items():
            if name != "step":
                assert v.is_complex() == cp.is_complex() and torch.equal(real(v), ropt.state[rp][name]), name
    assert torch.equal(copt.step_sizes(), ropt.step_sizes())
    assert all(real(copt.state[cp]["h"]).abs().sum() > 0 for cp in cps)  # the trace, so z, is not trivially 0
