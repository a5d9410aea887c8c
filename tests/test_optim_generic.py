"""torch's generic optimizer checks, ported to MetaOptimize and MetaOptimize_AdamW_Lion_hg.

Driven as torch's test/test_optim.py (TestOptimRenewed) drives torch.optim: each class has an
`OptimizerInfo` (torch.testing._internal.common_optimizers) that lists its constructor inputs,
its error inputs (torch's `get_error_inputs_for_all_optims` plus its own) and its LR schedulers;
`_get_optim_inputs_including_global_cliquey_kwargs` adds the implementation flag, and every
check runs over all of them. Where torch's check assumes what MetaOptimize is not, the port says
how it differs:

- lr is a multiplier on the tuned step size (1 by default), so a group without one gets 1, not 1e-3;
- the implementations are "foreach" and "fused" (`impl=`): torch's flag `fused` maps onto them
  (fused=False is foreach), and foreach-vs-fused takes the place of foreach-vs-for-loop;
- a Tensor lr is refused with a clear error (torch supports it), and so are complex parameters by
  MetaOptimize_AdamW_Lion_hg (MetaOptimize steps them as their real views, as torch does);
- "older state dicts" are those saved before lr and weight_decay were param-group keys.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import pickle

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, ReduceLROnPlateau, StepLR

_flags_were_frozen = torch.backends.flags_frozen()
from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
    get_error_inputs_for_all_optims,
)

from common.optimizers import MetaOptimize, MetaOptimize_AdamW_Lion_hg  # noqa: E402

# torch's test utilities freeze the torch.backends flags for the whole process when imported (a
# rule of torch's own suite, kept in a global of torch/backends/__init__.py); the experiments this
# suite runs in-process set them (cudnn.benchmark), so they are thawed again
if not _flags_were_frozen:
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---- the OptimizerInfo of each class ------------------------------------------------------------


def optim_inputs_func_metaoptimize(device, dtype=None):
    """One input per base and meta update, over the kinds of step-size block (no block lists by
    count: the checks give different numbers of tensors)."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default: (AdamW, Lion) scalar, alpha0 1e-6"),
        OptimizerInput(params=None, kwargs=dict(alg_base="SGD", alg_meta="SGD", alpha0=1e-2, meta_stepsize=1e-3),
                       desc="(SGD, SGD)"),
        OptimizerInput(params=None, kwargs=dict(alg_base="SGDm", alg_meta="RMSProp", alpha0=1e-3,
                                                normalizer_param_meta=0.99, stepsize_groups="layerwise"),
                       desc="(SGDm, RMSProp) layerwise"),
        OptimizerInput(params=None, kwargs=dict(alg_base="RMSProp", alg_meta="Adam", alpha0=1e-3,
                                                normalizer_param_meta=0.999, stepsize_groups="nodewise", gamma=0.9),
                       desc="(RMSProp, Adam) nodewise, gamma 0.9"),
        OptimizerInput(params=None, kwargs=dict(alpha0=1e-3, meta_stepsize=1e-2, stepsize_groups="weightwise",
                                                weight_decay=0.01, weight_decay_meta=1e-3),
                       desc="(AdamW, Lion) weightwise, weight decay"),
        OptimizerInput(params=None, kwargs=dict(alg_base="Lion", alg_meta="fixed", alpha0=1e-3, lion_beta2_base=0.99,
                                                stepsize_groups="param_groups"),
                       desc="(Lion, fixed) a block per param group"),
    ]


