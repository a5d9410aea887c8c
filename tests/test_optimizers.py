"""MetaOptimize against the plain float64 statement of the spec (`common.optimizers.reference`).

Every step implementation ("foreach", "fused") runs every base x meta pair and every kind of
step-size block against the reference; resume is bit-for-bit on each; the special cases of spec
section 6 hold.
"""

import argparse
import copy
import io
import math
import os
import pickle

import pytest
import torch
import torch.nn as nn

from common.optim_flags import add_optimizer_args, build_optimizer, check_optimizer_args
from common.optimizers import MetaOptimize, MetaOptimize_AdamW_Lion_hg, kernels, resolve_stepsize_groups
from common.optimizers.impl import CompiledImpl
from common.optimizers.reference import Reference, block_ids

BASES = ["SGD", "SGDm", "RMSProp", "AdamW", "Lion"]
METAS = ["fixed", "SGD", "RMSProp", "Adam", "Lion"]
GROUPS = ["scalar", "layerwise", "nodewise", "weightwise", [1, 3], "param_groups"]
IMPLS = ["foreach", "fused"]
SHAPES = [(6, 5), (6,), (3, 2, 3, 3), (3,)]

HP = dict(
    weight_decay_base=0.1, momentum_param_base=0.9, normalizer_param_base=0.999, lion_beta2_base=0.9,
    weight_decay_meta=0.01, momentum_param_meta=0.9, normalizer_param_meta=0.99, lion_beta2_meta=0.9,
)


def split_hp(hp):
    """Constructor keywords -> (base, meta) hyperparameter dicts of the reference."""
    base = {k[: -len("_base")]: v for k, v in hp.items() if k.endswith("_base")}
    meta = {k[: -len("_meta")]: v for k, v in hp.items() if k.endswith("_meta")}
    return base, meta


def make_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen) for s in SHAPES]
    curvature = [torch.rand(s, generator=gen) + 0.5 for s in SHAPES]
    noise = [[torch.randn(s, generator=gen) * 0.3 for s in SHAPES] for _ in range(60)]
    return weights, curvature, noise


def grads_at(ws, curvature, noise_t):
    # gradient of a noisy quadratic: each implementation follows its own weights
    return [a * w.to(a.dtype) + n for w, a, n in zip(ws, curvature, noise_t)]


def param_list(weights, groups, group_hp=None):
    """The parameters, as one list or as two param groups (with their own hyperparameters)."""
    params = [nn.Parameter(w.clone()) for w in weights]
    if groups == "param_groups" or group_hp:
        first, second = group_hp or ({}, {})
        return params, [{"params": params[:2], **first}, {"params": params[2:], **second}]
    return params, params


def step_with_reference(opt, params, ref, curvature, noise, steps):
    """`steps` steps of the optimizer and of the reference on the same noisy quadratic."""
    curvature64 = [a.double() for a in curvature]
    for t in range(steps):
        for p, g in zip(params, grads_at([p.detach() for p in params], curvature, noise[t])):
            p.grad = g
        opt.step()
        ref.step(grads_at(ref.w, curvature64, [n.double() for n in noise[t]]))


def assert_follows_reference(opt, params, ref, alpha_atol=1e-9, sizes=None):
    """Weights and step sizes (`sizes`, else opt.step_sizes()) agree with the float64 reference to
    float32 accuracy."""
    for p, w in zip(params, ref.w):
        torch.testing.assert_close(p.detach().double(), w, rtol=2e-4, atol=2e-5)
    sizes = opt.step_sizes() if sizes is None else sizes
    torch.testing.assert_close(sizes.double(), torch.exp(ref.beta), rtol=2e-4, atol=alpha_atol)


