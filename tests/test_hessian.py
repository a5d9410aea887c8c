"""Hessian-based traces (spec section 9): exact derivatives, IDBD and hypergradient descent as
special cases, every base rule against a direct statement of the trace update, resume."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from checks import free_port, gloo_group
from torch.func import functional_call, grad, jvp

from common.optimizers import MetaOptimize
from common.optimizers.hessian import curvature_terms

IMPLS = ["foreach", "fused"]


def tiny_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7
    data = [(torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, 1, generator=gen, dtype=torch.float64))
            for _ in range(12)]
    return model, data


def loss_of(model, params, x, y):
    return (functional_call(model, params, (x,)) - y).pow(2).mean()


def unrolled(model, init, data, beta, kappa):
    """w_T as a function of beta: T steps of SGD with alpha = exp(beta) and weight decay kappa."""
    params = dict(init)
    alpha = torch.exp(beta)
    for x, y in data:
        grads = grad(loss_of, argnums=1)(model, params, x, y)
        params = {k: w - alpha * (grads[k] + kappa * w) for k, w in params.items()}
    return params


@pytest.mark.parametrize("kappa", [0.0, 0.3])
@pytest.mark.parametrize("impl", IMPLS)
def test_hvp_trace_is_the_exact_derivative_of_the_weights_in_beta(impl, kappa):
    """SGD base, one beta, gamma = 1, eta = 0 (beta frozen), float64: the trace after T steps is
    dw_T/dbeta through the unrolled training (torch.func.jvp), and with eta > 0 the next step's z
    is that derivative times the next gradient."""
    model, data = tiny_problem()
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    beta0 = torch.tensor(math.log(0.05), dtype=torch.float64)
    _, tangents = jvp(lambda b: unrolled(model, init, data[:-1], b, kappa), (beta0,), (torch.ones((), dtype=torch.float64),))
    opt = MetaOptimize(model.parameters(), alg_base="SGD", alg_meta="SGD", alpha0=0.05, meta_stepsize=0.0,
                       gamma=1.0, weight_decay_base=kappa, hessian="hvp", impl=impl)
    for x, y in data[:-1]:
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward(create_graph=True)
        opt.step()
    for (name, p) in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["trace"], tangents[name], rtol=1e-8, atol=1e-12)
    # unfreeze: z of the next step is h . g, and SGD moves beta by -eta z
    eta = 0.1
    opt.meta_hp["meta_stepsize"] = eta
    x, y = data[-1]
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward(create_graph=True)
    z = sum(float((tangents[n] * p.grad).sum()) for n, p in model.named_parameters())
    opt.step()
    assert math.isclose(math.log(opt.step_sizes().item()), math.log(0.05) - eta * z, rel_tol=1e-10)


def idbd(x_seq, y_seq, theta, alpha0):
    """Sutton's IDBD (1992), in the framework's order (spec section 6): alpha from before the meta update."""
    n = x_seq.shape[1]
    w, h = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    beta = torch.full((n,), math.log(alpha0), dtype=torch.float64)
    for x, y in zip(x_seq, y_seq):
        delta = y - x @ w
        alpha = torch.exp(beta)
        beta = beta + theta * delta * x * h
        w = w + alpha * delta * x
        h = h * torch.clamp(1 - alpha * x * x, min=0) + alpha * delta * x
    return w, torch.exp(beta)


@pytest.mark.parametrize("impl", IMPLS)
def test_weightwise_block_diagonal_rectified_trace_is_idbd(impl):
    """SGD base and meta, a beta per weight, the Hessian's diagonal (x^2 for 1/2 (x.w - y)^2) and the
    rectifier: IDBD's weights and step sizes after 500 steps of linear regression, float64."""
    gen = torch.Generator().manual_seed(3)
    n, steps, theta = 8, 500, 0.02
    target = torch.randn(n, generator=gen, dtype=torch.float64)
    xs = torch.randn(steps, n, generator=gen, dtype=torch.float64)
    ys = xs @ target + 0.1 * torch.randn(steps, generator=gen, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = MetaOptimize([w], alg_base="SGD", alg_meta="SGD", alpha0=0.05, meta_stepsize=theta, gamma=1.0,
                       weight_decay_base=0.0, stepsize_groups="weightwise", hessian="block_diagonal", rectify=True,
                       impl=impl)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        (0.5 * (x @ w - y) ** 2).backward(create_graph=True)
        opt.step()
    ref_w, ref_alpha = idbd(xs, ys, theta, 0.05)
    torch.testing.assert_close(w.detach(), ref_w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(opt.step_sizes(), ref_alpha, rtol=1e-9, atol=0)
    assert not torch.allclose(ref_alpha, torch.full_like(ref_alpha, 0.05))


@pytest.mark.parametrize("hessian", [None, "hvp"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gamma_zero_is_hypergradient_descent_with_or_without_the_hessian(impl, hessian):
    """gamma = 0: h = -Delta_{t-1} whatever the Hessian term, so beta_t = beta_{t-1} + eta Delta_{t-1}.g_t."""
    model, data = tiny_problem(1)
    eta = 0.05
    opt = MetaOptimize(model.parameters(), alg_base="SGD", alg_meta="SGD", alpha0=0.05, meta_stepsize=eta,
                       gamma=0.0, weight_decay_base=0.0, hessian=hessian, impl=impl)
    beta, prev_delta = math.log(0.05), None
    for x, y in data:
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward(create_graph=hessian is not None)
        before = [p.detach().clone() for p in model.parameters()]
        if prev_delta is not None:
            beta += eta * sum(float((d * p.grad).sum()) for d, p in zip(prev_delta, model.parameters()))
        opt.step()
        prev_delta = [b - p.detach() for b, p in zip(before, model.parameters())]
        assert math.isclose(math.log(opt.step_sizes().item()), beta, rel_tol=1e-9)


def reference_traces(model, data, base, hp, alpha, gamma, steps):
    """h <- gamma [(1 - kappa alpha) h - alpha P (H h)] - Delta, written directly (fixed alpha, float64)."""
    params = list(model.parameters())
    state = {"m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params]}
    h = [torch.zeros_like(p) for p in params]
    rho, lam, kappa, c = hp["momentum_param_base"], hp["normalizer_param_base"], hp["weight_decay_base"], 0.9
    for t, (x, y) in enumerate(data[:steps], start=1):
        grads = torch.autograd.grad((model(x) - y).pow(2).mean(), params, create_graph=True)
        hvps = torch.autograd.grad(grads, params, grad_outputs=h)
        with torch.no_grad():
            for i, (p, g, hv) in enumerate(zip(params, grads, hvps)):
                m, v = state["m"][i], state["v"][i]
                precond = 0.0
                if base == "AdamW":
                    m, v = rho * m + g, lam * v + g * g
                    denom = torch.sqrt((1 - lam) / (1 - lam**t) * v + 1e-10)
                    d, precond = m / denom + kappa * p, 1 / denom
                elif base == "RMSProp":
                    v = lam * v + g * g
                    denom = torch.sqrt((1 - lam) / (1 - lam**t) * v + 1e-10)
                    d, precond = g / denom + kappa * p, 1 / denom
                elif base == "SGDm":
                    d, m = m + kappa * p, rho * m + (1 - rho) * g
                else:  # Lion
                    d, m = torch.sign(c * m + (1 - c) * g) + kappa * p, rho * m + (1 - rho) * g
                state["m"][i], state["v"][i] = m, v
                delta = alpha * d
                h[i] = gamma * ((1 - kappa * alpha) * h[i] - alpha * precond * hv) - delta
                p -= delta
    return h


@pytest.mark.parametrize("base", ["AdamW", "RMSProp", "SGDm", "Lion"])
@pytest.mark.parametrize("impl", IMPLS)
def test_every_base_keeps_its_hessian_term(impl, base):
    """P = 1/sqrt(mu v + eps) for AdamW and RMSProp; 0 for SGDm and Lion (their trace is Hessian-free)."""
    hp = dict(weight_decay_base=0.1, momentum_param_base=0.9, normalizer_param_base=0.99, lion_beta2_base=0.9)
    model, data = tiny_problem(2)
    twin = copy.deepcopy(model)
    opt = MetaOptimize(model.parameters(), alg_base=base, alg_meta="Adam", alpha0=0.02, meta_stepsize=0.0,
                       gamma=0.9, normalizer_param_meta=0.99, hessian="hvp", impl=impl, **hp)
    for x, y in data[:6]:
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward(create_graph=True)
        opt.step()
    expected = reference_traces(twin, data, base, hp, 0.02, 0.9, 6)
    for p, h in zip(model.parameters(), expected):
        torch.testing.assert_close(opt.state[p]["trace"], h, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_diagonal_keeps_each_blocks_own_hessian(impl):
    """Two blocks: H_bb h_b, one product per block, differs from the shared H h and from Hessian-free."""
    traces = {}
    for hessian in (None, "hvp", "block_diagonal"):
        model, data = tiny_problem(4)
        opt = MetaOptimize(model.parameters(), alg_base="SGD", alg_meta="SGD", alpha0=0.05, meta_stepsize=0.0,
                           stepsize_groups=[2, 2], weight_decay_base=0.0, hessian=hessian, impl=impl)
        for x, y in data[:5]:
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward(create_graph=True)
            opt.step()
        traces[hessian] = [opt.state[p]["trace"].clone() for p in model.parameters()]
    for a, b in ((None, "hvp"), ("hvp", "block_diagonal"), (None, "block_diagonal")):
        assert not all(torch.allclose(x, y) for x, y in zip(traces[a], traces[b])), (a, b)


@pytest.mark.parametrize("hessian, kind", [("hvp", "product"), ("block_diagonal", "product"),
                                           ("block_diagonal", "diagonal"), ("block_diagonal", "rectified")])
def test_curvature_terms_against_an_explicit_hessian(hessian, kind):
    """f = w.A w / 2 over w = (a, b): H = (A + A^T) / 2; hvp gives H h, block_diagonal H_bb h_b, a diagonal kind diag(H)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    H = (A + A.T) / 2
    a, b = (nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n in (2, 3))
    w = torch.cat([a, b])
    (w @ A @ w / 2).backward(create_graph=True)
    h = torch.randn(5, generator=gen, dtype=torch.float64)
    got = torch.cat(curvature_terms(hessian, kind, [a, b], [h[:2], h[2:]], blocks=[0, 1]))
    if hessian == "hvp":
        want = H @ h
    elif kind == "product":
        want = torch.cat([H[:2, :2] @ h[:2], H[2:, 2:] @ h[2:]])
    else:
        want = H.diagonal()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_missing_graph_is_a_clear_error():
    model, data = tiny_problem()
    opt = MetaOptimize(model.parameters(), alg_base="SGD", hessian="hvp")
    x, y = data[0]
    (model(x) - y).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()


@pytest.mark.parametrize("impl", IMPLS)
def test_resume_with_the_hessian_term_is_bit_for_bit(impl):
    def run(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward(create_graph=True)
            opt.step()

    def make(model):
        return MetaOptimize(model.parameters(), alg_base="AdamW", alg_meta="Lion", alpha0=0.02, meta_stepsize=0.01,
                            hessian="hvp", impl=impl)

    model, data = tiny_problem(5)
    opt = make(model)
    run(model, opt, data[:5])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    run(model, opt, data[5:])
    twin, _ = tiny_problem(5)
    twin.load_state_dict(saved["model"])
    twin_opt = make(twin)
    twin_opt.load_state_dict(saved["opt"])
    run(twin, twin_opt, data[5:])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.step_sizes(), twin_opt.step_sizes())


def test_hessian_arguments_are_checked():
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="fixed"):
        MetaOptimize(p, alg_meta="fixed", hessian="hvp")
    with pytest.raises(ValueError, match="nodewise"):
        MetaOptimize(p, stepsize_groups="nodewise", hessian="block_diagonal")
    with pytest.raises(ValueError, match="rectify"):
        MetaOptimize(p, hessian="hvp", rectify=True)
    with pytest.raises(ValueError, match="one product per weight"):
        MetaOptimize([nn.Parameter(torch.randn(100, 100))], stepsize_groups="weightwise", hessian="block_diagonal")


def _hessian_rank(rank, world, port, out):
    with gloo_group(rank, world, port):
        model, data = tiny_problem(6)
        opt = MetaOptimize(model.parameters(), alg_base="AdamW", alg_meta="Adam", alpha0=0.02, meta_stepsize=0.05,
                           normalizer_param_meta=0.99, hessian="hvp")
        for x, y in data[:6]:
            opt.zero_grad()
            half = slice(rank * 4, rank * 4 + 4)  # each rank half of the batch, through the module itself
            (model(x[half]) - y[half]).pow(2).mean().backward(create_graph=True)
            opt.step()
        torch.save({"params": [p.detach() for p in model.parameters()], "alpha": opt.step_sizes()}, f"{out}/rank{rank}.pt")


def test_ranks_average_gradients_and_products_and_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_hessian_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model, data = tiny_problem(6)
    opt = MetaOptimize(model.parameters(), alg_base="AdamW", alg_meta="Adam", alpha0=0.02, meta_stepsize=0.05,
                       normalizer_param_meta=0.99, hessian="hvp")
    for x, y in data[:6]:  # one process, the whole batch: the mean of the two halves' means
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward(create_graph=True)
        opt.step()
    assert torch.equal(ranks[0]["alpha"], ranks[1]["alpha"])
    torch.testing.assert_close(ranks[0]["alpha"], opt.step_sizes(), rtol=1e-10, atol=0)
    for a, b, p in zip(ranks[0]["params"], ranks[1]["params"], model.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, p.detach(), rtol=1e-10, atol=1e-12)