def optim_error_inputs_func_metaoptimize(device, dtype):
    p = functools.partial(Parameter, torch.randn(2, 3, device=device, dtype=dtype))
    sparse = Parameter(torch.randn(4, device=device, dtype=dtype))
    sparse.grad = torch.randn(4, device=device, dtype=dtype).to_sparse()
    no_graph = Parameter(torch.randn(4, device=device, dtype=dtype))
    no_graph.grad = torch.randn(4, device=device, dtype=dtype)

    def error(kwargs, regex, params=None, error_type=ValueError, on=OptimizerErrorEnum.CONSTRUCTION_ERROR):
        return ErrorOptimizerInput(OptimizerInput(params=[p(), p()] if params is None else params, kwargs=kwargs,
                                                  desc=regex),
                                   error_on=on, error_type=error_type, error_regex=regex)

    return [*_torch_error_inputs(device, dtype),
            error(dict(alg_base="Adamax"), "alg_base: unknown value 'Adamax'"),
            error(dict(alg_meta="LBFGS"), "alg_meta: unknown value 'LBFGS'"),
            error(dict(alpha0=0.0), "alpha0 must be a finite number in \\(0.0, inf\\)"),
            error(dict(alpha0=float("nan")), "alpha0 must be a finite number"),
            error(dict(gamma=1.5), "gamma must be a finite number in \\[0.0, 1.0\\]"),
            error(dict(meta_stepsize=-1e-3), "meta_stepsize must be"),
            error(dict(weight_decay=-0.1), "weight_decay_base must be"),
            error(dict(momentum_param_base=1.0), "momentum_param_base must be a finite number in \\[0.0, 1.0\\)"),
            error(dict(alg_meta="RMSProp"), "normalizer_param_meta is required by alg_meta='RMSProp' but is unset"),
            error(dict(alg_base="Lion"), "lion_beta2_base is required by alg_base='Lion'"),
            error(dict(stepsize_groups="blockwise"), "stepsize_groups: unknown value 'blockwise'"),
            error(dict(stepsize_groups=[1, 5]), "add up to 6, but the optimizer was given 2 parameter tensors"),
            error(dict(hessian="full"), "hessian: unknown value 'full'"),
            error(dict(rectify=True), "rectify: needs hessian='block_diagonal'"),
            error(dict(impl="triton"), "impl: unknown value 'triton'"),
            error({}, "empty parameter list", params=[]),
            error({}, "param group key 'betas' is not a MetaOptimize setting",
                  params=[{"params": [p()], "betas": (0.9, 0.99)}]),
            error({}, "lr must be a finite number", params=[{"params": [p()], "lr": -1.0}]),
            error(dict(hessian="hvp", alg_meta="SGD"), "hessian='hvp' does not support complex parameters",
                  params=[Parameter(torch.randn(3, device=device, dtype=torch.complex64))]),
            error({}, "does not support sparse gradients", params=[sparse], error_type=RuntimeError,
                  on=OptimizerErrorEnum.STEP_ERROR),
            error(dict(hessian="hvp", alg_meta="SGD"), "needs the gradient's graph: call "
                  "loss.backward\\(create_graph=True\\)", params=[no_graph], error_type=RuntimeError,
                  on=OptimizerErrorEnum.STEP_ERROR)]


def optim_inputs_func_packaged(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs=dict(weight_decay=0.1, stepsize_blocks="layerwise"),
                       desc="weight decay, layerwise"),
        OptimizerInput(params=None, kwargs=dict(alpha0=1e-2, meta_stepsize=1e-2, gamma=0.99, b1=0.8, b2=0.99,
                                                meta_b1=0.9, meta_c1=0.5),
                       desc="other hyperparameters"),
    ]


def optim_error_inputs_func_packaged(device, dtype):
    p = functools.partial(Parameter, torch.randn(2, 3, device=device, dtype=dtype))

    def error(kwargs, regex, params=None):
        return ErrorOptimizerInput(OptimizerInput(params=[p(), p()] if params is None else params, kwargs=kwargs,
                                                  desc=regex), error_type=ValueError, error_regex=regex)

    return [*_torch_error_inputs(device, dtype),
            error(dict(alpha0=0.0), "alpha0 must be > 0"),
            error(dict(gamma=2.0), "gamma must be in \\[0, 1\\]"),
            error(dict(b1=1.0), "b1 must be in \\[0, 1\\)"),
            error(dict(meta_c1=-0.1), "meta_c1 must be in \\[0, 1\\)"),
            error(dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
            error(dict(stepsize_blocks="nodewise"), "stepsize_blocks must be 'scalar', 'layerwise' or a list"),
            error(dict(stepsize_blocks=[3]), "add up to 3"),
            error({}, "empty parameter list", params=[]),
            error({}, "param group key 'momentum' is not a setting",
                  params=[{"params": [p()], "momentum": 0.9}]),
            error({}, "gamma is a setting of the whole optimizer", params=[{"params": [p()], "gamma": 0.5}])]


def _torch_error_inputs(device, dtype):
    """torch's error inputs for every optimizer; a Tensor lr is refused by these classes whatever its
    size (and checked with the parameters, which torch's input leaves out)."""
    inputs = get_error_inputs_for_all_optims(device, dtype)
    for e in inputs:
        if "Tensor lr" in e.error_regex:
            e.error_regex = "lr must be a finite number"
            e.optimizer_error_input.params = [Parameter(torch.randn(2, device=device, dtype=dtype))]
    return inputs


optim_db = [
    OptimizerInfo(
        MetaOptimize,
        optim_inputs_func=optim_inputs_func_metaoptimize,
        optim_error_inputs_func=optim_error_inputs_func_metaoptimize,
        scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
                          [lambda opt: LinearLR(opt, start_factor=0.1, total_iters=5),
                           lambda opt: CosineAnnealingLR(opt, T_max=20)]),
        supported_impls=("fused",),  # fused=False: foreach
        supports_fused_on=("cpu", "cuda"),
        supports_complex=True,
        supports_multiple_devices=False,
    ),
    OptimizerInfo(
        MetaOptimize_AdamW_Lion_hg,
        optim_inputs_func=optim_inputs_func_packaged,
        optim_error_inputs_func=optim_error_inputs_func_packaged,
        supported_impls=(),
        supports_complex=False,
        supports_multiple_devices=False,
    ),
]
parametrize_optims = pytest.mark.parametrize("optim_info", optim_db, ids=lambda info: info.name)
parametrize_devices = pytest.mark.parametrize("device", DEVICES)


