"""MetaOptimize: step-size optimisation wrapped around a first-order base update.

The maths is ../shared/spec/metaoptimize.md (sections 2-5); symbols in comments follow it:
  w weights, g gradient, h trace, beta = log step size per block, alpha = exp(beta),
  z = sum_{i in block} h_i g_i (the meta-gradient), Delta the amount subtracted from w.

Layout of this file (torch.optim style): a functional core, one function per update rule
over lists of tensors (`base_*`, `meta_*`), a thin `MetaOptimize` class that owns the
state and the step-size blocks, the authors' packaged `MetaOptimize_AdamW_Lion_hg`, and
the command-line glue (`add_optimizer_args`, `build_optimizer`, `build_scheduler`).

Performance notes. `step()` never reads a device value on the host: step counters are
Python ints, alpha stays a device tensor, and `step_sizes()` hands back a device tensor
that the caller turns into numbers only when it logs. Every elementwise pass is a
`torch._foreach_*` call over the tensor list. Internally the base state is kept in
exponential-moving-average form, m_ema = (1 - rho) m and v_ema = (1 - lambda) v, so that
each update is one pass (`lerp_`); the constant factors are folded into the scalar that
multiplies alpha, which keeps the result equal to the spec's sums.

On CPU, with blocks of whole tensors (scalar, layerwise, lists), there is no device to
synchronise with, and a small-batch step is bound by per-op dispatch. There the per-block
state (beta, the meta momenta) lives in Python floats, alpha enters each pass as a plain
scalar, and the trace is stored as h = D * trace with a float D per tensor, so that the
decay gamma (1 - kappa alpha) costs a float multiply instead of a pass over the trace
(`MetaOptimize._host_step`). Checkpoints carry D ("trace_scale") and move freely between
the two layouts.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "BASE_ALGS",
    "META_ALGS",
    "NAMED_STEPSIZE_GROUPS",
    "MetaOptimize",
    "MetaOptimize_AdamW_Lion_hg",
    "add_optimizer_args",
    "build_optimizer",
    "build_scheduler",
    "check_optimizer_args",
    "current_step_sizes",
    "eval_weights",
    "resolve_stepsize_groups",
]

EPS = 1e-10  # inside the square root, as in the authors' code (spec section 2)

# canonical names; lookups are case-insensitive
BASE_ALGS = {"sgd": "SGD", "sgdm": "SGDm", "rmsprop": "RMSProp", "adamw": "AdamW", "adam": "AdamW", "lion": "Lion"}
META_ALGS = {"fixed": "fixed", "sgd": "SGD", "rmsprop": "RMSProp", "adam": "Adam", "lion": "Lion"}

# hyperparameters each algorithm reads (constructor names without the _base/_meta suffix)
BASE_NEEDS = {
    "SGD": ("weight_decay",),
    "SGDm": ("weight_decay", "momentum_param"),
    "RMSProp": ("weight_decay", "normalizer_param"),
    "AdamW": ("weight_decay", "momentum_param", "normalizer_param"),
    "Lion": ("weight_decay", "momentum_param", "lion_beta2"),
}
META_NEEDS = {
    "fixed": (),
    "SGD": ("meta_stepsize", "weight_decay"),
    "RMSProp": ("meta_stepsize", "weight_decay", "normalizer_param"),
    "Adam": ("meta_stepsize", "weight_decay", "momentum_param", "normalizer_param"),
    "Lion": ("meta_stepsize", "weight_decay", "momentum_param", "lion_beta2"),
}
SYMBOLS = {
    "weight_decay_base": "kappa", "momentum_param_base": "rho", "normalizer_param_base": "lambda",
    "lion_beta2_base": "c", "weight_decay_meta": "kappa_bar", "momentum_param_meta": "rho_bar",
    "normalizer_param_meta": "lambda_bar", "lion_beta2_meta": "c_bar", "meta_stepsize": "eta",
    "alpha0": "alpha0", "gamma": "gamma",
}

# Named block lists of the paper (spec section 5); counts of consecutive parameter tensors.
NAMED_STEPSIZE_GROUPS = {
    "resnet18_blocks": [3, 12, 15, 15, 15, 2],
    "resnet50_blocks": [3, 30, 39, 57, 30, 2],
    "transformer_blocks_15m": [1, 9, 9, 9, 9, 9, 10],
}
BASE_HP = ("weight_decay_base", "normalizer_param_base", "momentum_param_base", "lion_beta2_base")  # per param group
GROUP_KINDS = ("scalar", "layerwise", "nodewise", "weightwise", "param_groups", "last_layer_and_others")


def _flag(name: str) -> str:
    """The command-line flag for a constructor argument, for error messages."""
    flag = "--" + name.replace("_", "-").replace("lion-", "Lion-")
    sym = SYMBOLS.get(name)
    return f"{name} ({flag}, {sym})" if sym else f"{name} ({flag})"


def _canonical(value: str, table: dict[str, str], name: str) -> str:
    key = str(value).strip().lower()
    if key not in table:
        accepted = ", ".join(dict.fromkeys(table.values()))
        raise ValueError(f"{_flag(name)}: unknown value {value!r}; accepted: {accepted} (case-insensitive)")
    return table[key]


# --------------------------------------------------------------------------------------
# Step-size blocks
# --------------------------------------------------------------------------------------


def resolve_stepsize_groups(spec, num_tensors: int, group_sizes: Sequence[int] | None = None):
    """Turn a `stepsize_groups` value into ("tensor", counts) or ("nodewise"|"weightwise", None).

    `counts` lists how many consecutive parameter tensors each block holds.
    """
    if isinstance(spec, str):
        key = spec.strip()
        low = key.lower()
        if low == "scalar":
            return "tensor", [num_tensors]
        if low == "layerwise":
            return "tensor", [1] * num_tensors
        if low in ("nodewise", "weightwise"):
            return low, None
        if low == "param_groups":
            return "tensor", list(group_sizes or [num_tensors])
        if low == "last_layer_and_others":
            if num_tensors < 3:
                raise ValueError(f"{_flag('stepsize_groups')}: last_layer_and_others needs at least 3 tensors")
            return "tensor", [num_tensors - 2, 2]
        if low in NAMED_STEPSIZE_GROUPS:
            counts = NAMED_STEPSIZE_GROUPS[low]
        else:
            try:
                counts = [int(x) for x in key.strip("[]() ").split(",") if x.strip()]
            except ValueError:
                raise ValueError(
                    f"{_flag('stepsize_groups')}: unknown value {spec!r}; accepted: "
                    f"{', '.join(GROUP_KINDS + tuple(NAMED_STEPSIZE_GROUPS))}, or a list of tensor counts like [3,12,47]"
                ) from None
    else:
        counts = [int(x) for x in spec]
    if not counts or any(c <= 0 for c in counts):
        raise ValueError(f"{_flag('stepsize_groups')}: block sizes must be positive integers, got {counts}")
    if sum(counts) != num_tensors:
        raise ValueError(
            f"{_flag('stepsize_groups')}: block sizes {counts} add up to {sum(counts)}, "
            f"but the optimizer was given {num_tensors} parameter tensors"
        )
    return "tensor", list(counts)


# --------------------------------------------------------------------------------------
# Functional core: base updates. Each returns (d, scale) with Delta = alpha * scale * d;
# d are new tensors the caller may modify in place. State lists are updated in place.
# --------------------------------------------------------------------------------------


def base_sgd(params, grads, momenta, normalizers, *, weight_decay, step, **_):
    # Delta = alpha (g + kappa w)
    return torch._foreach_add(grads, params, alpha=weight_decay), 1.0


def base_sgdm(params, grads, momenta, normalizers, *, weight_decay, momentum_param, step, **_):
    # Delta = alpha (m + kappa w) with m from before this step; then m <- rho m + (1-rho) g
    d = torch._foreach_add(momenta, params, alpha=weight_decay)
    torch._foreach_lerp_(momenta, grads, 1.0 - momentum_param)
    return d, 1.0


def _normalized(numerators, normalizers, grads, normalizer_param, step):
    """numerator / sqrt(v_ema/bc + eps) up to the factor sqrt(bc), in one new tensor list.

    v_ema <- lambda v_ema + (1-lambda) g^2, with v_ema = (1-lambda) v and mu = (1-lambda)/bc,
    bc = 1 - lambda^t: sqrt(mu v + eps) = sqrt(v_ema + eps bc) / sqrt(bc). Returns (numerator /
    sqrt(v_ema + eps bc), sqrt(bc)). The one temporary is turned into the result in place
    (1/sqrt, then times the numerator): a second full-size temporary would cost a fresh
    allocation every step, which on CPU means page faults that take longer than the arithmetic.
    """
    torch._foreach_mul_(normalizers, normalizer_param)
    torch._foreach_addcmul_(normalizers, grads, grads, 1.0 - normalizer_param)
    bc = 1.0 - normalizer_param**step
    out = torch._foreach_add(normalizers, EPS * bc)
    torch._foreach_pow_(out, -0.5)  # 1/sqrt; faster than sqrt_ then reciprocal_ on CPU
    torch._foreach_mul_(out, numerators)
    return out, math.sqrt(bc)


def base_rmsprop(params, grads, momenta, normalizers, *, weight_decay, normalizer_param, step, **_):
    # Delta = alpha (g / sqrt(mu v + eps) + kappa w)
    d, scale = _normalized(grads, normalizers, grads, normalizer_param, step)
    if weight_decay:
        torch._foreach_add_(d, params, alpha=weight_decay / scale)
    return d, scale


def base_adamw(params, grads, momenta, normalizers, *, weight_decay, momentum_param, normalizer_param, step, **_):
    # m <- rho m + g (a sum; stored as m_ema = (1-rho) m); Delta = alpha (m / sqrt(mu v + eps) + kappa w)
    torch._foreach_lerp_(momenta, grads, 1.0 - momentum_param)
    d, sqrt_bc = _normalized(momenta, normalizers, grads, normalizer_param, step)
    scale = sqrt_bc / (1.0 - momentum_param)
    if weight_decay:
        torch._foreach_add_(d, params, alpha=weight_decay / scale)
    return d, scale


def base_lion(params, grads, momenta, normalizers, *, weight_decay, momentum_param, lion_beta2, step, **_):
    # Delta = alpha (sign(c m + (1-c) g) + kappa w); then m <- rho m + (1-rho) g
    d = torch._foreach_lerp(grads, momenta, lion_beta2)
    torch._foreach_sign_(d)
    if weight_decay:
        torch._foreach_add_(d, params, alpha=weight_decay)
    torch._foreach_lerp_(momenta, grads, 1.0 - momentum_param)
    return d, 1.0


BASE_RULES = {"SGD": base_sgd, "SGDm": base_sgdm, "RMSProp": base_rmsprop, "AdamW": base_adamw, "Lion": base_lion}


# --------------------------------------------------------------------------------------
# Functional core: meta updates of beta (a flat float32 tensor, one entry per block).
# The meta state is small (one entry per block), so it is kept exactly in the spec's form.
# --------------------------------------------------------------------------------------


def meta_sgd(beta, z, momentum, normalizer, *, meta_stepsize, weight_decay, **_):
    # beta <- (1 - eta kappa_bar) beta - eta z
    if weight_decay:
        beta.mul_(1.0 - meta_stepsize * weight_decay)
    beta.add_(z, alpha=-meta_stepsize)


def _meta_denominator(normalizer, z, normalizer_param, step):
    # v_bar <- lambda_bar v_bar + z^2 ; sqrt(mu_bar v_bar + eps)
    normalizer.mul_(normalizer_param).addcmul_(z, z)
    mu = (1.0 - normalizer_param) / (1.0 - normalizer_param**step)
    return normalizer.mul(mu).add_(EPS).sqrt_()


def meta_rmsprop(beta, z, momentum, normalizer, *, meta_stepsize, weight_decay, normalizer_param, step, **_):
    denom = _meta_denominator(normalizer, z, normalizer_param, step)
    if weight_decay:
        beta.mul_(1.0 - meta_stepsize * weight_decay)
    beta.addcdiv_(z, denom, value=-meta_stepsize)


def meta_adam(beta, z, momentum, normalizer, *, meta_stepsize, weight_decay, momentum_param, normalizer_param,
              step, **_):
    momentum.mul_(momentum_param).add_(z)  # a sum, as in the spec
    denom = _meta_denominator(normalizer, z, normalizer_param, step)
    if weight_decay:
        beta.mul_(1.0 - meta_stepsize * weight_decay)
    beta.addcdiv_(momentum, denom, value=-meta_stepsize)


def meta_lion(beta, z, momentum, normalizer, *, meta_stepsize, weight_decay, momentum_param, lion_beta2, **_):
    direction = torch.lerp(z, momentum, lion_beta2).sign_()  # sign(c_bar m_bar + (1 - c_bar) z)
    if weight_decay:
        beta.mul_(1.0 - meta_stepsize * weight_decay)
    beta.add_(direction, alpha=-meta_stepsize)
    momentum.lerp_(z, 1.0 - momentum_param)


META_RULES = {"SGD": meta_sgd, "RMSProp": meta_rmsprop, "Adam": meta_adam, "Lion": meta_lion}  # "fixed": none


# The same meta updates over Python floats (lists with one entry per block; only `blocks` move).
# MetaOptimize uses them on CPU for blocks of whole tensors, where reading a value costs no
# device synchronisation and a Python float op is far cheaper than a tensor op (see `_host_step`).


def host_meta_sgd(beta, z, momentum, normalizer, blocks, *, meta_stepsize, weight_decay, **_):
    shrink = 1.0 - meta_stepsize * weight_decay
    for b in blocks:
        beta[b] = shrink * beta[b] - meta_stepsize * z[b]


def host_meta_rmsprop(beta, z, momentum, normalizer, blocks, *, meta_stepsize, weight_decay, normalizer_param,
                      step, **_):
    shrink, mu = 1.0 - meta_stepsize * weight_decay, (1.0 - normalizer_param) / (1.0 - normalizer_param**step)
    for b in blocks:
        normalizer[b] = normalizer_param * normalizer[b] + z[b] * z[b]
        beta[b] = shrink * beta[b] - meta_stepsize * z[b] / math.sqrt(mu * normalizer[b] + EPS)


def host_meta_adam(beta, z, momentum, normalizer, blocks, *, meta_stepsize, weight_decay, momentum_param,
                   normalizer_param, step, **_):
    shrink, mu = 1.0 - meta_stepsize * weight_decay, (1.0 - normalizer_param) / (1.0 - normalizer_param**step)
    for b in blocks:
        momentum[b] = momentum_param * momentum[b] + z[b]  # a sum, as in the spec
        normalizer[b] = normalizer_param * normalizer[b] + z[b] * z[b]
        beta[b] = shrink * beta[b] - meta_stepsize * momentum[b] / math.sqrt(mu * normalizer[b] + EPS)


def host_meta_lion(beta, z, momentum, normalizer, blocks, *, meta_stepsize, weight_decay, momentum_param,
                   lion_beta2, **_):
    shrink = 1.0 - meta_stepsize * weight_decay
    for b in blocks:
        u = lion_beta2 * momentum[b] + (1.0 - lion_beta2) * z[b]
        beta[b] = shrink * beta[b] - meta_stepsize * ((u > 0.0) - (u < 0.0))  # sign(u), 0 at 0
        momentum[b] = momentum_param * momentum[b] + (1.0 - momentum_param) * z[b]


HOST_META_RULES = {"SGD": host_meta_sgd, "RMSProp": host_meta_rmsprop, "Adam": host_meta_adam, "Lion": host_meta_lion}

# The host path keeps the trace as h = D * trace (D per tensor, see `_host_step`); once D leaves
# this range the tensor is rescaled (trace *= D, D = 1), which keeps trace = h / D far from
# float32 overflow and underflow.
TRACE_SCALE_RANGE = (1e-6, 1e6)


def _host_path(device: torch.device, kind: str, compile: bool) -> bool:
    """Whether MetaOptimize keeps the per-block state as Python floats (`_host_step`): on CPU, for
    blocks of whole tensors (node/weight-wise blocks are too many), unless the step is compiled."""
    return device.type == "cpu" and kind == "tensor" and not compile


def _dot(h: Tensor, g: Tensor) -> Tensor:
    if h.is_contiguous() and g.is_contiguous():
        return torch.dot(h.view(-1), g.view(-1))
    return torch.sum(h * g)


def _add_scaled(tensors: list[Tensor], others: list[Tensor], coefs: list[float]) -> None:
    """tensors[k] += coefs[k] * others[k], one foreach call per distinct coefficient (usually one)."""
    first = coefs[0]
    if all(c == first for c in coefs):
        torch._foreach_add_(tensors, others, alpha=first)
        return
    by_coef: dict[float, tuple[list, list]] = {}
    for t, o, c in zip(tensors, others, coefs):
        ts, os_ = by_coef.setdefault(c, ([], []))
        ts.append(t)
        os_.append(o)
    for c, (ts, os_) in by_coef.items():
        torch._foreach_add_(ts, os_, alpha=c)


# --------------------------------------------------------------------------------------
# Fused path (MetaOptimize(compile=True)): the same base rules written per tensor, so that
# torch.compile turns steps 2-4 of each tensor into one loop over memory.
# --------------------------------------------------------------------------------------


def _base_coefficients(alg, hp, step) -> Tensor:
    """Step-dependent scalars [scale, eps * bc] as a CPU tensor (an input, so no recompiles)."""
    if alg in ("RMSProp", "AdamW"):
        bc = 1.0 - hp["normalizer_param"] ** step
        scale = math.sqrt(bc) / (1.0 - hp["momentum_param"] if alg == "AdamW" else 1.0)
        return torch.tensor([scale, EPS * bc], dtype=torch.float64)
    return torch.tensor([1.0, 0.0], dtype=torch.float64)


def _make_fused_update(alg, track, gamma, hp, slices, kind):
    kappa = hp["weight_decay"]
    rho, lam, c = hp.get("momentum_param"), hp.get("normalizer_param"), hp.get("lion_beta2")
    z_in_graph = track and kind != "nodewise"  # nodewise row sums next to the h update trip an inductor bug

    def fused(params, grads, momenta, normalizers, traces, alpha, coeffs):
        scale, eps_bc = coeffs[0], coeffs[1]
        z_pieces = []
        for k, (p, g) in enumerate(zip(params, grads)):
            where = slices[k]
            a = alpha[where] if kind == "tensor" else alpha[where[0]:where[0] + where[1]].view(where[2])
            if z_in_graph:  # z from h before its update
                hg = traces[k] * g
                if kind == "tensor":
                    z_pieces.append(hg.sum())
                else:
                    z_pieces.append(hg)
            if alg == "SGD":
                d = g + kappa * p
            elif alg == "SGDm":
                m = momenta[k]
                d = m + kappa * p
                m.lerp_(g, 1.0 - rho)
            elif alg == "Lion":
                m = momenta[k]
                d = torch.sign(torch.lerp(g, m, c)) + kappa * p
                m.lerp_(g, 1.0 - rho)
            else:  # RMSProp, AdamW: v_ema, and m_ema for AdamW (see the foreach rules)
                v = normalizers[k]
                v.mul_(lam).addcmul_(g, g, value=1.0 - lam)
                num = g
                if alg == "AdamW":
                    m = momenta[k]
                    m.lerp_(g, 1.0 - rho)
                    num = m
                d = num * scale / torch.sqrt(v + eps_bc) + kappa * p
            delta = a * d
            p.sub_(delta)
            if track:
                h = traces[k]
                h.mul_(gamma * (1.0 - kappa * a)).sub_(delta)
        return z_pieces

    return fused


# --------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------


def _check_beta(name, value, low_open=False):
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        raise ValueError(f"{_flag(name)} must be in {'(0, 1)' if low_open else '[0, 1)'}, got {value}")


def _validate_base(alg, hp, where=""):
    for key in BASE_NEEDS[alg]:
        name = key + "_base"
        value = hp.get(name)
        if value is None:
            raise ValueError(f"{_flag(name)} is required by alg_base={alg!r}{where} but is unset")
        if key == "weight_decay":
            if value < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {value}")
        else:
            _check_beta(name, value)


class MetaOptimize(torch.optim.Optimizer):
    """MetaOptimize with the Hessian-free trace (spec sections 2-5).

    Args mirror the paper's command line (`--alg-base` -> `alg_base`, ...). Names of
    algorithms are case-insensitive. Hyperparameters the chosen algorithms do not read
    are ignored, so `None` is fine for them.

    stepsize_groups: "scalar", "layerwise", "nodewise", "weightwise", "param_groups" (one
        block per torch param group), "last_layer_and_others", a named list
        ("resnet18_blocks", ...), or a list of tensor counts such as [3, 12, 47]. Blocks
        follow the order of the parameters as given (all param groups, in order).

    Param groups may override the base hyperparameters (weight_decay_base,
    momentum_param_base, normalizer_param_base, lion_beta2_base), e.g. no weight decay on
    norms; the meta hyperparameters and alpha0 are global.

    `step_sizes()` returns alpha per block as a device tensor (no sync); call `.tolist()`
    on it only when you log.

    State: per tensor "step", "momentum"/"normalizer" (base state in EMA form, see the module
    notes) and "trace". On CPU with blocks of whole tensors the trace h is stored as
    trace_scale * state["trace"], with trace_scale per tensor in `state_dict()["meta"]`
    (see `_host_step`); elsewhere state["trace"] is h itself.

    compile: fuse each step into one generated loop per tensor with `torch.compile` (the
        same maths as the default `torch._foreach_*` path, fewer passes over memory). The
        first step compiles (tens of seconds for a ResNet-18), so use it for long runs.
    """

    def __init__(
        self,
        params: Iterable,
        alg_base: str = "AdamW",
        alg_meta: str = "Lion",
        alpha0: float = 1e-6,
        meta_stepsize: float = 1e-3,
        gamma: float = 1.0,
        stepsize_groups="scalar",
        weight_decay_base: float | None = 0.1,
        normalizer_param_base: float | None = 0.999,
        momentum_param_base: float | None = 0.9,
        lion_beta2_base: float | None = None,
        weight_decay_meta: float | None = 0.0,
        normalizer_param_meta: float | None = None,
        momentum_param_meta: float | None = 0.99,
        lion_beta2_meta: float | None = 0.9,
        compile: bool = False,
    ):
        alg_base = _canonical(alg_base, BASE_ALGS, "alg_base")
        alg_meta = _canonical(alg_meta, META_ALGS, "alg_meta")
        if not (alpha0 is not None and alpha0 > 0 and math.isfinite(alpha0)):
            raise ValueError(f"{_flag('alpha0')} must be a positive number, got {alpha0}")
        if gamma is None or not (0.0 <= gamma <= 1.0):
            raise ValueError(f"{_flag('gamma')} must be in [0, 1], got {gamma}")
        meta_hp = {
            "meta_stepsize": meta_stepsize, "weight_decay": weight_decay_meta,
            "momentum_param": momentum_param_meta, "normalizer_param": normalizer_param_meta,
            "lion_beta2": lion_beta2_meta,
        }
        for key in META_NEEDS[alg_meta]:
            name = key if key == "meta_stepsize" else key + "_meta"
            value = meta_hp[key]
            if value is None:
                raise ValueError(f"{_flag(name)} is required by alg_meta={alg_meta!r} but is unset")
            if key == "meta_stepsize" and not value > 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {value}")
            if key == "weight_decay" and value < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {value}")
            if key in ("momentum_param", "normalizer_param", "lion_beta2"):
                _check_beta(name, value)
        defaults = dict(
            weight_decay_base=weight_decay_base, normalizer_param_base=normalizer_param_base,
            momentum_param_base=momentum_param_base, lion_beta2_base=lion_beta2_base,
        )
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            _validate_base(alg_base, group, where=f" (param group {i})" if len(self.param_groups) > 1 else "")

        self.alg_base, self.alg_meta = alg_base, alg_meta
        self.alpha0, self.gamma = float(alpha0), float(gamma)
        self.meta_hp = {k: v for k, v in meta_hp.items() if k in META_NEEDS[alg_meta]}
        self.stepsize_groups = stepsize_groups
        self.compile = bool(compile)
        self._compiled = {}  # (group, active subset, step parity) -> compiled fused update
        self._build_blocks(stepsize_groups)

    # ---- blocks ------------------------------------------------------------------------

    def _build_blocks(self, spec):
        self._params = [p for g in self.param_groups for p in g["params"]]
        if not self._params:
            raise ValueError("MetaOptimize got an empty parameter list")
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(f"MetaOptimize needs all parameters on one device, got {sorted(map(str, devices))}")
        device = self._params[0].device
        self._index = {id(p): i for i, p in enumerate(self._params)}
        kind, counts = resolve_stepsize_groups(spec, len(self._params), [len(g["params"]) for g in self.param_groups])
        self._kind = kind
        if kind == "tensor":
            self._tensor_block = [b for b, c in enumerate(counts) for _ in range(c)]
            self._block_sizes = counts
            num_blocks = len(counts)
            self._unit_sizes = [1] * len(self._params)
        else:
            self._tensor_block = None
            sizes = [(p.shape[0] if p.dim() else 1) if kind == "nodewise" else p.numel() for p in self._params]
            self._unit_sizes = sizes
            num_blocks = sum(sizes)
        self._offsets = [0]
        for s in self._unit_sizes[:-1]:
            self._offsets.append(self._offsets[-1] + s)
        self._num_blocks = num_blocks
        # Where the per-block state lives: Python floats on the host for blocks of whole tensors on
        # CPU (`_host_step`), float32 tensors on the parameters' device otherwise.
        self._host = _host_path(device, kind, self.compile)
        beta0 = math.log(self.alpha0)
        if self._host:
            self._beta = [beta0] * num_blocks
            self._alpha = None
            self._meta_momentum = [0.0] * num_blocks if "momentum_param" in self.meta_hp else None
            self._meta_normalizer = [0.0] * num_blocks if "normalizer_param" in self.meta_hp else None
            self._trace_scale = [1.0] * len(self._params)  # D per tensor: h = D * state["trace"]
            self._host_blocks = {}  # cache: active-parameter signature -> blocks with a gradient
            self._trace_vectors = {}  # cache: parameter index -> state["trace"].view(-1)
        else:
            f32 = dict(device=device, dtype=torch.float32)
            self._beta = torch.full((num_blocks,), beta0, **f32)
            self._alpha = torch.empty_like(self._beta)  # exp(beta) at the start of the step
            self._meta_momentum = torch.zeros_like(self._beta) if "momentum_param" in self.meta_hp else None
            self._meta_normalizer = torch.zeros_like(self._beta) if "normalizer_param" in self.meta_hp else None
            self._trace_scale = None  # the device path keeps h itself
        self._meta_step = 0
        self._z = None  # nodewise/weightwise meta-gradient buffer, made on first use
        self._plans = {}  # cache: active-parameter signature -> index tensors and groupings

    def add_param_group(self, param_group):
        if hasattr(self, "_beta"):  # torch's __init__ adds the initial groups through here
            raise NotImplementedError(
                "MetaOptimize fixes its step-size blocks at construction; pass every param group to the constructor"
            )
        super().add_param_group(param_group)

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def _views(self, flat: Tensor) -> list[Tensor]:
        """Per-tensor views of a flat per-block tensor, broadcastable against each parameter."""
        if self._kind == "tensor":
            unbound = flat.unbind(0)
            return [unbound[b] for b in self._tensor_block]
        pieces = flat.split(self._unit_sizes)
        if self._kind == "weightwise":
            return [x.view(p.shape) for x, p in zip(pieces, self._params)]
        return [x.view((-1,) + (1,) * (p.dim() - 1)) if p.dim() else x.view(()) for x, p in zip(pieces, self._params)]

    def _plan(self, active: tuple):
        """Per active set (usually all parameters): the block of each active tensor's z (tensor-kind)
        and the mask of blocks with at least one gradient (None when every parameter has one)."""
        plan = self._plans.get(active)
        if plan is not None:
            return plan
        device = self._beta.device
        plan = {"mask": None}
        if self._kind == "tensor":
            plan["z_index"] = torch.tensor([self._tensor_block[i] for i in active], device=device)
        if len(active) < len(self._params):
            mask = torch.zeros(self.num_blocks, dtype=torch.bool)
            for i in active:
                if self._kind == "tensor":
                    mask[self._tensor_block[i]] = True
                else:
                    mask[self._offsets[i]:self._offsets[i] + self._unit_sizes[i]] = True
            plan["mask"] = mask.to(device)
        self._plans[active] = plan
        return plan

    def _mul_by_block(self, tensors: list[Tensor], idx: list[int], flat: Tensor):
        """tensors[k] *= flat[block of parameter idx[k]] (broadcast for node/weight-wise)."""
        if self._kind == "tensor":
            by_block: dict[int, list[Tensor]] = {}
            for t, i in zip(tensors, idx):
                by_block.setdefault(self._tensor_block[i], []).append(t)
            unbound = flat.unbind(0)
            for b, ts in by_block.items():
                torch._foreach_mul_(ts, unbound[b])  # one 0-d device tensor: the fast foreach path
        else:
            views = self._views(flat)
            torch._foreach_mul_(tensors, [views[i] for i in idx])

    # ---- state -------------------------------------------------------------------------

    def _state_for(self, p: Tensor, group) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            if "momentum_param" in BASE_NEEDS[self.alg_base]:
                state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if "normalizer_param" in BASE_NEEDS[self.alg_base]:
                state["normalizer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.alg_meta != "fixed":
                state["trace"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def state_dict(self):
        """torch's state dict plus a "meta" entry: beta and the meta state per block, and
        "trace_scale" (D per tensor, see `_host_step`; None where the traces are h itself)."""
        sd = super().state_dict()

        def saved(x):  # host floats as float64 tensors: a resume from them is exact
            return torch.tensor(x, dtype=torch.float64) if isinstance(x, list) else x

        sd["meta"] = {
            "alg_base": self.alg_base, "alg_meta": self.alg_meta, "num_blocks": self.num_blocks,
            "step": self._meta_step, "beta": saved(self._beta),
            "momentum": saved(self._meta_momentum), "normalizer": saved(self._meta_normalizer),
            "trace_scale": saved(self._trace_scale) if self._host and self.alg_meta != "fixed" else None,
        }
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        meta = state_dict.pop("meta", None)
        if meta is None:
            raise ValueError("not a MetaOptimize state dict (no 'meta' entry)")
        if meta["num_blocks"] != self.num_blocks or meta["alg_base"] != self.alg_base or meta["alg_meta"] != self.alg_meta:
            raise ValueError(
                f"state dict is for ({meta['alg_base']}, {meta['alg_meta']}) with {meta['num_blocks']} blocks; "
                f"this optimizer is ({self.alg_base}, {self.alg_meta}) with {self.num_blocks} blocks"
            )
        super().load_state_dict(state_dict)
        trace_scale = meta.get("trace_scale")
        if self._host:
            self._beta = meta["beta"].tolist()
            if self._meta_momentum is not None:
                self._meta_momentum = meta["momentum"].tolist()
            if self._meta_normalizer is not None:
                self._meta_normalizer = meta["normalizer"].tolist()
            self._trace_scale = trace_scale.tolist() if trace_scale is not None else [1.0] * len(self._params)
        else:
            # copy into the existing buffers: the per-tensor views stay valid
            with torch.no_grad():
                self._beta.copy_(meta["beta"])
                if self._meta_momentum is not None:
                    self._meta_momentum.copy_(meta["momentum"])
                if self._meta_normalizer is not None:
                    self._meta_normalizer.copy_(meta["normalizer"])
                if trace_scale is not None:  # saved by the host path: this path keeps h itself
                    for p, scale in zip(self._params, trace_scale.tolist()):
                        state = self.state.get(p, {})
                        if "trace" in state and scale != 1.0:  # a new tensor: the loaded one may be shared
                            state["trace"] = state["trace"] * scale
        self._meta_step = int(meta["step"])

    # ---- logging -----------------------------------------------------------------------

    def step_sizes(self) -> Tensor:
        """alpha = exp(beta) per block, a device tensor (no host sync); `.tolist()` it when logging."""
        if self._host:
            return torch.tensor([math.exp(b) for b in self._beta], dtype=torch.float32)
        return torch.exp(self._beta)

    # ---- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        active = tuple(i for i, p in enumerate(self._params) if p.grad is not None)
        if not active:
            return loss
        track = self.alg_meta != "fixed"

        # gather per-group lists once
        groups = []
        for group in self.param_groups:
            idx, params, grads, states = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MetaOptimize does not support sparse gradients")
                idx.append(self._index[id(p)])
                params.append(p)
                grads.append(p.grad)
                states.append(self._state_for(p, group))
            if params:
                groups.append((group, idx, params, grads, states))

        if self._host:
            self._host_step(groups, active, track)
            return loss

        # 1. alpha = exp(beta), beta as it is before this step
        torch.exp(self._beta, out=self._alpha)
        plan = self._plan(active)

        if self.compile:
            z = self._fused_step(groups, active, plan, track)
            if track:
                self._meta_step += 1
                self._meta_update(z, plan["mask"])
            return loss

        # 2. meta-gradient z_b = sum_{i in b} h_i g_i, with h from before this step
        if track:
            z = self._meta_gradient(groups, active, plan)

        # 3-4. base update w <- w - Delta, trace h <- gamma (1 - kappa alpha) h - Delta
        for _, hp, step, si, sp, sg, ss in self._subsets(groups):
            d, scale = self._base_direction(hp, step, sp, sg, ss)
            self._mul_by_block(d, si, self._alpha * scale if scale != 1.0 else self._alpha)  # d := Delta
            torch._foreach_sub_(sp, d)
            if track:
                traces = [s["trace"] for s in ss]
                if self.gamma == 0.0:
                    torch._foreach_zero_(traces)
                else:
                    decay = self._alpha * (-self.gamma * hp["weight_decay"]) + self.gamma  # gamma (1 - kappa alpha)
                    self._mul_by_block(traces, si, decay)
                torch._foreach_sub_(traces, d)

        # 5. meta update of beta with z
        if track:
            self._meta_step += 1
            self._meta_update(z, plan["mask"])
        return loss

    def _base_direction(self, hp, step, params, grads, states):
        """The base update of section 3 as (d, scale), Delta = alpha * scale * d; updates m and v."""
        return BASE_RULES[self.alg_base](
            params, grads,
            [s["momentum"] for s in states] if "momentum" in states[0] else None,
            [s["normalizer"] for s in states] if "normalizer" in states[0] else None,
            step=step, **hp,
        )

    def _host_step(self, groups, active, track):
        """Steps 1-5 with the per-block state in Python floats (CPU, blocks of whole tensors).

        On CPU a tensor's value is read without any device synchronisation, and at small batch
        sizes a step is bound by per-op dispatch: alpha, z and the meta update cost less as float
        arithmetic than as ops on one-entry tensors, and alpha enters each pass as a plain scalar.
        The trace is kept as h = D * trace with a float D per tensor. Step 4 then becomes
        D <- gamma (1 - kappa alpha) D and trace <- trace - Delta / D: one pass over the trace
        instead of two (decay, then subtract). When D leaves TRACE_SCALE_RANGE the tensor is
        rescaled (trace *= D, D = 1); when gamma (1 - kappa alpha) is exactly 0 the trace restarts
        at -Delta, as the spec's update does.
        """
        block, trace_scale = self._tensor_block, self._trace_scale
        alpha = [math.exp(b) for b in self._beta]  # 1. beta as it is before this step

        if track:  # 2. z_b = sum_{i in b} D_i (trace_i . g_i), with h from before this step
            z = [0.0] * self._num_blocks
            vectors = self._trace_vectors
            for _, idx, _, grads, states in groups:
                for i, g, s in zip(idx, grads, states):
                    trace = s["trace"]
                    vec = vectors.get(i)
                    if vec is None or vec._base is not trace:  # first use, or the state was replaced
                        vec = vectors[i] = trace.view(-1) if trace.is_contiguous() else None
                    dot = torch.dot(vec, g.view(-1)) if vec is not None and g.is_contiguous() else _dot(trace, g)
                    z[block[i]] += trace_scale[i] * dot.item()

        low, high = TRACE_SCALE_RANGE
        for _, hp, step, si, sp, sg, ss in self._subsets(groups):
            d, scale = self._base_direction(hp, step, sp, sg, ss)
            neg_step = [-alpha[block[i]] * scale for i in si]  # Delta = -neg_step * d
            _add_scaled(sp, d, neg_step)  # 3. w <- w - Delta
            if not track:
                continue
            # 4. h <- gamma (1 - kappa alpha) h - Delta, as D <- gamma (1 - kappa alpha) D, trace -= Delta / D
            decay = [self.gamma * (1.0 - hp["weight_decay"] * a) for a in alpha]
            traces = [s["trace"] for s in ss]
            coefs, restart, rescale = [], [], []
            for k, i in enumerate(si):
                scale_i = trace_scale[i] * decay[block[i]]
                if not low <= abs(scale_i) <= high:  # (NaN too)
                    if scale_i == 0.0:  # gamma = 0 or kappa alpha = 1: h = -Delta
                        restart.append(traces[k])
                        scale_i = 1.0
                    else:
                        rescale.append(k)
                trace_scale[i] = scale_i
                coefs.append(neg_step[k] / scale_i)
            if restart:
                torch._foreach_zero_(restart)
            _add_scaled(traces, d, coefs)
            if rescale:
                torch._foreach_mul_([traces[k] for k in rescale], [trace_scale[si[k]] for k in rescale])
                for k in rescale:
                    trace_scale[si[k]] = 1.0

        if track:  # 5. meta update of the blocks with a gradient
            blocks = self._host_blocks.get(active)
            if blocks is None:
                blocks = self._host_blocks[active] = sorted({block[i] for i in active})
            self._meta_step += 1
            HOST_META_RULES[self.alg_meta](self._beta, z, self._meta_momentum, self._meta_normalizer, blocks,
                                           step=self._meta_step, **self.meta_hp)

    def _fused_step(self, groups, active, plan, track):
        """Steps 2-4 with one compiled function per group: z pieces, Delta, w and h in one pass."""
        z = self._meta_gradient(groups, active, plan) if track and self._kind == "nodewise" else None
        pieces = {}
        for g_index, hp, step, si, sp, sg, ss in self._subsets(groups):
            key = (g_index, tuple(si))
            fn = self._compiled.get(key)
            if fn is None:
                fn = self._compiled[key] = torch.compile(
                    _make_fused_update(self.alg_base, track, self.gamma, hp, self._slices(si), self._kind),
                    dynamic=False,
                )
            out = fn(
                sp, sg,
                [s["momentum"] for s in ss] if "momentum" in ss[0] else [],
                [s["normalizer"] for s in ss] if "normalizer" in ss[0] else [],
                [s["trace"] for s in ss] if track else [],
                self._alpha, _base_coefficients(self.alg_base, hp, step),
            )
            pieces.update(zip(si, out))
        if not track or z is not None:
            return z
        if self._kind == "tensor":
            z_per_tensor = torch.stack([pieces[i] for i in sorted(pieces)]).to(torch.float32)
            return torch.zeros_like(self._beta).index_add_(0, plan["z_index"], z_per_tensor)
        device = self._beta.device
        return torch.cat([
            pieces[i].reshape(-1).to(torch.float32) if i in pieces
            else torch.zeros(self._unit_sizes[i], device=device, dtype=torch.float32)
            for i in range(len(self._params))
        ])

    def _slices(self, indices):
        """Where each parameter's alpha sits in the flat alpha: a block index or (offset, length, view shape)."""
        if self._kind == "tensor":
            return tuple(self._tensor_block[i] for i in indices)
        out = []
        for i in indices:
            p = self._params[i]
            shape = tuple(p.shape) if self._kind == "weightwise" else ((-1,) + (1,) * (p.dim() - 1) if p.dim() else ())
            out.append((self._offsets[i], self._unit_sizes[i], shape))
        return tuple(out)

    @staticmethod
    def _subsets(groups):
        """(group index, base hyperparameters, step t, indices, params, grads, states) per param group
        and step count, with the step counts advanced to t. Counts differ only for parameters
        whose gradient was None on some earlier steps, so this is one subset per group as a rule."""
        for g_index, (group, idx, params, grads, states) in enumerate(groups):
            hp = {k[: -len("_base")]: group[k] for k in BASE_HP}
            by_step: dict[int, list[int]] = {}
            for k, s in enumerate(states):
                by_step.setdefault(s["step"], []).append(k)
            for step, sub in by_step.items():
                ss = [states[k] for k in sub]
                for s in ss:
                    s["step"] += 1
                yield (g_index, hp, step + 1, [idx[k] for k in sub], [params[k] for k in sub],
                       [grads[k] for k in sub], ss)

    def _meta_gradient(self, groups, active, plan) -> Tensor:
        if self._kind == "tensor":
            dots = [_dot(s["trace"], g) for _, _, _, grads, states in groups for g, s in zip(grads, states)]
            z_per_tensor = torch.stack(dots).to(torch.float32)
            return torch.zeros_like(self._beta).index_add_(0, plan["z_index"], z_per_tensor)
        # nodewise / weightwise: one entry per output unit / weight, in parameter order, written
        # straight into a reused buffer (for weightwise it is as large as the model)
        if self._z is None:
            self._z = torch.zeros_like(self._beta)
            self._z_views = self._views(self._z)
        if len(active) < len(self._params):
            self._z.zero_()
        for _, idx, _, grads, states in groups:
            for i, g, s in zip(idx, grads, states):
                h, out = s["trace"], self._z_views[i]
                if self._kind == "weightwise" or h.dim() <= 1:
                    torch.mul(h, g, out=out) if h.dtype == out.dtype else out.copy_(h * g)
                else:  # nodewise: sum over all but the first dimension
                    out.copy_((h * g).sum(dim=tuple(range(1, h.dim())), keepdim=True))
        return self._z

    def _meta_update(self, z: Tensor, mask: Tensor | None):
        rule = META_RULES[self.alg_meta]
        buffers = [b for b in (self._beta, self._meta_momentum, self._meta_normalizer) if b is not None]
        old = [b.clone() for b in buffers] if mask is not None else None
        rule(self._beta, z, self._meta_momentum, self._meta_normalizer, step=self._meta_step, **self.meta_hp)
        if mask is not None:  # blocks without any gradient this step keep their meta state
            for b, o in zip(buffers, old):
                torch.where(mask, b, o, out=b)