def run_against_reference(base, meta, groups, impl, gamma=0.95, steps=50, group_hp=None, **extra):
    """50 steps of MetaOptimize and of the reference on the same noisy quadratic; checks w and alpha."""
    weights, curvature, noise = make_problem()
    alpha0 = 3e-2 if base in ("SGD", "SGDm") else 1e-2
    eta = 2e-2
    params, arg = param_list(weights, groups, group_hp)
    opt = MetaOptimize(arg, alg_base=base, alg_meta=meta, alpha0=alpha0, meta_stepsize=eta, gamma=gamma,
                       stepsize_groups=groups, impl=impl, **HP, **extra)
    assert opt.impl == impl
    base_hp, meta_hp = split_hp(HP)
    per_tensor = [base_hp] * len(weights)
    if group_hp:
        per_tensor = [{**base_hp, **split_hp(group_hp[0 if i < 2 else 1])[0]} for i in range(len(weights))]
    ref = Reference(weights, base, meta, alpha0, eta, gamma, block_ids(SHAPES, groups, [2, 2]), per_tensor, meta_hp)
    step_with_reference(opt, params, ref, curvature, noise, steps)
    assert_follows_reference(opt, params, ref)
    if meta != "fixed":
        assert not torch.allclose(ref.beta, torch.full_like(ref.beta, math.log(alpha0))), "beta should move"
    return opt, ref, params


@pytest.mark.parametrize("groups", GROUPS, ids=str)
@pytest.mark.parametrize("meta", METAS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_float64_reference(impl, base, meta, groups):
    run_against_reference(base, meta, groups, impl)


@pytest.mark.parametrize("groups", ["scalar", "param_groups", "nodewise"], ids=str)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_param_groups_with_their_own_hyperparameters_match_the_reference(impl, base, groups):
    """Each param group's own kappa, rho, lambda, c, against a reference that takes them per tensor
    (so a grouping that applied the first group's values everywhere would fail)."""
    group_hp = ({"weight_decay_base": 0.0, "momentum_param_base": 0.5},
                {"weight_decay_base": 0.5, "normalizer_param_base": 0.9, "lion_beta2_base": 0.5})
    run_against_reference(base, "Adam", groups, impl, gamma=0.9, group_hp=group_hp)


def test_auto_takes_the_fused_step_on_cpu_and_falls_back_with_one_warning(monkeypatch):
    p = [nn.Parameter(torch.randn(3))]
    assert MetaOptimize(p).impl == "fused"
    assert MetaOptimize(p, impl="foreach").impl == "foreach"
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    monkeypatch.setattr(kernels, "_LOADED", {})
    with pytest.warns(UserWarning, match="no C compiler") as record:
        assert MetaOptimize(p).impl == "foreach"
    assert len(record) == 1
    with pytest.raises(RuntimeError, match="no C compiler"):
        MetaOptimize(p, impl="fused")
    with pytest.raises(ValueError, match="impl"):
        MetaOptimize(p, impl="triton")


def test_fused_kernel_is_compiled_once_and_cached_on_disk(tmp_path, monkeypatch):
    """The step and the meta update are one shared object each; a new process loads them."""
    monkeypatch.setenv("METAOPTIMIZE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_LOADED", {})
    MetaOptimize([nn.Parameter(torch.randn(3))], alg_base="RMSProp", alg_meta="SGD")
    built = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("mo_*.so")}
    assert sorted(name.split("_")[1] for name in built) == ["meta", "step"]
    monkeypatch.setattr(kernels, "_LOADED", {})  # a new process: loads the cached files
    MetaOptimize([nn.Parameter(torch.randn(3))], alg_base="RMSProp", alg_meta="SGD")
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("mo_*.so")} == built


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_and_foreach_take_float64_parameters(impl):
    """float64 parameters run in float64 (the reference's precision): agreement to ~1e-12."""
    weights, curvature, noise = make_problem(3)
    params = [nn.Parameter(w.double()) for w in weights]
    opt = MetaOptimize(params, alg_base="AdamW", alg_meta="Adam", alpha0=1e-2, meta_stepsize=2e-2, gamma=0.9,
                       impl=impl, **HP)
    base_hp, meta_hp = split_hp(HP)
    ref = Reference(weights, "AdamW", "Adam", 1e-2, 2e-2, 0.9, block_ids(SHAPES, "scalar"), base_hp, meta_hp)
    step_with_reference(opt, params, ref, [a.double() for a in curvature],
                        [[n.double() for n in noise_t] for noise_t in noise], 30)
    for p, w in zip(params, ref.w):
        torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_state_halves_state_memory_and_follows_float32(impl):
    weights, curvature, noise = make_problem(4)
    runs = {}
    for dtype in (None, torch.bfloat16):
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = MetaOptimize(params, alg_base="AdamW", alg_meta="Lion", alpha0=1e-2, meta_stepsize=1e-2,
                           impl=impl, state_dtype=dtype, **HP)
        for t in range(30):
            for p, g in zip(params, grads_at([p.detach() for p in params], curvature, noise[t])):
                p.grad = g
            opt.step()
        state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                          if torch.is_tensor(v))
        runs[dtype] = (params, opt, state_bytes)
    (p32, _, b32), (p16, o16, b16) = runs[None], runs[torch.bfloat16]
    assert b16 * 2 == b32
    assert all(v.dtype == torch.bfloat16 for s in o16.state.values() for k, v in s.items() if k != "step")
    for a, b in zip(p32, p16):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)


