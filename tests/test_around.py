"""MetaOptimize around any optimizer (spec section 10): `MetaOptimize.around(base, ...)`.

The exact special cases (torch SGD and lion_pytorch Lion wrapped equal the built-in SGD and Lion
bases, every block kind), `fixed` with alpha0 = 1 is the bare base, the float64 reference
(`reference.AroundReference`) for torch's and a third-party optimizer, resume bit for bit,
deepcopy/pickle, zero_grad, schedulers on the base's lr, params without a gradient, GradScaler.
"""

import copy
import math
import pickle

import lion_pytorch
import pytest
import torch
import torch.nn as nn
from checks import assert_same, through_checkpoint
from test_optimizers import (
    GROUPS,
    HP,
    SHAPES,
    assert_follows_reference,
    grads_at,
    make_problem,
    split_hp,
    step_with_reference,
)

from common.optimizers import MetaOptimize, MetaOptimizeAround
from common.optimizers.reference import AroundReference, block_ids

META_HP = {k: v for k, v in HP.items() if k.endswith("_meta")}
META = "Adam"


def groups_of(params, groups):
    """The base's params: two param groups for the param_groups blocks, else one list."""
    if groups == "param_groups":
        return [{"params": params[:2]}, {"params": params[2:]}]
    return params


def make_params(weights, dtype=torch.float32):
    return [nn.Parameter(w.clone().to(dtype)) for w in weights]


def run_pair(opt_a, params_a, opt_b, params_b, curvature, noise, steps):
    for t in range(steps):
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            for p, g in zip(params, grads_at([p.detach() for p in params], curvature, noise[t])):
                p.grad = g
            opt.step()


def assert_close_runs(opt_a, params_a, opt_b, params_b, rtol=1e-5, atol=1e-6):
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(opt_a.step_sizes(), opt_b.step_sizes(), rtol=rtol, atol=1e-9)


# ---- the exact special cases -----------------------------------------------------------------


@pytest.mark.parametrize("groups", GROUPS, ids=str)
def test_torch_sgd_wrapped_equals_the_builtin_sgd_base(groups):
    kappa, alpha0 = 0.1, 3e-2
    weights, curvature, noise = make_problem()
    pa, pb = make_params(weights), make_params(weights)
    wrapped = MetaOptimize.around(torch.optim.SGD(groups_of(pa, groups), lr=1.0, momentum=0.0, weight_decay=kappa),
                                  alg_meta=META, alpha0=alpha0, meta_stepsize=2e-2, gamma=0.95,
                                  stepsize_groups=groups, **META_HP)
    builtin = MetaOptimize(groups_of(pb, groups), alg_base="SGD", alg_meta=META, alpha0=alpha0, meta_stepsize=2e-2,
                           gamma=0.95, stepsize_groups=groups, weight_decay_base=kappa, **META_HP)
    run_pair(wrapped, pa, builtin, pb, curvature, noise, 30)
    assert_close_runs(wrapped, pa, builtin, pb)
    assert not torch.allclose(wrapped.step_sizes(), torch.full_like(wrapped.step_sizes(), alpha0)), "beta should move"


@pytest.mark.parametrize("groups", GROUPS, ids=str)
def test_lion_pytorch_wrapped_equals_the_builtin_lion_base(groups):
    """lion_pytorch: w <- w (1 - lr kappa) - lr sign(c m + (1 - c) g), m <- rho m + (1 - rho) g;
    with lr = 1 its change is -(sign(...) + kappa w): section 3's Lion d with c = betas[0],
    rho = betas[1]."""
    kappa, c, rho, alpha0 = 0.1, 0.9, 0.99, 1e-2
    weights, curvature, noise = make_problem()
    pa, pb = make_params(weights), make_params(weights)
    wrapped = MetaOptimize.around(lion_pytorch.Lion(groups_of(pa, groups), lr=1.0, betas=(c, rho), weight_decay=kappa),
                                  alg_meta=META, alpha0=alpha0, meta_stepsize=2e-2, gamma=0.95,
                                  stepsize_groups=groups, **META_HP)
    builtin = MetaOptimize(groups_of(pb, groups), alg_base="Lion", alg_meta=META, alpha0=alpha0, meta_stepsize=2e-2,
                           gamma=0.95, stepsize_groups=groups, weight_decay_base=kappa, lion_beta2_base=c,
                           momentum_param_base=rho, **META_HP)
    run_pair(wrapped, pa, builtin, pb, curvature, noise, 30)
    assert_close_runs(wrapped, pa, builtin, pb)


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p, lr=1e-2),
                                  lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1),
                                  lambda p: lion_pytorch.Lion(p, lr=1e-3, weight_decay=0.1)],
                         ids=["Adam", "SGDm", "Lion"])