def all_inputs(device, optim_info, dtype=torch.float32):
    return _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, optim_info)


def make(optim_info, params, kwargs):
    """The optimizer of `kwargs`, torch's `fused` flag turned into MetaOptimize's `impl`."""
    kwargs = dict(kwargs)
    if "fused" in kwargs:
        kwargs["impl"] = "fused" if kwargs.pop("fused") else "foreach"
    return optim_info.optim_cls(params, **kwargs)


def linear_problem(device, dtype=torch.float32, contiguous=True):
    gen = torch.Generator().manual_seed(0)
    if contiguous:
        weight = Parameter(torch.randn(10, 5, generator=gen, dtype=dtype).to(device))
        bias = Parameter(torch.randn(10, generator=gen, dtype=dtype).to(device))
    else:
        weight = Parameter(torch.randn(10, 5, 2, generator=gen, dtype=dtype).to(device)[..., 0])
        bias = Parameter(torch.randn(10, 2, generator=gen, dtype=dtype).to(device)[..., 0])
    x = torch.randn(5, generator=gen, dtype=dtype).to(device)
    return weight, bias, x


def _fwd_bwd(optimizer, weight, bias, x):
    optimizer.zero_grad()
    loss = (weight.mv(x) + bias).pow(2).sum()
    loss.backward()
    return loss