# ---- special cases of spec section 6 ---------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_fixed_meta_is_the_base_update_with_step_alpha0(impl):
    """SGD base with fixed meta is torch SGD with lr = alpha0 and the same weight decay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    twin = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    ours = MetaOptimize(model.parameters(), alg_base="SGD", alg_meta="fixed", alpha0=0.05, weight_decay_base=0.1,
                        impl=impl)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.05, weight_decay=0.1)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for _ in range(30):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.step_sizes(), torch.tensor(0.05))


@pytest.mark.parametrize("impl", IMPLS)
def test_gamma_zero_sgd_meta_is_hypergradient_descent(impl):
    """gamma = 0: h = -Delta_{t-1}, so z_t = -Delta_{t-1}.g_t and beta_t = beta_{t-1} + eta Delta_{t-1}.g_t."""
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(20))
    eta, alpha0 = 0.1, 0.05
    opt = MetaOptimize([p], alg_base="SGD", alg_meta="SGD", alpha0=alpha0, meta_stepsize=eta, gamma=0.0,
                       weight_decay_base=0.0, impl=impl)
    beta = math.log(alpha0)
    prev_delta = torch.zeros(20)
    for _ in range(5):
        g = torch.randn(20)
        p.grad = g.clone()
        w_before = p.detach().clone()
        opt.step()
        beta = beta + eta * float(prev_delta @ g)
        prev_delta = w_before - p.detach()
        assert math.isclose(math.log(opt.step_sizes().item()), beta, rel_tol=1e-5, abs_tol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_lion_lion_moves_by_exact_signs(impl):
    """Lion base and Lion meta: beta moves by exactly +-eta; each weight by exactly alpha (1 + kappa w) in size."""
    torch.manual_seed(2)
    p = nn.Parameter(torch.randn(50))
    eta, kappa = 1e-2, 0.1
    opt = MetaOptimize([p], alg_base="Lion", alg_meta="Lion", alpha0=1e-3, meta_stepsize=eta,
                       weight_decay_base=kappa, momentum_param_base=0.99, lion_beta2_base=0.9,
                       momentum_param_meta=0.99, lion_beta2_meta=0.9, impl=impl)
    beta_prev = math.log(1e-3)
    for t in range(20):
        p.grad = torch.randn(50)
        alpha = math.exp(beta_prev)
        w_before = p.detach().double().clone()
        opt.step()
        step = (w_before * (1 - alpha * kappa) - p.detach().double()).abs()
        # exact up to float32 rounding of w (|w| ~ 2, ulp 2.4e-7)
        torch.testing.assert_close(step, torch.full_like(step, alpha), rtol=0, atol=1e-6)
        beta = math.log(opt.step_sizes().item())
        expected = 0.0 if t == 0 else eta  # z_1 = 0 (h_0 = 0) and m_bar_0 = 0
        assert math.isclose(abs(beta - beta_prev), expected, abs_tol=1e-6)
        beta_prev = beta


# ---- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(alpha0=0.0), "alpha0"),
        (dict(alpha0=-1e-3), "alpha0"),
        (dict(gamma=1.5), "gamma"),
        (dict(gamma=-0.1), "gamma"),
        (dict(alg_base="Lion"), "lion_beta2_base"),
        (dict(alg_base="Lion", lion_beta2_base=1.0), "lion_beta2_base"),
        (dict(momentum_param_base=1.0), "momentum_param_base"),
        (dict(normalizer_param_base=None), "normalizer_param_base"),
        (dict(weight_decay_base=-0.1), "weight_decay_base"),
        (dict(alg_meta="Adam"), "normalizer_param_meta"),
        (dict(alg_meta="Adam", normalizer_param_meta=0.999, momentum_param_meta=-0.5), "momentum_param_meta"),
        (dict(alg_meta="Lion", lion_beta2_meta=None), "lion_beta2_meta"),
        (dict(meta_stepsize=-1e-3), "meta_stepsize"),
        (dict(meta_stepsize=float("inf")), "meta_stepsize"),
        (dict(hessian="full"), "hessian"),
        (dict(rectify=True), "rectify"),
        (dict(alg_base="Nesterov"), "alg_base"),
        (dict(alg_meta="adagrad"), "alg_meta"),
        (dict(stepsize_groups=[1, 2]), "stepsize_groups"),
        (dict(stepsize_groups="resnet18_blocks"), "stepsize_groups"),
        (dict(stepsize_groups="blockwise"), "stepsize_groups"),
        (dict(stepsize_groups=[3, 0]), "stepsize_groups"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, needle):
    params = [nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=needle):
        MetaOptimize(params, **kwargs)


def test_unused_parameters_are_ignored_and_names_are_case_insensitive():
    params = [nn.Parameter(torch.randn(3))]
    # SGD base reads no betas; fixed meta reads nothing (even a nonsense meta step size)
    opt = MetaOptimize(params, alg_base="sgd", alg_meta="FIXED", momentum_param_base=7.0, normalizer_param_base=None,
                       lion_beta2_base=-1.0, meta_stepsize=-5.0, momentum_param_meta=None)
    assert (opt.alg_base, opt.alg_meta) == ("SGD", "fixed")
    assert MetaOptimize(params, alg_base="adam").alg_base == "AdamW"
    assert MetaOptimize(params, stepsize_groups="[1]").num_blocks == 1


def test_named_groups_and_lists():
    assert resolve_stepsize_groups("resnet18_blocks", 62) == ("tensor", [3, 12, 15, 15, 15, 2])
    assert resolve_stepsize_groups("transformer_blocks_15m", 56)[1] == [1, 9, 9, 9, 9, 9, 10]
    assert resolve_stepsize_groups("last_layer_and_others", 8) == ("tensor", [6, 2])
    assert resolve_stepsize_groups("[2, 3]", 5) == ("tensor", [2, 3])
    assert resolve_stepsize_groups((4, 1), 5) == ("tensor", [4, 1])


def _train(opt_factory, steps, state=None, model_state=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    if model_state is not None:
        model.load_state_dict(model_state)
    opt = opt_factory(model)
    if state is not None:
        opt.load_state_dict(state)
    gen = torch.Generator().manual_seed(1234 + (0 if state is None else 1))
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 4, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def assert_resume_is_bit_for_bit(factory):
    # uninterrupted: 10 steps with stream A, then 10 with stream B
    model, opt = _train(factory, 10)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    gen = torch.Generator().manual_seed(1235)
    for _ in range(10):
        x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 4, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # resumed: a fresh process-like start from the saved bytes
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, ropt = _train(factory, 10, state=saved["opt"], model_state=saved["model"], seed=99)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.step_sizes(), ropt.step_sizes())
    return opt


@pytest.mark.parametrize("groups", ["scalar", "layerwise", "nodewise", "weightwise", [2, 2], "last_layer_and_others"],
                         ids=str)
@pytest.mark.parametrize("base, meta", [("AdamW", "Lion"), ("Lion", "Lion"), ("RMSProp", "Adam"), ("SGDm", "RMSProp"),
                                        ("SGD", "SGD"), ("AdamW", "fixed")])
@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_resume_is_bit_for_bit(impl, base, meta, groups):
    def factory(model):
        return MetaOptimize(model.parameters(), alg_base=base, alg_meta=meta, alpha0=1e-3, meta_stepsize=1e-2,
                            stepsize_groups=groups, impl=impl, **HP)

    assert_resume_is_bit_for_bit(factory)


@pytest.mark.parametrize("impl", IMPLS)
def test_checkpoints_move_between_implementations(impl):
    """One state form: a checkpoint of one implementation continues on the other."""
    other = "foreach" if impl == "fused" else "fused"

    def factory(which):
        return lambda model: MetaOptimize(model.parameters(), alg_base="AdamW", alg_meta="Adam", alpha0=1e-2,
                                          meta_stepsize=1e-2, gamma=0.9, stepsize_groups=[2, 2], impl=which, **HP)

    model, opt = _train(factory(impl), 10)
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    same, same_opt = _train(factory(impl), 10, state=copy.deepcopy(saved["opt"]), model_state=saved["model"])
    moved, moved_opt = _train(factory(other), 10, state=copy.deepcopy(saved["opt"]), model_state=saved["model"])
    for a, b in zip(same.parameters(), moved.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(same_opt.step_sizes(), moved_opt.step_sizes(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["adamw_adam_scalar", "rmsprop_lion_blocks", "sgdm_sgd_nodewise"])
def test_checkpoints_of_the_earlier_state_format_still_load(name):
    """tests/data/legacy_format1_checkpoints.pt: checkpoints written by the optimizer before this state
    form (EMA-form moments, CPU traces stored as h / trace_scale), with the weights and step sizes that
    optimizer reached 10 steps later. Loaded here, the same 10 steps reach the same numbers."""
    case = torch.load(os.path.join(os.path.dirname(__file__), "data", "legacy_format1_checkpoints.pt"),
                      weights_only=True)[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    model.load_state_dict(case["checkpoint"]["model"])
    opt = MetaOptimize(model.parameters(), alpha0=1e-2, meta_stepsize=1e-2, **HP, **case["kwargs"])
    opt.load_state_dict(case["checkpoint"]["opt"])
    for x, y in case["data"]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, case["final_model"][k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(opt.step_sizes(), case["final_alpha"], rtol=1e-4, atol=0)


def test_load_state_dict_rejects_other_layout():
    p = [nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3))]
    sd = MetaOptimize(p, stepsize_groups="layerwise").state_dict()
    with pytest.raises(ValueError, match="blocks"):
        MetaOptimize(p, stepsize_groups="scalar").load_state_dict(sd)


@pytest.mark.parametrize("impl", IMPLS)
def test_deepcopy_pickle_and_torch_save_give_a_working_optimizer(impl):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = MetaOptimize(model.parameters(), alpha0=1e-2, meta_stepsize=1e-2, impl=impl)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    twin = copy.deepcopy({"model": model, "opt": opt})
    loaded = pickle.loads(pickle.dumps({"model": model, "opt": opt}))
    for copy_ in (twin, loaded):
        copy_["opt"].zero_grad()
        copy_["model"](torch.ones(3, 4)).sum().backward()
        copy_["opt"].step()
    opt.zero_grad()
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    for copy_ in (twin, loaded):
        assert copy_["opt"].impl == impl
        assert torch.equal(copy_["opt"].step_sizes(), opt.step_sizes())
        for a, b in zip(copy_["model"].parameters(), model.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("meta", METAS[1:])
def test_weightwise_fused_step_does_the_meta_update_in_its_own_pass(meta, dtype, monkeypatch):
    """Weight-wise blocks on CPU: alpha = exp(beta), base update, trace, z and the meta update in one C
    pass per weight (neither the separate meta pass nor the Python meta update runs), equal to foreach."""
    import common.optimizers.impl as impl_mod
    from common.optimizers.impl import CImpl

    def refuse(*args, **kwargs):
        raise AssertionError("a second pass over the blocks ran")

    weights, curvature, noise = make_problem(5)
    weights = [w.to(dtype) for w in weights]
    runs = {}
    for impl in IMPLS:
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = MetaOptimize(params, alg_base="AdamW", alg_meta=meta, alpha0=1e-2, meta_stepsize=2e-2,
                           stepsize_groups="weightwise", impl=impl, **HP)
        with monkeypatch.context() as m:
            if impl == "fused":
                assert opt._impl.fuses_meta
                m.setattr(impl_mod, "meta_update", refuse)
                m.setattr(CImpl, "meta_update", refuse)
            for t in range(20):
                for p, g in zip(params, grads_at([p.detach() for p in params], curvature, noise[t])):
                    p.grad = g.to(dtype)
                opt.step()
        runs[impl] = (params, opt.step_sizes(), opt._meta_state)
    (pf, af, sf), (pe, ae, se) = runs["fused"], runs["foreach"]
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for a, b in zip(pf, pe):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(af, ae, **tol)
    # exp(beta) in the C loop (glibc's vector and scalar expf) and torch.exp differ in the last bit;
    # over 20 steps the meta state, normalised by Adam's and RMSProp's sqrt, carries up to ~2e-5 of it
    meta_tol = dict(tol, rtol=3e-5) if dtype == torch.float32 else tol
    for k in sf:
        torch.testing.assert_close(sf[k], se[k], **meta_tol)


def test_weightwise_fused_meta_update_keeps_beta_where_z_is_not_finite_and_counts_it():
    """A weight whose z = h g is not finite keeps its beta and meta state (as meta_update); the kernel
    counts it in `skipped` (a tensor: no host sync in step)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    opt = MetaOptimize(params, alg_base="AdamW", alg_meta="Adam", alpha0=1e-2, meta_stepsize=1e-1,
                       stepsize_groups="weightwise", impl="fused", **HP)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # h is 0 at the first step: z = 0 everywhere
    before = opt._beta.clone(), {k: v.clone() for k, v in opt._meta_state.items()}
    params[0].grad = torch.randn(4, 3)
    params[0].grad[1, 2] = float("inf")  # z = h g = +-inf there
    params[1].grad = torch.randn(5)
    params[1].grad[0] = float("nan")
    opt.step()
    bad = torch.zeros(17, dtype=torch.bool)
    bad[5] = bad[12] = True
    assert torch.equal(opt._beta[bad], before[0][bad])
    assert torch.all(opt._beta[~bad] != before[0][~bad])
    for k, v in opt._meta_state.items():
        assert torch.equal(v[bad], before[1][k][bad])
    assert opt.skipped_nonfinite.item() == 2