def test_fixed_with_alpha0_one_is_the_bare_base(make):
    weights, curvature, noise = make_problem()
    pa, pb = make_params(weights), make_params(weights)
    wrapped = MetaOptimize.around(make(pa), alg_meta="fixed", alpha0=1.0)
    run_pair(wrapped, pa, make(pb), pb, curvature, noise, 20)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(wrapped.step_sizes(), torch.ones(1))


# ---- the float64 reference of section 10 -----------------------------------------------------


def muon_and_adamw(params):
    two_d = [p for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() != 2]
    return [torch.optim.Muon(two_d, lr=2e-2, weight_decay=0.1), torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1)]


BASES = {
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2, weight_decay=0.1),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-1),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=0.1),
    "Muon+AdamW": muon_and_adamw,
    "lion_pytorch.Lion": lambda p: lion_pytorch.Lion(p, lr=1e-3, weight_decay=0.1),
}


def run_against_around_reference(name, groups, meta=META, gamma=0.95, steps=30):
    weights, curvature, noise = make_problem()
    params, params64 = make_params(weights), make_params(weights, torch.float64)
    make = BASES[name]
    eta = 2e-2
    opt = MetaOptimize.around(make(groups_of(params, groups) if groups == "param_groups" else params),
                              alg_meta=meta, alpha0=1.0, meta_stepsize=eta, gamma=gamma, stepsize_groups=groups,
                              **META_HP)
    base64 = make(groups_of(params64, groups) if groups == "param_groups" else params64)
    ref = AroundReference(params64, base64, meta, 1.0, eta, gamma, block_ids(SHAPES, groups, [2, 2]),
                          split_hp(HP)[1])
    step_with_reference(opt, params, ref, curvature, noise, steps)
    return opt, params, ref


@pytest.mark.parametrize("groups", ["scalar", "nodewise"], ids=str)
@pytest.mark.parametrize("name", list(BASES))
def test_follows_the_float64_reference(name, groups):
    opt, params, ref = run_against_around_reference(name, groups)
    assert_follows_reference(opt, params, ref)
    assert not torch.allclose(ref.beta, torch.zeros_like(ref.beta)), "beta should move"


@pytest.mark.parametrize("groups", ["layerwise", "weightwise", [1, 3], "param_groups"], ids=str)
@pytest.mark.parametrize("meta", ["SGD", "RMSProp", "Adam", "Lion"])
def test_every_block_kind_and_meta_rule_follow_the_reference(meta, groups):
    opt, params, ref = run_against_around_reference("AdamW", groups, meta=meta, steps=20)
    assert_follows_reference(opt, params, ref)


def test_params_without_a_gradient_are_skipped():
    weights, curvature, noise = make_problem()
    params, params64 = make_params(weights), make_params(weights, torch.float64)
    opt = MetaOptimize.around(torch.optim.AdamW(params, lr=1e-2), stepsize_groups="layerwise", alpha0=1.0,
                              meta_stepsize=2e-2, **META_HP)
    ref = AroundReference(params64, torch.optim.AdamW(params64, lr=1e-2), META, 1.0, 2e-2, 1.0,
                          block_ids(SHAPES, "layerwise"), split_hp(HP)[1])
    c64 = [a.double() for a in curvature]
    for t in range(10):
        skip = t % 3 == 0
        for p, g in zip(params, grads_at([p.detach() for p in params], curvature, noise[t])):
            p.grad = g
        before = params[1].detach().clone()
        beta1 = opt.step_sizes()[1].clone()
        if skip:
            params[1].grad = None
        opt.step()
        grads = grads_at(ref.w, c64, [n.double() for n in noise[t]])
        ref.step([None if skip and i == 1 else g for i, g in enumerate(grads)])
        if skip:
            assert torch.equal(params[1].detach(), before)
            assert torch.equal(opt.step_sizes()[1], beta1)
    assert_follows_reference(opt, params, ref)


# ---- the torch.optim.Optimizer contract ------------------------------------------------------