def assert_same(a, b, path="state_dict"):
    """Nested state dicts equal bit for bit (tensors by value, everything else by ==)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{path}: {m}")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


# ---- the checks ---------------------------------------------------------------------------------


@parametrize_optims
def test_optim_infos_do_not_specify_the_implementation(optim_info):
    for optim_input in optim_info.optim_inputs_func(device="cpu"):
        assert not {"impl", "fused", "foreach", "compile"} & set(optim_input.kwargs), optim_input.desc


@parametrize_devices
@parametrize_optims
def test_errors(device, optim_info):
    for error_input in optim_info.optim_error_inputs_func(device=device, dtype=torch.float32):
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        expect = (pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises)(
            error_input.error_type, match=error_input.error_regex)
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with expect:
                optim_info.optim_cls(params, **kwargs)
        else:
            optimizer = optim_info.optim_cls(params, **kwargs)
            with expect:
                optimizer.step()


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non_contiguous"])
@parametrize_devices
@parametrize_optims
def test_loss_decreases(device, optim_info, contiguous):
    """torch's test_forloop_goes_right_direction, for every input and implementation; the closure's
    loss is what step() returns."""
    for optim_input in all_inputs(device, optim_info):
        weight, bias, x = linear_problem(device, contiguous=contiguous)
        optimizer = make(optim_info, [weight, bias], optim_input.kwargs)
        closure = functools.partial(_fwd_bwd, optimizer, weight, bias, x)
        initial = closure().item()
        for _ in range(20):
            returned = optimizer.step(closure)
        assert torch.is_tensor(returned), optim_input.desc
        assert closure().item() < initial, optim_input.desc


@parametrize_devices
@parametrize_optims
def test_loss_decreases_under_lr_schedulers(device, optim_info):
    """torch's test_param_group_with_lrscheduler_goes_right_direction: the schedulers of the
    OptimizerInfo move each param group's lr (a multiplier here), and the loss still goes down."""
    for schedulers_c in optim_info.scheduler_inputs:
        for optim_input in all_inputs(device, optim_info):
            weight, bias, x = linear_problem(device)
            optimizer = make(optim_info, [weight, bias], optim_input.kwargs)
            schedulers = [s(optimizer) for s in schedulers_c]
            closure = functools.partial(_fwd_bwd, optimizer, weight, bias, x)
            initial = closure().item()
            for _ in range(20):
                loss = optimizer.step(closure)
                for scheduler in schedulers:
                    scheduler.step(loss.item()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
            assert closure().item() < initial, optim_input.desc
            lr = optimizer.param_groups[0]["lr"]
            assert lr != 1.0, "the schedulers did not move lr"
            torch.testing.assert_close(optimizer.effective_step_sizes()[0], torch.exp(_log_alpha(optimizer))[0] * lr)


def _log_alpha(optimizer):
    if isinstance(optimizer, MetaOptimize):
        return optimizer._beta
    return torch.stack([m["beta"] for m in optimizer.meta_state])


@parametrize_optims
def test_complex_parameters(optim_info):
    """torch's test_complex: MetaOptimize and MetaOptimize_AdamW_Lion_hg step complex parameters as
    their real views, so a run equals the run on the view_as_real tensors."""
    params = [torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
              torch.randn(10, 5, requires_grad=True)]
    for optim_input in all_inputs("cpu", optim_info):
        cps = [p.detach().clone().requires_grad_() for p in params]
        rps = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_() for p in cps]
        copt, ropt = make(optim_info, cps, optim_input.kwargs), make(optim_info, rps, optim_input.kwargs)
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            for cp, rp in zip(cps, rps):
                rp.grad = torch.randn(rp.shape, generator=gen)
                cp.grad = torch.view_as_complex(rp.grad.clone()) if cp.is_complex() else rp.grad.clone()
            copt.step()
            ropt.step()
        for cp, rp in zip(cps, rps):
            assert torch.equal(torch.view_as_real(cp) if cp.is_complex() else cp, rp), optim_input.desc
        assert torch.equal(copt.step_sizes(), ropt.step_sizes()), optim_input.desc