@pytest.mark.parametrize("groups", ["scalar", "weightwise"])
@pytest.mark.parametrize("impl", IMPLS)
def test_params_without_grad_are_skipped_without_breaking_blocks(impl, groups):
    torch.manual_seed(3)
    weights = [torch.randn(4, 3), torch.randn(5), torch.randn(4)]
    full = [nn.Parameter(w.clone()) for w in weights]
    reduced = [nn.Parameter(w.clone()) for w in (weights[0], weights[2])]
    kw = dict(alg_base="AdamW", alg_meta="Adam", alpha0=1e-2, meta_stepsize=1e-2, stepsize_groups=groups, impl=impl, **HP)
    a, b = MetaOptimize(full, **kw), MetaOptimize(reduced, **kw)
    for _ in range(15):
        g0, g2 = torch.randn(4, 3), torch.randn(4)
        full[0].grad, full[2].grad = g0.clone(), g2.clone()
        reduced[0].grad, reduced[1].grad = g0.clone(), g2.clone()
        a.step()
        b.step()
    assert torch.equal(full[1].detach(), weights[1])  # untouched
    torch.testing.assert_close(full[0], reduced[0])
    torch.testing.assert_close(full[2], reduced[1])
    if groups == "scalar":
        torch.testing.assert_close(a.step_sizes(), b.step_sizes())
    else:  # the skipped tensor's blocks keep alpha0
        sizes = a.step_sizes()
        assert torch.all(sizes[12:17] == torch.tensor(1e-2))