def small_run(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    two_d = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    bases = [torch.optim.Muon(two_d, lr=2e-2), torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1)]
    opt = MetaOptimize.around(bases, stepsize_groups="layerwise", meta_stepsize=1e-2, model=model)
    return model, opt


def train(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        y = torch.randn(16, 2, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_param_groups_are_the_bases_dicts_and_schedulers_act_on_the_base_lr():
    model, opt = small_run()
    assert all(a is b for a, b in zip(opt.param_groups, opt.bases[0].param_groups + opt.bases[1].param_groups))
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, MetaOptimizeAround)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, 1)
    sched.step()
    assert opt.bases[0].param_groups[0]["lr"] == 1e-2 and opt.bases[1].param_groups[0]["lr"] == 5e-3
    # the model's order: Linear(4, 8).weight, .bias, Linear(8, 2).weight, .bias
    assert opt._params == list(model.parameters())
    assert opt.step_sizes().shape == (4,)


def test_zero_grad_and_closure():
    model, opt = small_run()
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_resume_is_bit_for_bit():
    model, opt = small_run()
    train(model, opt, 4)
    saved_model = through_checkpoint(model.state_dict())
    saved = through_checkpoint(opt.state_dict())
    model2, opt2 = small_run(seed=5)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved)
    train(model, opt, 4, seed=2)
    train(model2, opt2, 4, seed=2)
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict(), opt2.state_dict())
    assert opt.state_dict()["meta"]["step"] == 8


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle(how):
    model, opt = small_run()
    train(model, opt, 3)
    pair = (model, opt)
    model2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert opt2._params[0] is next(model2.parameters())
    train(model, opt, 3, seed=2)
    train(model2, opt2, 3, seed=2)
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict(), opt2.state_dict())


def test_grad_scaler_overflow_leaves_beta_and_trace_untouched():
    model, opt = small_run()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    train(model, opt, 2)
    beta, traces = opt._beta.clone(), [opt.state[p]["trace"].clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(torch.randn(4, 4)), torch.randn(4, 2))
    scaler.scale(loss).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert torch.equal(opt._beta, beta)
    assert all(torch.equal(opt.state[p]["trace"], h) for p, h in zip(model.parameters(), traces))
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights))
    assert scaler.get_scale() < 2.0**8


def test_bad_arguments():
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="base"):
        MetaOptimize.around(p)
    with pytest.raises(ValueError, match="alg_meta"):
        MetaOptimize.around(torch.optim.Adam(p), alg_meta="Nope")
    with pytest.raises(ValueError, match="alpha0"):
        MetaOptimize.around(torch.optim.Adam(p), alpha0=-1.0)
    assert math.isclose(MetaOptimize.around(torch.optim.Adam(p), alpha0=0.5).step_sizes().item(), 0.5, rel_tol=1e-6)


# ---- torch's generic checks, on the wrapper around each torch optimizer ----------------------
# torch's own OptimizerInfo inputs (test/test_optim.py), foreach and fused variants included: each
# base built with them and wrapped (alg_meta Adam, alpha0 1); LBFGS (a closure-driven line search)
# and SparseAdam (sparse gradients) are not first-order dense steps and are left out.

from test_optim_generic import _fwd_bwd, linear_problem  # noqa: E402  (it thaws torch's backend flags)
from torch.testing._internal.common_optimizers import (  # noqa: E402
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

TORCH_INFOS = [i for i in optim_db if i.name not in ("LBFGS", "SparseAdam")]


def torch_inputs(info):
    return [i for i in _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info,
                                                                          skip=("differentiable",))
            if not i.kwargs.get("capturable")]


def wrapped(info, params, kwargs):
    if info.name == "Muon":  # 2-D weights only: the bias keeps its value
        params = [p for p in params if p.dim() == 2]
    return MetaOptimize.around(info.optim_cls(params, **kwargs), alpha0=1.0, meta_stepsize=1e-3)