def _model_with_odd_params(device, dtype):
    """torch's model for derived-implementation checks, plus a 0-d and two zero-size parameters."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    model.to(dtype=dtype, device=device)
    odd = [torch.empty((), device=device, dtype=dtype, requires_grad=True),
           torch.empty(0, device=device, dtype=dtype, requires_grad=True),
           torch.empty(3, 0, device=device, dtype=dtype, requires_grad=True)]
    with torch.no_grad():
        odd[0].fill_(0.5)
    return model, odd


def _run_odd(model, odd, optimizer, device, dtype, iterations=7):
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype, device=device).reshape(3, 2)
    for i in range(iterations):
        optimizer.zero_grad()
        if i != 3:  # a step without any gradient is a no-op
            (model(x).sum() + 0.1 * odd[0] ** 2 + odd[1].sum() + odd[2].sum()).backward()
        optimizer.step()


@parametrize_devices
def test_foreach_matches_fused(device):
    """torch's test_foreach_matches_forloop, float64, with a 0-d and zero-size parameters and one
    step with no gradients: the two implementations give the same weights, state and step sizes."""
    info = optim_db[0]
    dtype = torch.float64
    for optim_input in info.optim_inputs_func(device=device):
        results = []
        for impl in ("foreach", "fused"):
            model, odd = _model_with_odd_params(device, dtype)
            params = list(model.parameters()) + odd
            optimizer = MetaOptimize(params, impl=impl, **optim_input.kwargs)
            assert optimizer.impl == impl
            _run_odd(model, odd, optimizer, device, dtype)
            results.append((params, optimizer))
        (p0, o0), (p1, o1) = results
        for a, b in zip(p0, p1):
            torch.testing.assert_close(a, b, msg=lambda m, d=optim_input.desc: f"{d}: {m}")
            for k in o0.state[a]:
                torch.testing.assert_close(o0.state[a][k], o1.state[b][k])
        torch.testing.assert_close(o0.step_sizes(), o1.step_sizes())


@parametrize_devices
@parametrize_optims
def test_zero_size_and_skipped_params(device, optim_info):
    """Every input and implementation steps a model with 0-d and zero-size parameters and a step
    without gradients; parameters without a gradient in a step are left alone, state and all."""
    for optim_input in all_inputs(device, optim_info):
        model, odd = _model_with_odd_params(device, torch.float32)
        optimizer = make(optim_info, list(model.parameters()) + odd, optim_input.kwargs)
        _run_odd(model, odd, optimizer, device, torch.float32)
        frozen = model[2].weight
        frozen_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[frozen].items()}
        before = frozen.detach().clone()
        optimizer.zero_grad()
        model[0].weight.grad = torch.ones_like(model[0].weight)
        optimizer.step()
        assert torch.equal(frozen, before), optim_input.desc
        assert_same(dict(optimizer.state[frozen]), frozen_state, optim_input.desc)
        assert all(torch.isfinite(p).all() for p in model.parameters()), optim_input.desc


@parametrize_devices
@parametrize_optims
def test_param_groups_weight_decay(device, optim_info):
    """torch's test: decay on the weight's group, none on the bias's, and the loss goes down. Plus
    what torch's test does not look at: with zero gradients, the group without decay is untouched
    and the one with decay shrinks."""
    for optim_input in all_inputs(device, optim_info):
        weight, bias, x = linear_problem(device)
        kwargs = dict(optim_input.kwargs)
        impl = {"fused": kwargs.pop("fused")} if "fused" in kwargs else {}
        optimizer = make(optim_info, [dict(params=[weight], weight_decay=0.1), dict(params=[bias], weight_decay=0.0)],
                         {**kwargs, **impl})
        initial = (weight.mv(x) + bias).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            optimizer.step()
        assert loss.item() < initial, optim_input.desc

        fresh_w, fresh_b, _ = linear_problem(device)
        optimizer = make(optim_info, [dict(params=[fresh_w], weight_decay=0.5), dict(params=[fresh_b], weight_decay=0.0)],
                         {**kwargs, **impl})
        w0, b0 = fresh_w.detach().clone(), fresh_b.detach().clone()
        fresh_w.grad, fresh_b.grad = torch.zeros_like(fresh_w), torch.zeros_like(fresh_b)
        optimizer.step()
        assert torch.equal(fresh_b, b0), optim_input.desc
        assert (fresh_w.abs() < w0.abs()).all(), optim_input.desc


@parametrize_devices
@parametrize_optims
def test_param_groups_lr(device, optim_info):
    """torch's test: the constructor's lr (1e-28) leaves a group without its own lr unmoved while
    the group with an lr learns. A group's lr here multiplies the tuned step size: 1 if not set.
    (torch puts every hyperparameter of the input into the group; these classes take the
    algorithm's settings in the constructor.)"""
    for optim_input in all_inputs(device, optim_info):
        others = dict(optim_input.kwargs)
        group = {"lr": others.pop("lr", 1.0)}
        weight, bias, x = linear_problem(device)
        irrelevant = Parameter(torch.randn(2, device=device))
        irrelevant_clone = irrelevant.detach().clone()
        optimizer = make(optim_info, [dict(params=[weight, bias], **group), dict(params=[irrelevant])],
                         {**others, "lr": 1e-28})
        initial = (weight.mv(x) + bias).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        assert loss.item() < initial, optim_input.desc
        assert torch.equal(irrelevant, irrelevant_clone), optim_input.desc


@parametrize_devices
@parametrize_optims
def test_step_is_noop_when_params_have_no_grad(device, optim_info):
    params = [torch.randn(2, 3, requires_grad=False, device=device) for _ in range(2)]
    old = [p.clone() for p in params]
    for optim_input in all_inputs(device, optim_info):
        optimizer = make(optim_info, params, optim_input.kwargs)
        assert optimizer.step(lambda: torch.tensor([1.0], device=device)).item() == 1.0
        for p, o in zip(params, old):
            assert torch.equal(p, o), optim_input.desc


@parametrize_devices
@parametrize_optims
def test_step_is_noop_for_zero_grads(device, optim_info):
    """Zero gradients and no weight decay: nothing moves (torch skips inputs with weight decay;
    here it is set to 0, since both classes decay by default or by input)."""
    param = torch.randn(5, 1, device=device, requires_grad=True)
    old = param.detach().clone()
    for optim_input in all_inputs(device, optim_info):
        optimizer = make(optim_info, [param], {**optim_input.kwargs, "weight_decay": 0.0})
        param.grad = torch.zeros_like(param)
        optimizer.step()
        assert torch.equal(param, old), optim_input.desc


@parametrize_optims
def test_optimizer_can_be_printed(optim_info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in all_inputs("cpu", optim_info):
        text = repr(make(optim_info, params, optim_input.kwargs))
        assert text.startswith(optim_info.name) and "lr" in text, text


@parametrize_devices
@parametrize_optims
def test_state_dict_deterministic(device, optim_info):
    """torch's test: a fresh optimizer loaded with the state dict of a primed one (on equal, not
    identical, weights) runs bit for bit with it; the state dicts agree; repeated param groups have
    one representation. Also through torch.save / torch.load(weights_only=True)."""
    for optim_input in all_inputs(device, optim_info):
        for via_file in (False, True):
            weight, bias, x = linear_problem(device)
            optimizer = make(optim_info, [weight, bias], optim_input.kwargs)
            closure = functools.partial(_fwd_bwd, optimizer, weight, bias, x)
            for _ in range(10):
                optimizer.step(closure)
            with torch.no_grad():
                weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
            optimizer_c = make(optim_info, [weight_c, bias_c], optim_input.kwargs)
            closure_c = functools.partial(_fwd_bwd, optimizer_c, weight_c, bias_c, x)
            saved = copy.deepcopy(optimizer.state_dict())
            if via_file:
                buffer = io.BytesIO()
                torch.save(optimizer.state_dict(), buffer)
                buffer.seek(0)
                optimizer_c.load_state_dict(torch.load(buffer, weights_only=True))
            else:
                optimizer_c.load_state_dict(copy.deepcopy(saved))
            assert_same(optimizer.state_dict(), saved)  # loading a copy left the original alone
            for _ in range(10):
                optimizer.step(closure)
                optimizer_c.step(closure_c)
                assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c), optim_input.desc
            assert_same(optimizer.state_dict(), optimizer_c.state_dict())
            assert torch.equal(optimizer.step_sizes(), optimizer_c.step_sizes())
            optimizer_c.param_groups.extend(optimizer_c.param_groups)
            assert_same(optimizer.state_dict()["param_groups"][-1], optimizer_c.state_dict()["param_groups"][-1])


@parametrize_optims
def test_can_load_older_state_dict(optim_info):
    """torch drops the flags added after an optimizer's release; here: state dicts saved before
    lr (and, for MetaOptimize, weight_decay rather than weight_decay_base) were param-group keys."""
    for optim_input in all_inputs("cpu", optim_info):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
        x = torch.rand(1, 4, 16, 16)
        optimizer = make(optim_info, model.parameters(), optim_input.kwargs)
        for _ in range(3):
            _fwd_bwd_model(optimizer, model, x)
            optimizer.step()
        older = copy.deepcopy(optimizer.state_dict())
        for group in older["param_groups"]:
            del group["lr"]
            if optim_info.optim_cls is MetaOptimize:
                group["weight_decay_base"] = group.pop("weight_decay")
        optimizer.load_state_dict(older)
        assert [g["lr"] for g in optimizer.param_groups] == [1.0]
        _fwd_bwd_model(optimizer, model, x)
        optimizer.step()


def _fwd_bwd_model(optimizer, model, x):
    optimizer.zero_grad()
    model(x).sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@parametrize_optims
def test_state_dict_with_cuda_params(optim_info):
    """torch's test: a CPU state dict loads into an optimizer of CUDA parameters, which then runs
    as the CPU one does."""
    for optim_input in all_inputs("cpu", optim_info):
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = make(optim_info, params, optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        with torch.no_grad():
            params_cuda = [Parameter(p.to("cuda")) for p in params]
        for p, q in zip(params, params_cuda):
            q.grad = p.grad.to("cuda")
        kwargs = {k: v for k, v in optim_input.kwargs.items() if k != "fused"}
        optimizer_cuda = make(optim_info, params_cuda, kwargs)
        saved = copy.deepcopy(optimizer.state_dict())
        optimizer_cuda.load_state_dict(copy.deepcopy(saved))
        assert_same(optimizer.state_dict(), saved)
        for _ in range(5):
            optimizer.step()
            optimizer_cuda.step()
            for p, q in zip(params, params_cuda):
                torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)


@parametrize_devices
@parametrize_optims
def test_deepcopy_and_pickle_give_working_copies(device, optim_info):
    """torch's test_deepcopy_copies_all_public_attrs, and more: a deep copy (or a pickled and
    unpickled optimizer together with its parameters, as torch.save does) steps bit for bit as the
    original."""
    for optim_input in all_inputs(device, optim_info):
        params = [Parameter(torch.randn(2, 3, device=device)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        optimizer = make(optim_info, params, optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        public = {k for k in vars(optimizer) if not k.startswith("_")}
        assert public == {k for k in vars(copy.deepcopy(optimizer)) if not k.startswith("_")}
        for clone in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
            clone_params = [p for g in clone.param_groups for p in g["params"]]
            assert all(c is not p for c, p in zip(clone_params, params))
            for p, c in zip(params, clone_params):
                c.grad = p.grad.clone()  # pickling a Parameter drops its gradient
            copies = [p.detach().clone() for p in params]
            state = copy.deepcopy(optimizer.state_dict())
            for _ in range(3):
                optimizer.step()
                clone.step()
            for p, c in zip(params, clone_params):
                assert torch.equal(p, c), optim_input.desc
            assert torch.equal(optimizer.step_sizes(), clone.step_sizes())
            with torch.no_grad():  # back to where the copy was made, for the next clone
                for p, c in zip(params, copies):
                    p.copy_(c)
            optimizer.load_state_dict(state)


def _record_hooks(optimizer) -> list:
    calls = []
    optimizer.register_step_pre_hook(lambda o, a, k: calls.append("step_pre"))
    optimizer.register_step_post_hook(lambda o, a, k: calls.append("step_post"))
    optimizer.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    optimizer.register_state_dict_post_hook(lambda o, sd: calls.append(("sd_post", sorted(sd))))
    optimizer.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load_pre", sorted(sd))))
    optimizer.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    return calls


@parametrize_optims
def test_step_and_state_dict_hooks_are_called(optim_info):
    """torch's hook checks: step pre/post hooks, state_dict pre/post and load_state_dict pre/post
    hooks run, in order, and the state dict they see is the whole one."""
    for optim_input in all_inputs("cpu", optim_info):
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        optimizer = make(optim_info, params, optim_input.kwargs)
        calls = _record_hooks(optimizer)
        optimizer.step()
        optimizer.load_state_dict(optimizer.state_dict())
        keys = sorted(optimizer.state_dict())
        assert calls[:2] == ["step_pre", "step_post"]
        assert calls[2:6] == ["sd_pre", ("sd_post", keys), ("load_pre", keys), "load_post"], calls
        assert len(keys) == 3  # state, param_groups and the meta state


@parametrize_devices
@parametrize_optims
def test_grads_are_never_modified_and_every_stepped_param_has_state(device, optim_info):
    """torch's test_grads_are_never_inplaced_into and test_non_empty_state."""
    for optim_input in all_inputs(device, optim_info):
        model, odd = _model_with_odd_params(device, torch.float32)
        params = list(model.parameters()) + odd
        optimizer = make(optim_info, params, optim_input.kwargs)
        x = torch.rand(3, 2, device=device)
        for _ in range(2):
            optimizer.zero_grad()
            (model(x).sum() + odd[0] ** 2).backward()
            for p in odd[1:]:
                p.grad = torch.zeros_like(p)
            grads = [p.grad.clone() for p in params]
            optimizer.step()
            for p, g in zip(params, grads):
                assert torch.equal(p.grad, g), optim_input.desc
        assert all(optimizer.state[p] for p in params), optim_input.desc


def test_lr_is_a_multiplier_not_a_step_size():
    """Where MetaOptimize differs from torch.optim on purpose: lr = 1 leaves alpha as tuned; the
    constructor's lr is every group's default."""
    params = [Parameter(torch.randn(3))]
    assert MetaOptimize(params).param_groups[0]["lr"] == 1.0
    opt = MetaOptimize(params, lr=0.5, alpha0=1e-3)
    assert opt.param_groups[0]["lr"] == 0.5
    assert math.isclose(opt.effective_step_sizes().item(), 5e-4, rel_tol=1e-6)
    packaged = MetaOptimize_AdamW_Lion_hg(params, lr=0.5, alpha0=1e-3)
    assert math.isclose(packaged.effective_step_sizes().item(), 5e-4, rel_tol=1e-6)


def test_torch_test_utilities_leave_the_backend_flags_settable():
    """Importing them froze torch.backends' flags for every later test; this module thaws them."""
    assert not torch.backends.flags_frozen()
    torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark  # raises while frozen