def test_closure_and_zero_grad():
    p = nn.Parameter(torch.ones(3))
    opt = MetaOptimize([p], alpha0=1e-2)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 3.0 and (p < 1).all()
    opt.zero_grad()
    assert p.grad is None


def test_step_runs_on_meta_device_so_it_never_reads_values_on_the_host():
    """Tensors on the 'meta' device have no data: any .item()/.tolist()/bool() in step() would raise."""
    for base, meta, groups in [("AdamW", "Lion", "scalar"), ("RMSProp", "Adam", [1, 1]), ("Lion", "RMSProp", "nodewise"),
                               ("SGDm", "SGD", "weightwise")]:
        params = [nn.Parameter(torch.empty(4, 3, device="meta")), nn.Parameter(torch.empty(3, device="meta"))]
        opt = MetaOptimize(params, alg_base=base, alg_meta=meta, stepsize_groups=groups, **HP)
        for _ in range(2):
            for p in params:
                p.grad = torch.empty_like(p)
            opt.step()
        assert opt.step_sizes().device.type == "meta"


# ---- the authors' packaged class -------------------------------------------------------------


def hg_reference(weights, grads_seq, alpha0, eta, gamma, b1, b2, mb1, mc1, wd, counts):
    w = [x.double().clone() for x in weights]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    h = [torch.zeros_like(x) for x in w]
    beta = [math.log(alpha0)] * len(counts)
    mbar = [0.0] * len(counts)
    block_of = [b for b, c in enumerate(counts) for _ in range(c)]
    for t, grads in enumerate(grads_seq(w), start=1):
        z = [0.0] * len(counts)
        alpha = [math.exp(b) for b in beta]
        for i, g in enumerate(grads):
            a = alpha[block_of[i]]
            b1h, b2h = (1 - b1) / (1 - b1**t), (1 - b2) / (1 - b2**t)
            m[i] = (1 - b1h) * m[i] + b1h * g
            v[i] = (1 - b2h) * v[i] + b2h * g * g
            w[i] = w[i] - a * wd * w[i]
            w[i] = w[i] - a * m[i] / (v[i].sqrt() + 1e-8)
            z[block_of[i]] += float((h[i] * g).sum())
            h[i] = gamma * (1 - a * wd) * h[i] + a * g / (v[i].sqrt() + 1e-8)
        for b in range(len(counts)):
            mbar[b] = mb1 * mbar[b] + (1 - mb1) * z[b]
            beta[b] += eta * math.copysign(1.0, mc1 * mbar[b] + (1 - mc1) * z[b]) if (mc1 * mbar[b] + (1 - mc1) * z[b]) else 0.0
    return w, [math.exp(b) for b in beta]