@pytest.mark.parametrize("info", TORCH_INFOS, ids=lambda i: i.name)
def test_torch_generic_loss_decreases_and_resume_is_exact(info):
    """torch's test_forloop_goes_right_direction and test_state_dict_deterministic, wrapped."""
    for optim_input in torch_inputs(info):
        weight, bias, x = linear_problem("cpu")
        opt = wrapped(info, [weight, bias], optim_input.kwargs)
        sign = -1.0 if optim_input.kwargs.get("maximize") else 1.0

        def closure(opt=opt, weight=weight, bias=bias, sign=sign, x=x):
            return sign * _fwd_bwd(opt, weight, bias, x)

        initial = closure().item()
        for _ in range(20):
            returned = opt.step(closure)
        assert torch.is_tensor(returned), optim_input.desc
        assert closure().item() < initial, optim_input.desc
        # a fresh wrapper around a fresh base, loaded from the state dict, continues the same
        w2, b2 = (nn.Parameter(t.detach().clone()) for t in (weight, bias))
        opt2 = wrapped(info, [w2, b2], optim_input.kwargs)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))

        def closure2(opt=opt2, weight=w2, bias=b2, sign=sign, x=x):
            return sign * _fwd_bwd(opt, weight, bias, x)

        for _ in range(3):
            opt.step(closure)
            opt2.step(closure2)
        assert torch.equal(weight, w2) and torch.equal(bias, b2), optim_input.desc
        assert torch.equal(opt.step_sizes(), opt2.step_sizes()), optim_input.desc


@pytest.mark.parametrize("info", TORCH_INFOS, ids=lambda i: i.name)
def test_torch_generic_step_is_noop_without_grads(info):
    for optim_input in torch_inputs(info)[:2]:
        weight, bias, _ = linear_problem("cpu")
        opt = wrapped(info, [weight, bias], optim_input.kwargs)
        before = [weight.detach().clone(), bias.detach().clone()]
        opt.step()
        assert torch.equal(weight, before[0]) and torch.equal(bias, before[1]), optim_input.desc
        assert torch.equal(opt.step_sizes(), torch.ones(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("groups", ["scalar", "layerwise", "nodewise", "weightwise", [2, 2]], ids=str)
def test_cuda_step_never_synchronises_with_the_host(groups):
    """torch's sync debug mode raises on any host-device synchronisation inside step() (here around
    torch's AdamW, whose own step does not synchronise)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).cuda()
    opt = MetaOptimize.around(torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True), stepsize_groups=groups)
    x = torch.randn(32, 8, device="cuda")
    for _ in range(3):  # warm-up: state, cached index tensors and masks
        model(x).square().mean().backward()
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
        opt.step_sizes()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_step_and_state_dict_hooks_are_called():
    model, opt = small_run()
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    train(model, opt, 1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_block_lists_over_several_groups_need_the_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    two_d = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    with pytest.raises(ValueError, match="model="):
        MetaOptimize.around([torch.optim.Muon(two_d), torch.optim.AdamW(rest)], stepsize_groups=[2, 2])
    opt = MetaOptimize.around([torch.optim.Muon(two_d), torch.optim.AdamW(rest)], stepsize_groups=[2, 2], model=model)
    assert opt._layout.starts == [0, 0, 1, 1]  # Linear(4, 8) in block 0, Linear(8, 2) in block 1
    with pytest.raises(ValueError, match="model"):
        MetaOptimize.around(torch.optim.AdamW(rest), model=nn.Linear(2, 2))


def test_a_tensor_lr_in_one_group_follows_the_reference():
    weights, curvature, noise = make_problem()
    params, params64 = make_params(weights), make_params(weights, torch.float64)

    def make(p):
        return torch.optim.AdamW([{"params": p[:2], "lr": torch.tensor(1e-2)}, {"params": p[2:]}], lr=2e-2,
                                 weight_decay=0.1, foreach=False)

    opt = MetaOptimize.around(make(params), alpha0=1.0, meta_stepsize=2e-2, gamma=0.95, stepsize_groups="nodewise",
                              **META_HP)
    ref = AroundReference(params64, make(params64), META, 1.0, 2e-2, 0.95, block_ids(SHAPES, "nodewise"),
                          split_hp(HP)[1])
    step_with_reference(opt, params, ref, curvature, noise, 20)
    assert_follows_reference(opt, params, ref)


# ---- the fused step (around_kernel.py) against the foreach step and the reference -------------

def run_impl(impl, groups, meta, base="AdamW", steps=15, gamma=0.95):
    weights, curvature, noise = make_problem()
    params = make_params(weights)
    opt = MetaOptimizeAround(BASES[base](params), alg_meta=meta, alpha0=1.0, meta_stepsize=2e-2, gamma=gamma,
                             stepsize_groups=groups, impl=impl, **META_HP)
    for t in range(steps):
        for p, g in zip(params, grads_at([p.detach() for p in params], curvature, noise[t])):
            p.grad = g
        opt.step()
    return opt, params


@pytest.mark.parametrize("groups", ["scalar", "layerwise", "nodewise", "weightwise", [1, 3]], ids=str)
@pytest.mark.parametrize("meta", ["fixed", "Adam", "Lion"])
def test_the_fused_step_equals_the_foreach_step(meta, groups):
    fused, params_f = run_impl("fused", groups, meta)
    foreach, params_e = run_impl("foreach", groups, meta)
    assert type(fused._fused).__name__ == "AroundCImpl" and foreach._fused is None
    assert_close_runs(fused, params_f, foreach, params_e)
    for p, q in zip(params_f, params_e):  # and the traces
        if meta != "fixed":
            torch.testing.assert_close(fused.state[p]["trace"], foreach.state[q]["trace"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["Adafactor", "Muon+AdamW", "lion_pytorch.Lion"])
def test_the_fused_step_equals_the_foreach_step_for_other_bases(name):
    fused, params_f = run_impl("fused", "nodewise", "Adam", base=name)
    foreach, params_e = run_impl("foreach", "nodewise", "Adam", base=name)
    assert_close_runs(fused, params_f, foreach, params_e)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_both_impls_follow_the_float64_reference(impl, monkeypatch):
    import common.optimizers.around as around

    real = around.make_around_impl
    monkeypatch.setattr(around, "make_around_impl", lambda _impl, *a: real(impl, *a))
    opt, params, ref = run_against_around_reference("AdamW", "layerwise")
    assert (opt._fused is None) == (impl == "foreach")
    assert_follows_reference(opt, params, ref)


def test_the_fused_step_falls_back_on_non_contiguous_tensors():
    """A transposed parameter cannot go to the C loop: the program's foreach runs it, same result."""
    torch.manual_seed(0)
    runs = []
    for impl in ("fused", "foreach"):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(5, 4).t())  # non-contiguous
        opt = MetaOptimizeAround(torch.optim.AdamW([w], lr=1e-2), meta_stepsize=1e-2, impl=impl)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            w.grad = torch.randn(4, 5, generator=gen)
            opt.step()
        runs.append((w.detach().clone(), opt.step_sizes()))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])


