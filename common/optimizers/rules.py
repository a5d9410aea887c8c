"""MetaOptimize's update rules, each stated once (../shared/spec/metaoptimize.md, sections 2-4).

Symbols: w weights, g gradient, h trace, beta the log step size of a block, alpha = exp(beta),
Delta = alpha * d the amount subtracted from w, z = sum_{i in block} h_i g_i the meta-gradient,
kappa weight decay, gamma the discount. eps = 1e-10 sits inside the square root.

Base updates, per weight tensor (state starts at 0; t counts the tensor's own steps;
mu = (1 - lambda) / (1 - lambda^t)):

    SGD      d = g + kappa w
    SGDm     d = m + kappa w             (m from before the step), then m <- rho m + (1 - rho) g
    RMSProp  v <- lambda v + g^2,        d = g / sqrt(mu v + eps) + kappa w
    AdamW    m <- rho m + g (a sum),     v <- lambda v + g^2,   d = m / sqrt(mu v + eps) + kappa w
    Lion     d = sign(c m + (1 - c) g) + kappa w,               then m <- rho m + (1 - rho) g

One step of a tensor (spec section 2, steps 2-4), with alpha from before this step's meta update:

    z-part = h g            (h before its update)
    w      <- w - Delta
    h      <- gamma (1 - kappa alpha) h - Delta

Meta updates of beta, per block (kappa_bar meta weight decay, eta meta step size):

    SGD      beta <- (1 - eta kappa_bar) beta - eta z
    RMSProp  v <- lambda v + z^2,        beta <- (1 - eta kappa_bar) beta - eta z / sqrt(mu v + eps)
    Adam     m <- rho m + z (a sum),     v <- lambda v + z^2,   beta <- ... - eta m / sqrt(mu v + eps)
    Lion     beta <- (1 - eta kappa_bar) beta - eta sign(c m + (1 - c) z),  then m <- rho m + (1 - rho) z

Every rule is written with arithmetic operators and the `sqrt`/`sign` below only, so the same
function runs on Python floats, on tensors, and on the symbols that the step implementations
(`common.optimizers.kernels`) are generated from: a fused C loop on CPU, foreach passes, and a
torch.compile'd step on GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

EPS = 1e-10


def sqrt(x):
    return math.sqrt(x) if isinstance(x, (int, float)) else x.sqrt()


def sign(x):
    if isinstance(x, (int, float)):
        return x if x != x else float((x > 0) - (x < 0))  # NaN stays NaN, as torch.sign
    return x.sign()


def relu(x):
    """(x)^+: max(x, 0), NaN stays NaN."""
    if isinstance(x, (int, float)):
        return x if x != x or x > 0 else 0.0
    return x.relu() if hasattr(x, "relu") else x.clamp_min(0)


def bias_correction(decay, t):
    """mu = (1 - lambda) / (1 - lambda^t): turns the sum lambda v + g^2 into an average."""
    return (1 - decay) / (1 - decay**t)


# ---- base updates: (w, g, state, hp, t) -> (d, new state, preconditioner) ---------------------
# The preconditioner P of spec section 9 (the Hessian-based trace), returned as its denominator:
# P = 1 / denominator, with None for P = 0 (SGDm and Lion: nothing of g_t reaches w_t+1 through a
# derivative, so their trace is Hessian-free exactly).


def base_sgd(w, g, state, hp, t):
    return g + hp["weight_decay"] * w, {}, 1


def base_sgdm(w, g, state, hp, t):
    m, rho = state["momentum"], hp["momentum_param"]
    return m + hp["weight_decay"] * w, {"momentum": rho * m + (1 - rho) * g}, None


def base_rmsprop(w, g, state, hp, t):
    lam = hp["normalizer_param"]
    v = lam * state["normalizer"] + g * g
    denominator = sqrt(bias_correction(lam, t) * v + EPS)
    return g / denominator + hp["weight_decay"] * w, {"normalizer": v}, denominator


def base_adamw(w, g, state, hp, t):
    lam = hp["normalizer_param"]
    m = hp["momentum_param"] * state["momentum"] + g
    v = lam * state["normalizer"] + g * g
    denominator = sqrt(bias_correction(lam, t) * v + EPS)
    return m / denominator + hp["weight_decay"] * w, {"momentum": m, "normalizer": v}, denominator


def base_lion(w, g, state, hp, t):
    m, rho, c = state["momentum"], hp["momentum_param"], hp["lion_beta2"]
    d = sign(c * m + (1 - c) * g) + hp["weight_decay"] * w
    return d, {"momentum": rho * m + (1 - rho) * g}, None


CURVATURE_KINDS = ("product", "diagonal", "rectified")


def tensor_step(base, w, g, state, trace, alpha, hp, t, gamma, curvature=None, curvature_kind=None):
    """Steps 2-4 of spec section 2 for one tensor: returns (new w, new state, new trace, h g).

    `trace` is None when the step size is fixed (no meta update, no trace). hp["lr"] scales the
    tuned step size (1 unless an LR scheduler sets the param group's lr): Delta = lr alpha d.
    `curvature` keeps the Hessian term of spec section 9: H h ("product"), or the Hessian's
    diagonal ("diagonal"; "rectified" clips the factor of h at 0, as IDBD does):
        h <- gamma [(1 - kappa alpha) h - alpha P (H h)] - Delta"""
    meta_grad = None if trace is None else trace * g  # z's terms, with h before its update
    d, state, denominator = base.rule(w, g, state, hp, t)
    step_size = hp["lr"] * alpha
    delta = step_size * d
    if trace is not None:
        decay = 1 - hp["weight_decay"] * step_size
        if curvature is None or denominator is None:
            trace = gamma * decay * trace - delta
        else:
            curved = curvature if isinstance(denominator, int) else curvature / denominator  # P (H h)
            if curvature_kind == "product":
                trace = gamma * (decay * trace - step_size * curved) - delta
            else:
                factor = decay - step_size * curved
                trace = gamma * (relu(factor) if curvature_kind == "rectified" else factor) * trace - delta
    return w - delta, state, trace, meta_grad


# ---- meta updates of beta: (beta, z, state, hp, t) -> (new beta, new state) -------------------


def _shrink(hp):
    return 1 - hp["meta_stepsize"] * hp["weight_decay"]


def meta_sgd(beta, z, state, hp, t):
    return _shrink(hp) * beta - hp["meta_stepsize"] * z, {}


def meta_rmsprop(beta, z, state, hp, t):
    lam = hp["normalizer_param"]
    v = lam * state["normalizer"] + z * z
    return _shrink(hp) * beta - hp["meta_stepsize"] * z / sqrt(bias_correction(lam, t) * v + EPS), {"normalizer": v}


def meta_adam(beta, z, state, hp, t):
    lam = hp["normalizer_param"]
    m = hp["momentum_param"] * state["momentum"] + z
    v = lam * state["normalizer"] + z * z
    beta = _shrink(hp) * beta - hp["meta_stepsize"] * m / sqrt(bias_correction(lam, t) * v + EPS)
    return beta, {"momentum": m, "normalizer": v}


def meta_lion(beta, z, state, hp, t):
    m, rho, c = state["momentum"], hp["momentum_param"], hp["lion_beta2"]
    beta = _shrink(hp) * beta - hp["meta_stepsize"] * sign(c * m + (1 - c) * z)
    return beta, {"momentum": rho * m + (1 - rho) * z}


@dataclass(frozen=True)
class Rule:
    name: str
    rule: Callable | None
    hyperparameters: tuple[str, ...]  # constructor names without the _base / _meta suffix
    state: tuple[str, ...]  # state tensors it keeps, in the order of the spec's table


BASE_RULES = {r.name: r for r in (
    Rule("SGD", base_sgd, ("weight_decay",), ()),
    Rule("SGDm", base_sgdm, ("weight_decay", "momentum_param"), ("momentum",)),
    Rule("RMSProp", base_rmsprop, ("weight_decay", "normalizer_param"), ("normalizer",)),
    Rule("AdamW", base_adamw, ("weight_decay", "momentum_param", "normalizer_param"), ("momentum", "normalizer")),
    Rule("Lion", base_lion, ("weight_decay", "momentum_param", "lion_beta2"), ("momentum",)),
)}
META_RULES = {r.name: r for r in (
    Rule("fixed", None, (), ()),  # beta never moves: the base update with step alpha0
    Rule("SGD", meta_sgd, ("meta_stepsize", "weight_decay"), ()),
    Rule("RMSProp", meta_rmsprop, ("meta_stepsize", "weight_decay", "normalizer_param"), ("normalizer",)),
    Rule("Adam", meta_adam, ("meta_stepsize", "weight_decay", "momentum_param", "normalizer_param"),
         ("momentum", "normalizer")),
    Rule("Lion", meta_lion, ("meta_stepsize", "weight_decay", "momentum_param", "lion_beta2"), ("momentum",)),
)}
