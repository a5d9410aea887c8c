"""MetaOptimize as the torch ecosystem uses an optimizer: lr and LR schedulers, param-group keys,
blocks by the model's parameters, groups added later, repr, state-dict hooks, odd dtypes."""

import math

import pytest
import torch
import torch.nn as nn
from test_optimizers import HP, SHAPES, assert_follows_reference, make_problem, split_hp, step_with_reference

from common.optimizers import MetaOptimize, MetaOptimize_AdamW_Lion_hg
from common.optimizers.reference import Reference, block_ids
from common.step_metrics import effective_step_sizes

IMPLS = ["foreach", "fused"]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 4))


def train(model, opt, steps=5, scheduler=None):
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("impl", IMPLS)
def test_lr_scales_the_tuned_step_size_like_a_scaled_alpha(impl):
    """lr in a param group multiplies alpha everywhere it enters (the step and the trace's decay):
    the run equals the reference with alpha0 * lr, and effective_step_sizes() reports lr * alpha. (Without
    meta weight decay, which pulls beta towards 0 and so is not invariant to the shift log lr.)"""
    weights, curvature, noise = make_problem(2)
    params = [nn.Parameter(w.clone()) for w in weights]
    lr, hp = 0.25, {**HP, "weight_decay_meta": 0.0}
    opt = MetaOptimize([{"params": params, "lr": lr}], alg_base="AdamW", alg_meta="Adam", alpha0=4e-2,
                       meta_stepsize=2e-2, gamma=0.9, impl=impl, **hp)
    base_hp, meta_hp = split_hp(hp)
    ref = Reference(weights, "AdamW", "Adam", 4e-2 * lr, 2e-2, 0.9, block_ids(SHAPES, "scalar"), base_hp, meta_hp)
    step_with_reference(opt, params, ref, curvature, noise, 30)
    assert_follows_reference(opt, params, ref, alpha_atol=0, sizes=opt.effective_step_sizes())


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10, cycle_momentum=False),
    lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.5, anneal_epochs=3),
], ids=["LambdaLR", "CosineAnnealingLR", "StepLR", "LinearLR", "OneCycleLR", "SWALR"])
def test_torch_lr_schedulers_run_on_top_and_step_sizes_follow_them(make_scheduler):
    model = mlp()
    opt = MetaOptimize(model, alpha0=1e-3, meta_stepsize=1e-2)
    scheduler = make_scheduler(opt)
    train(model, opt, steps=5, scheduler=scheduler)
    lr = opt.param_groups[0]["lr"]
    assert lr != 1.0
    torch.testing.assert_close(effective_step_sizes(opt), torch.exp(opt._beta) * lr)


def test_reduce_lr_on_plateau_lowers_the_multiplier():
    model = mlp()
    opt = MetaOptimize(model, alpha0=1e-3)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for _ in range(3):
        plateau.step(1.0)  # no improvement
    assert opt.param_groups[0]["lr"] < 1.0


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_decay_in_a_param_group_is_the_base_weight_decay(impl):
    """The timm / HF convention (no decay on norms and biases), under the ecosystem's key."""
    model = mlp()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = MetaOptimize([{"params": decay, "weight_decay": 0.5}, {"params": no_decay, "weight_decay": 0.0}],
                       alg_base="SGD", alg_meta="fixed", alpha0=0.1, impl=impl)
    before = [p.detach().clone() for p in no_decay + decay]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(no_decay, before):
        assert torch.equal(p, b)  # zero gradient, no decay: unchanged
    for p, b in zip(decay, before[len(no_decay):]):
        torch.testing.assert_close(p, b * (1 - 0.1 * 0.5))
    assert MetaOptimize(model.parameters(), weight_decay=0.3).param_groups[0]["weight_decay"] == 0.3
    legacy = MetaOptimize([{"params": decay, "weight_decay_base": 0.2}, {"params": no_decay}])
    assert [g["weight_decay"] for g in legacy.param_groups] == [0.2, 0.1]