# --------------------------------------------------------------------------------------
# The authors' packaged optimizer (spec section 8)
# --------------------------------------------------------------------------------------


class MetaOptimize_AdamW_Lion_hg(torch.optim.Optimizer):  # noqa: N801 (the authors' name)
    """Drop-in for `meta_optimize.optimizer.MetaOptimize_AdamW_Lion_hg` (AdamW base, Lion meta).

    Same argument names and defaults as the authors' package. Blocks are fixed by position,
    so a parameter with no gradient is skipped without shifting the blocks; a block none of
    whose tensors has a gradient is left unchanged.
    """

    def __init__(self, params, meta_stepsize=1e-3, alpha0=1e-3, stepsize_blocks="scalar", gamma=0.9999,
                 b1=0.9, b2=0.999, meta_b1=0.99, meta_c1=0.9, weight_decay=0.0):
        if not alpha0 > 0:
            raise ValueError(f"alpha0 must be > 0, got {alpha0}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        for name, value in (("b1", b1), ("b2", b2), ("meta_b1", meta_b1), ("meta_c1", meta_c1)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(meta_stepsize=meta_stepsize, gamma=gamma, b1=b1, b2=b2, meta_b1=meta_b1,
                        meta_c1=meta_c1, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._params = [p for g in self.param_groups for p in g["params"]]
        spec = stepsize_blocks
        if isinstance(spec, str) and spec.lower() not in ("scalar", "layerwise"):
            raise ValueError(f"stepsize_blocks must be 'scalar', 'layerwise' or a list of tensor counts, got {spec!r}")
        _, counts = resolve_stepsize_groups(spec, len(self._params))
        self._blocks = []
        start = 0
        for c in counts:
            self._blocks.append(self._params[start:start + c])
            start += c
        device = self._params[0].device
        self.meta_state = [
            {"beta": torch.tensor(math.log(alpha0), device=device), "meta_momentum": torch.zeros((), device=device)}
            for _ in counts
        ]

    def step_sizes(self) -> Tensor:
        return torch.exp(torch.stack([m["beta"] for m in self.meta_state]))

    def state_dict(self):
        sd = super().state_dict()
        sd["meta_state"] = self.meta_state
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        meta = state_dict.pop("meta_state")
        super().load_state_dict(state_dict)
        for mine, saved in zip(self.meta_state, meta, strict=True):
            for k in mine:
                mine[k].copy_(saved[k])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hp = self.defaults
        gamma, wd = hp["gamma"], hp["weight_decay"]
        for block, meta in zip(self._blocks, self.meta_state):
            params = [p for p in block if p.grad is not None]
            if not params:
                continue
            alpha = torch.exp(meta["beta"])
            z = torch.zeros((), device=alpha.device)
            for p in params:
                g = p.grad
                st = self.state[p]
                if not st:
                    st.update(step=0, base_momentum=torch.zeros_like(p), base_normalizer=torch.zeros_like(p),
                              h=torch.zeros_like(p))
                st["step"] += 1
                t = st["step"]
                b1_hat = (1 - hp["b1"]) / (1 - hp["b1"] ** t)
                b2_hat = (1 - hp["b2"]) / (1 - hp["b2"] ** t)
                m, v, h = st["base_momentum"], st["base_normalizer"], st["h"]
                m.lerp_(g, b1_hat)
                v.mul_(1 - b2_hat).addcmul_(g, g, value=b2_hat)
                if wd > 0:
                    p.mul_(1 - alpha * wd)
                denom = v.sqrt().add_(1e-8)
                p.addcdiv_(m * alpha, denom, value=-1.0)
                z = z + torch.sum(h * g)
                h.mul_(gamma * (1 - alpha * wd)).addcdiv_(g * alpha, denom)
            mm = meta["meta_momentum"]
            mm.lerp_(z, 1 - hp["meta_b1"])
            meta["beta"].add_(torch.lerp(z, mm, hp["meta_c1"]).sign() * hp["meta_stepsize"])
        return loss


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

# --optimizer values handled here; the learning-rate-free baselines live in common/baselines.py
OPTIMIZER_CHOICES = {"hf": "HF", "metaoptimize": "HF", "adamw": "AdamW"}


def _optimizer_choices() -> dict[str, str]:
    from common import baselines

    return {**OPTIMIZER_CHOICES, **{k.lower(): k for k in baselines.BASELINES}}


def add_optimizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The paper's optimizer flags. -1 means "unset", as in the paper's scripts."""
    from common import baselines

    g = parser.add_argument_group("optimizer (paper symbols in brackets; -1 = unset)")
    g.add_argument("--optimizer", default="HF",
                   help="HF = MetaOptimize (Hessian-free); AdamW = torch AdamW with linear warmup and cosine decay"
                        + "".join(f"; {k}" for k in baselines.BASELINES))
    g.add_argument("--alg-base", default="AdamW", help="base update: SGD, SGDm, RMSProp, AdamW (alias Adam), Lion")
    g.add_argument("--alg-meta", default="Lion", help="meta update of the log step sizes: fixed, SGD, RMSProp, Adam, Lion")
    g.add_argument("--alpha0", type=float, default=1e-6, help="[alpha0] initial step size (fixed step when --alg-meta fixed)")
    g.add_argument("--meta-stepsize", type=float, default=1e-3, help="[eta] meta step size")
    g.add_argument("--gamma", type=float, default=1.0, help="[gamma] discount of future losses, in [0, 1]")
    g.add_argument("--stepsize-groups", default="scalar",
                   help="step-size blocks: scalar, layerwise, nodewise, weightwise, last_layer_and_others, "
                        "resnet18_blocks, resnet50_blocks, transformer_blocks_15m, or a list like [3,12,47]")
    g.add_argument("--weight-decay-base", type=float, default=0.1, help="[kappa] base weight decay")
    g.add_argument("--normalizer-param-base", type=float, default=0.999, help="[lambda] base second-moment decay")
    g.add_argument("--momentum-param-base", type=float, default=0.9, help="[rho] base momentum")
    g.add_argument("--Lion-beta2-base", type=float, default=-1, help="[c] Lion interpolation of the base update")
    g.add_argument("--weight-decay-meta", type=float, default=0.0, help="[kappa_bar] meta weight decay on beta")
    g.add_argument("--normalizer-param-meta", type=float, default=-1, help="[lambda_bar] meta second-moment decay")
    g.add_argument("--momentum-param-meta", type=float, default=0.99, help="[rho_bar] meta momentum")
    g.add_argument("--Lion-beta2-meta", type=float, default=0.9, help="[c_bar] Lion interpolation of the meta update")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the --optimizer AdamW baseline")
    g.add_argument("--warmup-steps", type=int, default=1000, help="linear warm-up steps of the --optimizer AdamW baseline")
    baselines.add_baseline_args(parser)
    return parser


def _unset(value):
    return None if value is None or value == -1 else value


def _params_of(model_or_params):
    if isinstance(model_or_params, torch.nn.Module):
        return [p for p in model_or_params.parameters() if p.requires_grad]
    return model_or_params


def build_optimizer(model_or_params, args) -> torch.optim.Optimizer:
    """Turn parsed command-line arguments (see `add_optimizer_args`) into an optimizer."""
    name = _canonical(args.optimizer, _optimizer_choices(), "optimizer")
    params = _params_of(model_or_params)
    if name not in ("HF", "AdamW"):
        from common import baselines

        return baselines.build_baseline(name, params, args)
    if name == "HF":
        return MetaOptimize(
            params,
            alg_base=args.alg_base, alg_meta=args.alg_meta, alpha0=args.alpha0,
            meta_stepsize=_unset(args.meta_stepsize), gamma=args.gamma, stepsize_groups=args.stepsize_groups,
            weight_decay_base=_unset(args.weight_decay_base), normalizer_param_base=_unset(args.normalizer_param_base),
            momentum_param_base=_unset(args.momentum_param_base), lion_beta2_base=_unset(args.Lion_beta2_base),
            weight_decay_meta=_unset(args.weight_decay_meta), normalizer_param_meta=_unset(args.normalizer_param_meta),
            momentum_param_meta=_unset(args.momentum_param_meta), lion_beta2_meta=_unset(args.Lion_beta2_meta),
            compile=bool(getattr(args, "compile", False)),  # --compile fuses the optimizer step too
        )
    # AdamW baseline: torch's AdamW; betas and weight decay from the base flags
    beta1 = _unset(args.momentum_param_base)
    beta2 = _unset(args.normalizer_param_base)
    wd = _unset(args.weight_decay_base)
    beta1 = 0.9 if beta1 is None else beta1
    beta2 = 0.999 if beta2 is None else beta2
    _check_beta("momentum_param_base", beta1)
    _check_beta("normalizer_param_base", beta2)
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    params = list(params)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=args.lr, betas=(beta1, beta2), weight_decay=0.0 if wd is None else wd,
                             fused=fused or None, foreach=None if fused else True)


def check_optimizer_args(args) -> None:
    """Check the optimizer flags before any data or model is made; raises ValueError naming the flag.

    Builds the chosen optimizer on a dummy tensor, so every rule of the constructors applies;
    only the step-size group counts wait for the model (they must add up to its tensor count).
    """
    spec = args.stepsize_groups
    if isinstance(spec, str) and spec.strip().lower() not in (*GROUP_KINDS, *NAMED_STEPSIZE_GROUPS):
        # a list of tensor counts: its syntax now, its sum once the model exists
        try:
            counts = [int(x) for x in spec.strip().strip("[]() ").split(",") if x.strip()]
        except ValueError:
            counts = []
        resolve_stepsize_groups(spec, sum(counts))  # raises for an unknown name or a bad list
    dummy = argparse.Namespace(**{**vars(args), "stepsize_groups": "scalar", "compile": False})
    build_optimizer([torch.nn.Parameter(torch.zeros(2))], dummy)


def build_scheduler(optimizer, args, total_steps: int):
    """Linear warm-up then cosine decay to 0 for the AdamW baseline; None for MetaOptimize."""
    if type(optimizer) is not torch.optim.AdamW:  # not subclasses: Mechanic wraps an AdamW subclass
        return None
    warmup = max(0, int(args.warmup_steps))
    total = max(int(total_steps), warmup + 1)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def current_step_sizes(optimizer) -> Tensor:
    """The step size(s) an optimizer is using now, as a 1-D tensor (one entry per block/group).

    MetaOptimize: alpha per block (device tensor, no sync). Others: the lr of each param group.
    """
    if hasattr(optimizer, "step_sizes"):
        return optimizer.step_sizes()
    from common import baselines

    sizes = baselines.effective_step_sizes(optimizer)
    if sizes is not None:
        return sizes
    return torch.tensor([float(g["lr"]) for g in optimizer.param_groups])


@contextlib.contextmanager
def eval_weights(optimizer):
    """Evaluate on the weights the optimizer means to be evaluated.

    Optimizers with `train()`/`eval()` methods (schedule-free, iterate averaging) are
    switched to eval mode inside the block and back afterwards; others are untouched.
    """
    switch = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if switch:
        optimizer.eval()
    try:
        yield
    finally:
        if switch:
            optimizer.train()