def test_load_state_dict_into_the_same_optimizer_continues_as_before():
    """The fused step caches the traces' pointers: loading a state dict (new trace tensors) must reset them."""
    model, opt = small_run()
    train(model, opt, 4)
    weights, saved = copy.deepcopy(list(model.parameters())), copy.deepcopy(opt.state_dict())
    train(model, opt, 4, seed=2)
    after = [p.detach().clone() for p in model.parameters()], opt.step_sizes().clone()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    opt.load_state_dict(saved)
    train(model, opt, 4, seed=2)
    for p, q in zip(model.parameters(), after[0]):
        assert torch.equal(p.detach(), q)
    assert torch.equal(opt.step_sizes(), after[1])


def test_bad_impl_is_a_value_error():
    with pytest.raises(ValueError, match="impl"):
        MetaOptimize.around(torch.optim.AdamW([nn.Parameter(torch.zeros(2))]), impl="nope")


# ---- memory: at most 2 extra floats per weight --------------------------------------------------

def wrapper_bytes(opt):
    """The wrapper's own tensors, not the base's state: per-tensor state (w0, h), and the per-block
    vectors (beta, meta state, z) with the fused step's buffers."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    per_tensor = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    per_block = [opt._beta, *opt._meta_state.values(), *([opt._z] if opt._z is not None else [])]
    if opt._fused is not None:
        per_block += [plan["partials"] for plan in opt._fused._plans.values()]
    return size(per_tensor), size(per_block)


@pytest.mark.parametrize("meta", ["fixed", "Adam"])
@pytest.mark.parametrize("groups", ["scalar", "layerwise", "nodewise"])
def test_the_wrapper_keeps_at_most_two_floats_per_weight(groups, meta):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = MetaOptimize.around(torch.optim.AdamW(model.parameters(), lr=1e-3), alg_meta=meta, stepsize_groups=groups)
    train_model = nn.functional.mse_loss
    x, y = torch.randn(8, 64), torch.randn(8, 10)
    for _ in range(2):
        opt.zero_grad()
        train_model(model(x), y).backward()
        opt.step()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_tensor, per_block = wrapper_bytes(opt)
    assert per_tensor == (1 if meta == "fixed" else 2) * weight_bytes  # w0 (and h, with a meta rule)
    assert per_block <= 4 * 8 * opt.num_blocks + 8 * 64  # beta, meta state, z (and the chunks' partial sums)
    # the state dict holds the traces, not w0 (a scratch buffer)
    meta_sd = opt.state_dict()["meta"]
    assert "w0" not in meta_sd and all(t is None or t.numel() for t in meta_sd["trace"])


# ---- step sizes and defaults ---------------------------------------------------------------------

def test_step_sizes_are_alpha_and_the_logs_lr_alpha():
    from common.step_metrics import effective_step_sizes

    p, q = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(2))
    base = torch.optim.AdamW([{"params": [p], "lr": 0.1}, {"params": [q]}], lr=0.01)
    opt = MetaOptimize.around(base, alpha0=0.5, stepsize_groups="nodewise")
    torch.testing.assert_close(opt.step_sizes(), torch.full((5,), 0.5))
    torch.testing.assert_close(effective_step_sizes(opt), torch.tensor([0.05, 0.05, 0.05, 0.005, 0.005]))
    one = MetaOptimize.around(torch.optim.AdamW([p, q], lr=0.01), alpha0=0.5)
    torch.testing.assert_close(effective_step_sizes(one), torch.tensor([0.005]))
    sched = torch.optim.lr_scheduler.StepLR(one, step_size=1, gamma=0.1)
    p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    one.step()
    sched.step()  # the logs follow the base's scheduled lr; alpha stays alpha
    torch.testing.assert_close(effective_step_sizes(one), 1e-3 * one.step_sizes())


def test_meta_defaults_are_the_documented_ones():
    import inspect

    around_sig = inspect.signature(MetaOptimize.around).parameters
    class_sig = inspect.signature(MetaOptimizeAround.__init__).parameters
    for name in ("alg_meta", "alpha0", "meta_stepsize", "gamma", "stepsize_groups", "weight_decay_meta",
                 "normalizer_param_meta", "momentum_param_meta", "lion_beta2_meta", "impl"):
        assert around_sig[name].default == class_sig[name].default, name
    mo_sig = inspect.signature(MetaOptimize.__init__).parameters
    for name in ("weight_decay_meta", "momentum_param_meta", "lion_beta2_meta"):  # as MetaOptimize's
        assert around_sig[name].default == mo_sig[name].default, name
    # MetaOptimize leaves normalizer_param_meta unset (its default meta rule, Lion, does not read it);
    # around's default rule Adam reads it: the paper's 0.999, and unset is an error naming it
    assert around_sig["normalizer_param_meta"].default == 0.999 and mo_sig["normalizer_param_meta"].default is None
    p = [nn.Parameter(torch.zeros(2))]
    assert MetaOptimize.around(torch.optim.AdamW(p)).meta_hp["normalizer_param"] == 0.999
    with pytest.raises(ValueError, match="normalizer_param_meta"):
        MetaOptimize.around(torch.optim.AdamW(p), normalizer_param_meta=None)


# ---- the torch.compile step (CUDA's), on CPU with a cheap backend -----------------------------

@pytest.mark.parametrize("groups", ["scalar", "nodewise", "weightwise"])
def test_the_compiled_step_equals_the_foreach_step(compiled, groups):
    fused, params_f = run_impl("fused", groups, "Adam", steps=6)
    assert type(fused._fused).__name__ == "AroundCompiledImpl" and fused._fused.name == "fused"
    foreach, params_e = run_impl("foreach", groups, "Adam", steps=6)
    assert_close_runs(fused, params_f, foreach, params_e)


def test_a_failing_torch_compile_falls_back_to_foreach_with_one_warning(compiled):
    def broken(*args, **kwargs):
        raise RuntimeError("triton: no usable driver")

    compiled.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="no usable driver"):
        auto, params_a = run_impl("auto", "layerwise", "Adam", steps=6)
    assert auto._fused.name == "foreach"
    foreach, params_e = run_impl("foreach", "layerwise", "Adam", steps=6)
    assert_close_runs(auto, params_a, foreach, params_e)
    with pytest.raises(RuntimeError, match="impl='fused'"):
        run_impl("fused", "layerwise", "Adam", steps=1)