def test_a_param_group_key_metaoptimize_does_not_know_is_an_error_naming_it():
    model = mlp()
    with pytest.raises(ValueError, match="'betas'"):
        MetaOptimize([{"params": model.parameters(), "betas": (0.9, 0.99)}])
    with pytest.raises(ValueError, match="disagree"):
        MetaOptimize([{"params": model.parameters(), "weight_decay": 0.1, "weight_decay_base": 0.2}])


def _groups_reordered(model):
    """timm/HF style: decay and no-decay groups, so the tensors are no longer in the model's order."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.1}]


def test_block_lists_follow_the_model_not_the_group_layout():
    model = mlp()  # tensors: fc1.w, fc1.b, ln.w, ln.b, fc2.w, fc2.b
    with pytest.raises(ValueError, match="model="):
        MetaOptimize(_groups_reordered(model), stepsize_groups="last_layer_and_others")
    opt = MetaOptimize(_groups_reordered(model), stepsize_groups="last_layer_and_others", model=model)
    names = dict((id(p), n) for n, p in model.named_parameters())
    blocks = {names[id(p)]: opt._layout.starts[i] for i, p in enumerate(opt._params)}
    assert blocks == {"0.weight": 0, "0.bias": 0, "1.weight": 0, "1.bias": 0, "3.weight": 1, "3.bias": 1}
    assert MetaOptimize(model, stepsize_groups=[4, 2]).num_blocks == 2  # a module: its own order
    named = MetaOptimize(model.named_parameters(), stepsize_groups=[4, 2])
    assert named.num_blocks == 2 and named.param_groups[0]["param_names"][0] == "0.weight"


@pytest.mark.parametrize("impl", IMPLS)
def test_add_param_group_adds_blocks_or_joins_one(impl):
    """Progressive unfreezing (Lightning's BackboneFinetuning): new tensors get new blocks at alpha0,
    or join an existing block; the old blocks keep their step sizes."""
    model = mlp()
    head = list(model[3].parameters())
    backbone = [p for p in model.parameters() if all(p is not h for h in head)]
    opt = MetaOptimize(head, alpha0=1e-2, meta_stepsize=5e-2, impl=impl)
    train(model, opt, steps=3)
    moved = opt.step_sizes().clone()
    assert moved.item() != pytest.approx(1e-2)
    opt.add_param_group({"params": backbone, "lr": 0.1})
    assert opt.num_blocks == 2 and opt.step_sizes()[0] == moved[0]
    torch.testing.assert_close(opt.effective_step_sizes()[1], torch.tensor(1e-2 * 0.1))
    train(model, opt, steps=3)
    joined = MetaOptimize(head, alpha0=1e-2, stepsize_groups="layerwise", impl=impl)
    joined.add_param_group({"params": backbone[:2], "block": 0})
    joined.add_param_group({"params": backbone[2:]})
    assert joined.num_blocks == 2 + 2  # layerwise: a block per new tensor
    assert [joined._layout.starts[joined._index[p]] for p in backbone] == [0, 0, 2, 3]
    train(model, joined, steps=2)


def test_repr_shows_the_algorithm():
    text = repr(MetaOptimize(mlp(), alg_base="Lion", alg_meta="Adam", alpha0=3e-6, normalizer_param_meta=0.999,
                             lion_beta2_base=0.9, stepsize_groups="layerwise"))
    for needle in ("alg_base=Lion", "alg_meta=Adam", "alpha0=3e-06", "meta_stepsize=0.001", "gamma=1",
                   "'layerwise' (6 blocks)", "lion_beta2_base=0.9", "lr=1.0"):
        assert needle in text, text


def test_state_dict_hooks_see_the_meta_state():
    model = mlp()
    opt = MetaOptimize(model, alpha0=1e-2)
    train(model, opt, steps=2)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd["meta"])))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("meta" in sd))
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert seen[0][:3] == ["alg_base", "alg_meta", "beta"] and seen[1] is True


def test_the_packaged_class_follows_the_dtype_and_hvp_refuses_complex_parameters():
    # complex parameters (as their real views) are held against the real run in tests/test_complex_params.py
    with pytest.raises(ValueError, match="hessian='hvp' does not support complex"):
        MetaOptimize([nn.Parameter(torch.zeros(3, dtype=torch.complex64))], alg_meta="SGD", hessian="hvp")
    p = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = MetaOptimize_AdamW_Lion_hg([p], alpha0=1e-2)
    p.grad = torch.randn(4, dtype=torch.float64)
    opt.step()
    assert opt.step_sizes().dtype == torch.float64 and p.dtype == torch.float64


def test_step_sizes_are_alpha_and_effective_step_sizes_lr_alpha_per_block():
    """A block takes the lr of its first tensor's param group; step_sizes() stays alpha."""
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    def groups():
        return [{"params": [p], "lr": 0.5}, {"params": [q], "lr": 0.1}]

    for opt in (MetaOptimize(groups(), alpha0=1e-3, stepsize_groups="layerwise"),
                MetaOptimize_AdamW_Lion_hg(groups(), alpha0=1e-3, stepsize_blocks="layerwise")):
        torch.testing.assert_close(opt.step_sizes(), torch.full((2,), 1e-3))
        torch.testing.assert_close(opt.effective_step_sizes(), torch.tensor([5e-4, 1e-4]))
        torch.testing.assert_close(effective_step_sizes(opt), torch.tensor([5e-4, 1e-4]))


def test_effective_step_sizes_looks_through_wrappers():
    class Wrapper:  # accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer keep it here
        def __init__(self, optimizer):
            self.optimizer = optimizer

    opt = MetaOptimize(mlp(), alpha0=1e-4)
    torch.testing.assert_close(effective_step_sizes(Wrapper(Wrapper(opt))), torch.tensor([1e-4]))


def test_meta_stepsize_zero_freezes_beta():
    model = mlp()
    opt = MetaOptimize(model, alpha0=1e-3, meta_stepsize=0.0, alg_meta="SGD")
    train(model, opt, steps=3)
    assert math.isclose(opt.step_sizes().item(), 1e-3, rel_tol=1e-6)


@pytest.mark.parametrize("kwargs, needle", [
    ({"state_dtype": torch.int32}, "state_dtype must be None or a floating torch dtype"),
    ({"state_dtype": "int8"}, "state_dtype: unknown value 'int8'"),
    ({"stepsize_groups": None}, "stepsize_groups: None is not a block layout"),
    ({"alpha0": 1e308}, "alpha0 must be a step size float32 can hold"),
    ({"alpha0": 1e-60}, "alpha0 must be a step size float32 can hold"),
])
def test_constructor_refuses_what_would_fail_later(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MetaOptimize(mlp(), **kwargs)


def test_state_dtype_by_name():
    model = mlp()
    opt = MetaOptimize(model, state_dtype="bfloat16", impl="foreach")
    train(model, opt, steps=1)
    assert opt.state_dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for st in opt.state.values() for k, v in st.items() if k != "step")


def test_a_sparse_gradient_is_refused_before_any_state_changes():
    model = mlp()
    opt = MetaOptimize(model, impl="foreach")
    train(model, opt, steps=1)
    before = {k: v for k, v in opt.state_dict()["state"].items()}
    before = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for i, st in before.items()}
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    params[-1].grad = params[-1].grad.to_sparse()  # the last one: earlier tensors were stepped before
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    after = opt.state_dict()["state"]
    for i, st in before.items():
        for k, v in st.items():
            assert (torch.equal(v, after[i][k]) if torch.is_tensor(v) else v == after[i][k]), (i, k)