def test_packaged_class_matches_its_spec():
    weights, curvature, noise = make_problem(5)
    kw = dict(meta_stepsize=1e-2, alpha0=1e-2, stepsize_blocks=[2, 2], gamma=0.99, b1=0.9, b2=0.999, meta_b1=0.99,
              meta_c1=0.9, weight_decay=0.1)
    params = [nn.Parameter(w.clone()) for w in weights]
    opt = MetaOptimize_AdamW_Lion_hg(params, **kw)
    steps = 30
    for t in range(steps):
        for p, g in zip(params, grads_at([p.detach() for p in params], curvature, noise[t])):
            p.grad = g
        opt.step()

    def seq(w):
        for t in range(steps):
            yield grads_at(w, [a.double() for a in curvature], [n.double() for n in noise[t]])

    ref_w, ref_alpha = hg_reference(weights, seq, 1e-2, 1e-2, 0.99, 0.9, 0.999, 0.99, 0.9, 0.1, [2, 2])
    for p, w in zip(params, ref_w):
        torch.testing.assert_close(p.detach().double(), w, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(opt.step_sizes().double(), torch.tensor(ref_alpha, dtype=torch.float64), rtol=1e-4, atol=0)


def test_readme_example_trains_mlp_with_only_the_import_changed():
    """The MNIST example of the authors' README on generated 28x28 data (no download here)."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(28 * 28, 50)
            self.fc2 = nn.Linear(50, 10)

        def forward(self, x):
            x = x.view(-1, 28 * 28)
            x = F.relu(self.fc1(x))
            return self.fc2(x)

    torch.manual_seed(0)
    labels = torch.randint(0, 10, (6400,))
    prototypes = torch.rand(10, 1, 28, 28)
    images = (prototypes[labels] + 0.3 * torch.rand(6400, 1, 28, 28)).clamp(0, 1)
    trainloader = DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True)
    model = MLP()
    criterion = nn.CrossEntropyLoss()
    optimizer = MetaOptimize_AdamW_Lion_hg(model.parameters(), meta_stepsize=1e-3, alpha0=1e-4,
                                           stepsize_blocks="scalar", gamma=1.0, b1=0.9, b2=0.999, meta_b1=0.99,
                                           meta_c1=0.9, weight_decay=0.1)
    losses = []
    for _epoch in range(5):
        total_loss, total = 0.0, 0
        for inputs, labels_ in trainloader:
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels_)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * inputs.size(0)
            total += labels_.size(0)
        losses.append(total_loss / total)
    assert losses[-1] < 0.5 * losses[0], losses
    assert optimizer.step_sizes().item() > 1e-4  # the step size grew from its conservative start


@pytest.mark.slow
@pytest.mark.parametrize("base, meta, groups", [("AdamW", "Lion", "scalar"), ("RMSProp", "Adam", "weightwise"),
                                                 ("Lion", "SGD", "nodewise"), ("SGDm", "RMSProp", [1, 3])], ids=str)
def test_compiled_step_matches_the_reference(base, meta, groups, monkeypatch):
    """The CUDA "fused" step (the rule under torch.compile), run on CPU, gives the spec's numbers."""
    import common.optimizers.metaoptimize as mo

    monkeypatch.setattr(mo, "make_impl", lambda impl, base_rule, track, layout, *args: CompiledImpl(
        base_rule, track, layout, meta=args[-1]))
    weights, curvature, noise = make_problem(7)
    alpha0, eta, gamma = 1e-2, 2e-2, 0.95
    params = [nn.Parameter(w.clone()) for w in weights]
    opt = MetaOptimize(params, alg_base=base, alg_meta=meta, alpha0=alpha0, meta_stepsize=eta, gamma=gamma,
                       stepsize_groups=groups, **HP)
    assert isinstance(opt._impl, CompiledImpl)
    base_hp, meta_hp = split_hp(HP)
    ref = Reference(weights, base, meta, alpha0, eta, gamma, block_ids(SHAPES, groups), base_hp, meta_hp)
    step_with_reference(opt, params, ref, curvature, noise, 30)
    assert_follows_reference(opt, params, ref)


@pytest.mark.parametrize("meta", METAS[1:])
def test_compiled_weightwise_step_with_its_meta_update_matches_the_reference(meta, monkeypatch):
    """The compiled step's weight-wise path (alpha = exp(beta), step, z and meta update in one
    function), with torch.compile's cheap "eager" backend: the spec's numbers; a non-finite z keeps
    its weight's beta and is counted."""
    import common.optimizers.impl as impl_mod
    import common.optimizers.metaoptimize as mo

    torch._dynamo.reset()
    monkeypatch.setattr(impl_mod, "_COMPILE_BACKEND", "eager")
    monkeypatch.setattr(mo, "make_impl", lambda impl, base_rule, track, layout, *args: CompiledImpl(
        base_rule, track, layout, meta=args[-1]))
    monkeypatch.setattr(impl_mod, "meta_update", lambda *a, **k: pytest.fail("the separate meta update ran"))
    weights, curvature, noise = make_problem(7)
    alpha0, eta, gamma = 1e-2, 2e-2, 0.95
    params = [nn.Parameter(w.clone()) for w in weights]
    opt = MetaOptimize(params, alg_base="AdamW", alg_meta=meta, alpha0=alpha0, meta_stepsize=eta, gamma=gamma,
                       stepsize_groups="weightwise", **HP)
    assert opt._impl.fuses_meta
    base_hp, meta_hp = split_hp(HP)
    ref = Reference(weights, "AdamW", meta, alpha0, eta, gamma, block_ids(SHAPES, "weightwise"), base_hp, meta_hp)
    step_with_reference(opt, params, ref, curvature, noise, 20)
    assert_follows_reference(opt, params, ref)
    assert opt.skipped_nonfinite.item() == 0
    beta = opt._beta.clone()
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad[0, 0] = float("nan")
    opt.step()
    assert opt._beta[0] == beta[0] and opt.skipped_nonfinite.item() == 1


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--alg-base", "foo"], "--alg-base"),
        (["--alg-meta", "Adam"], "--normalizer-param-meta"),
        (["--alg-base", "Lion"], "--Lion-beta2-base"),
        (["--stepsize-groups", "blockwise"], "--stepsize-groups"),
        (["--stepsize-groups", "[3,x]"], "--stepsize-groups"),
        (["--stepsize-groups", "[3,0]"], "--stepsize-groups"),
        (["--optimizer", "Adamax"], "--optimizer"),
        (["--gamma", "2"], "--gamma"),
        (["--optimizer", "AdamW", "--lr", "0"], "--lr"),
    ],
)
def test_optimizer_flags_are_checked_before_any_model_exists(argv, needle):
    """What train.py runs right after parsing, so a typo fails before a dataset is downloaded."""
    parser = add_optimizer_args(argparse.ArgumentParser())
    with pytest.raises(ValueError, match=needle):
        check_optimizer_args(parser.parse_args(argv))


def test_paper_flags_build_the_paper_default():
    parser = add_optimizer_args(argparse.ArgumentParser())
    args = parser.parse_args(["--stepsize-groups", "[1,1]"])
    check_optimizer_args(args)  # list syntax fine; its sum is checked against the model
    opt = build_optimizer(nn.Linear(3, 2), args)  # -1 = unset: Lion-beta2-base, normalizer-param-meta
    assert (opt.alg_base, opt.alg_meta, opt.alpha0, opt.num_blocks) == ("AdamW", "Lion", 1e-6, 2)
    with pytest.raises(ValueError, match="add up"):
        build_optimizer(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), args)
