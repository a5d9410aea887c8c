"""MetaOptimize on a CUDA device: skipped without one; scripts/device_check.sh runs them on a GPU."""

import copy

import pytest
import torch
import torch.nn as nn
from test_optimizers import HP, SHAPES, grads_at, make_problem, split_hp

from common.optimizers import MetaOptimize
from common.optimizers.reference import Reference, block_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [("AdamW", "Lion", "scalar"), ("AdamW", "Adam", "resnet18_like"), ("Lion", "Lion", "layerwise"),
         ("RMSProp", "Adam", "nodewise"), ("SGDm", "SGD", "weightwise")]


def _groups(groups):
    return [1, 3] if groups == "resnet18_like" else groups


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("base, meta, groups", CASES, ids=str)
def test_cuda_step_matches_the_reference(impl, base, meta, groups):
    groups = _groups(groups)
    weights, curvature, noise = make_problem(11)
    params = [nn.Parameter(w.cuda()) for w in weights]
    opt = MetaOptimize(params, alg_base=base, alg_meta=meta, alpha0=1e-2, meta_stepsize=2e-2, gamma=0.95,
                       stepsize_groups=groups, impl=impl, **HP)
    assert opt.impl == impl
    base_hp, meta_hp = split_hp(HP)
    ref = Reference(weights, base, meta, 1e-2, 2e-2, 0.95, block_ids(SHAPES, groups), base_hp, meta_hp)
    for t in range(30):
        grads = grads_at([p.detach().cpu() for p in params], curvature, noise[t])
        for p, g in zip(params, grads):
            p.grad = g.cuda()
        opt.step()
        ref.step(grads_at(ref.w, [a.double() for a in curvature], [n.double() for n in noise[t]]))
    for p, w in zip(params, ref.w):
        torch.testing.assert_close(p.detach().cpu().double(), w, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(opt.step_sizes().cpu().double(), torch.exp(ref.beta), rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("base, meta, groups", CASES, ids=str)
def test_cuda_step_never_synchronises_with_the_host(impl, base, meta, groups):
    """torch's sync debug mode raises on any host-device synchronisation inside step()."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).cuda()
    opt = MetaOptimize(model.parameters(), alg_base=base, alg_meta=meta, stepsize_groups=_groups(groups),
                       impl=impl, **HP)
    x = torch.randn(32, 8, device="cuda")
    for _ in range(3):  # warm-up: state, compilation, cached index tensors
        model(x).square().mean().backward()
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_cuda_resume_is_bit_for_bit(impl):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).cuda()
    make = lambda m: MetaOptimize(m.parameters(), alg_base="AdamW", alg_meta="Adam", alpha0=1e-3,  # noqa: E731
                                  meta_stepsize=1e-2, impl=impl, **HP)
    opt = make(model)
    data = [torch.randn(32, 8, device="cuda") for _ in range(20)]

    def train(m, o, xs):
        for x in xs:
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()

    train(model, opt, data[:10])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, data[10:])
    twin = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).cuda()
    twin.load_state_dict(saved["model"])
    topt = make(twin)
    topt.load_state_dict(saved["opt"])
    train(twin, topt, data[10:])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.step_sizes(), topt.step_sizes())
