"""`MetaOptimize`: the thin optimizer class around the rules and the step implementations."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .blocks import layout, resolve_stepsize_groups
from .impl import Layout, make_impl
from .rules import BASE_RULES, META_RULES

BASE_ALGS = {"sgd": "SGD", "sgdm": "SGDm", "rmsprop": "RMSProp", "adamw": "AdamW", "adam": "AdamW", "lion": "Lion"}
META_ALGS = {"fixed": "fixed", "sgd": "SGD", "rmsprop": "RMSProp", "adam": "Adam", "lion": "Lion"}
BASE_HP = ("weight_decay_base", "normalizer_param_base", "momentum_param_base", "lion_beta2_base")  # per group
STATE_FORMAT = 2  # 1 (no "format" entry): base state in EMA form, CPU traces scaled by "trace_scale"


def canonical(value, table: dict[str, str], name: str) -> str:
    key = str(value).strip().lower()
    if key not in table:
        accepted = ", ".join(dict.fromkeys(table.values()))
        raise ValueError(f"{name}: unknown value {value!r}; accepted: {accepted} (case-insensitive)")
    return table[key]


def _check(name, value, *, low=None, high=None, low_open=False, high_open=False):
    """ValueError naming `name` unless value is a finite number in the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "inf)" if high is None else f"{high}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be a finite number in {lo or '(-inf, '}{hi}, got {value!r}")


def _check_hyperparameter(name: str, value, needed_by: str):
    if value is None:
        raise ValueError(f"{name} is required by {needed_by} but is unset")
    if name.startswith("weight_decay"):
        _check(name, value, low=0.0)
    elif name == "meta_stepsize":
        _check(name, value, low=0.0, low_open=True)
    else:  # momentum, normalizer, Lion interpolation: decay rates
        _check(name, value, low=0.0, high=1.0, high_open=True)


class MetaOptimize(torch.optim.Optimizer):
    r"""MetaOptimize with the Hessian-free trace (spec sections 2-5; the rules: `rules.py`).

    Each block b of weights has a log step size beta_b, alpha_b = exp(beta_b) = alpha0 at the start.
    Per step: z_b = sum_{i in b} h_i g_i; the base update w <- w - alpha d (d from `alg_base`);
    h <- gamma (1 - kappa alpha) h - alpha d; then `alg_meta` moves beta with z.

    Args (the paper's flags in snake case; algorithm names are case-insensitive; hyperparameters
    the chosen algorithms do not read are ignored, so None is fine for them):
        alg_base: SGD, SGDm, RMSProp, AdamW (alias Adam), Lion.
        alg_meta: fixed (beta never moves), SGD, RMSProp, Adam, Lion.
        alpha0: initial step size. meta_stepsize: eta. gamma: discount in [0, 1].
        stepsize_groups: "scalar", "layerwise", "nodewise", "weightwise", "param_groups" (a block
            per param group), "last_layer_and_others", a named list ("resnet18_blocks", ...) or a
            list of tensor counts such as [3, 12, 47], in the order the parameters are given.
        *_base: kappa (weight decay), lambda (normalizer), rho (momentum), c (Lion interpolation)
            of the base update; param groups may override them. *_meta: the same for the meta update.
        impl: "auto" (default: "fused" where it runs, else "foreach"), "fused" (one pass per tensor:
            a compiled C loop on CPU, torch.compile on CUDA), or "foreach" (torch._foreach_* passes).
        state_dtype: dtype of the base state and the trace (e.g. torch.bfloat16 halves their
            memory); None keeps the parameters' dtype.

    `step_sizes()` returns alpha per block as a device tensor (no host sync): `.tolist()` it when
    you log. State per tensor: "step", "momentum" and "normalizer" as in the spec (sums for AdamW),
    "trace" (h); beta and the meta state are in `state_dict()["meta"]`.
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
        *,
        impl: str = "auto",
        state_dtype: torch.dtype | None = None,
        compile: bool | None = None,
    ):
        alg_base = canonical(alg_base, BASE_ALGS, "alg_base")
        alg_meta = canonical(alg_meta, META_ALGS, "alg_meta")
        _check("alpha0", alpha0, low=0.0, low_open=True)
        _check("gamma", gamma, low=0.0, high=1.0)
        if compile:  # the earlier name of impl="fused"
            impl = "fused"
        meta_hp = {"meta_stepsize": meta_stepsize, "weight_decay": weight_decay_meta,
                   "momentum_param": momentum_param_meta, "normalizer_param": normalizer_param_meta,
                   "lion_beta2": lion_beta2_meta}
        meta = META_RULES[alg_meta]
        for key in meta.hyperparameters:
            _check_hyperparameter(key if key == "meta_stepsize" else key + "_meta", meta_hp[key],
                                  f"alg_meta={alg_meta!r}")
        defaults = dict(weight_decay_base=weight_decay_base, normalizer_param_base=normalizer_param_base,
                        momentum_param_base=momentum_param_base, lion_beta2_base=lion_beta2_base)
        super().__init__(params, defaults)
        self.alg_base, self.alg_meta = alg_base, alg_meta
        self.alpha0, self.gamma = float(alpha0), float(gamma)
        self.meta_hp = {k: meta_hp[k] for k in meta.hyperparameters}
        self.stepsize_groups, self.impl_name, self.state_dtype = stepsize_groups, impl, state_dtype
        self._group_hp = [self._base_hyperparameters(g, i) for i, g in enumerate(self.param_groups)]
        self._build_blocks()

    def _base_hyperparameters(self, group, index) -> dict:
        where = f" (param group {index})" if len(self.param_groups) > 1 else ""
        hp = {}
        for key in BASE_RULES[self.alg_base].hyperparameters:
            _check_hyperparameter(key + "_base", group[key + "_base"], f"alg_base={self.alg_base!r}{where}")
            hp[key] = float(group[key + "_base"])
        return hp

    def _build_blocks(self):
        self._params = [p for g in self.param_groups for p in g["params"]]
        if not self._params:
            raise ValueError("params: MetaOptimize got an empty parameter list")
        for p in self._params:
            if p.is_complex():
                raise ValueError("params: complex parameters are not supported (view them as real with "
                                 "torch.view_as_real)")
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(f"params: MetaOptimize needs all parameters on one device, got {sorted(map(str, devices))}")
        device = self._params[0].device
        self._index = {p: i for i, p in enumerate(self._params)}
        self._group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        kind, counts = resolve_stepsize_groups(self.stepsize_groups, len(self._params),
                                               [len(g["params"]) for g in self.param_groups])
        shapes = [tuple(p.shape) for p in self._params]
        num_blocks, starts, units = layout(kind, counts, shapes)
        self._layout = Layout(kind, starts, units, shapes)
        self.num_blocks = num_blocks
        # beta and the meta state: float32, or float64 for float64 parameters (then exact to ~1e-15)
        meta = dict(device=device, dtype=torch.float64 if torch.float64 in {p.dtype for p in self._params}
                    else torch.float32)
        self._beta = torch.full((num_blocks,), math.log(self.alpha0), **meta)
        self._meta_state = {k: torch.zeros(num_blocks, **meta) for k in META_RULES[self.alg_meta].state}
        self._meta_step = 0
        self._z = torch.zeros(num_blocks, **meta) if self.alg_meta != "fixed" else None
        self._impl = self._make_impl()
        self._masks = {}

    @property
    def impl(self) -> str:
        """The implementation in use: "fused" or "foreach"."""
        return self._impl.name

    def add_param_group(self, param_group):
        if hasattr(self, "_beta"):  # torch's __init__ adds the initial groups through here
            raise NotImplementedError(
                "MetaOptimize fixes its step-size blocks at construction; pass every param group to the constructor")
        super().add_param_group(param_group)

    # ---- state -----------------------------------------------------------------------------

    def _state_for(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            dtype = self.state_dtype or p.dtype
            names = BASE_RULES[self.alg_base].state + (("trace",) if self.alg_meta != "fixed" else ())
            for name in names:
                state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            self._impl.reset()
        return state

    def state_dict(self):
        """torch's state dict plus "meta": beta and the meta state per block."""
        sd = super().state_dict()
        sd["meta"] = {"format": STATE_FORMAT, "alg_base": self.alg_base, "alg_meta": self.alg_meta,
                      "num_blocks": self.num_blocks, "step": self._meta_step, "beta": self._beta,
                      **{k: self._meta_state.get(k) for k in ("momentum", "normalizer")}}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        meta = state_dict.pop("meta", None)
        if meta is None:
            raise ValueError("not a MetaOptimize state dict (no 'meta' entry)")
        if (meta["num_blocks"], meta["alg_base"], meta["alg_meta"]) != (self.num_blocks, self.alg_base, self.alg_meta):
            raise ValueError(
                f"state dict is for ({meta['alg_base']}, {meta['alg_meta']}) with {meta['num_blocks']} blocks; "
                f"this optimizer is ({self.alg_base}, {self.alg_meta}) with {self.num_blocks} blocks")
        super().load_state_dict(state_dict)
        if meta.get("format", 1) == 1:
            self._convert_format_1(meta.get("trace_scale"))
        with torch.no_grad():
            for state in self.state.values():  # torch casts state to the parameter's dtype
                for k, v in state.items():
                    if torch.is_tensor(v) and k != "step" and self.state_dtype is not None:
                        state[k] = v.to(self.state_dtype)
            self._beta.copy_(meta["beta"])
            for k, buf in self._meta_state.items():
                buf.copy_(meta[k])
        self._meta_step = int(meta["step"])
        self._impl.reset()

    def _convert_format_1(self, trace_scale):
        """Checkpoints before STATE_FORMAT 2 kept AdamW's momentum and the normalizers as moving
        averages ((1 - rho) m, (1 - lambda) v) and, on CPU, the trace as h / trace_scale."""
        with torch.no_grad():
            for p, state in self.state.items():
                hp = self._group_hp[self._group_of[p]]
                if self.alg_base == "AdamW" and "momentum" in state:
                    state["momentum"] = state["momentum"] / (1.0 - hp["momentum_param"])
                if "normalizer" in state:
                    state["normalizer"] = state["normalizer"] / (1.0 - hp["normalizer_param"])
                if trace_scale is not None and "trace" in state:
                    state["trace"] = state["trace"] * float(trace_scale[self._index[p]])

    def __getstate__(self):  # copy, deepcopy, pickle, torch.save(optimizer)
        state = dict(self.__dict__)
        state.pop("_impl", None)  # compiled code and raw pointers: made anew on unpickling
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_layout" in state:
            self._impl = self._make_impl()

    def _make_impl(self):
        return make_impl(self.impl_name, BASE_RULES[self.alg_base], self.alg_meta != "fixed", self._layout,
                         self._beta.device, [p.dtype for p in self._params], self.state_dtype, self._beta.dtype)

    # ---- logging ---------------------------------------------------------------------------

    def step_sizes(self) -> Tensor:
        """alpha = exp(beta) per block, a device tensor (no host sync): `.tolist()` it when logging."""
        return torch.exp(self._beta)

    # ---- the step --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = []
        for gi, group in enumerate(self.param_groups):
            hp = self._group_hp[gi]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("MetaOptimize does not support sparse gradients")
                state = self._state_for(p)
                state["step"] += 1
                items.append((self._index[p], p, g, state, hp, state["step"]))
        if not items:
            return loss
        alpha = torch.exp(self._beta)  # 1. beta as it is before this step
        z = self._z
        if z is not None:
            z.zero_()
        self._impl.step(items, alpha, self.gamma, z)  # 2-4. z, w <- w - Delta, h
        if z is not None:  # 5. meta update of beta with z
            self._meta_step += 1
            beta, state = META_RULES[self.alg_meta].rule(self._beta, z, self._meta_state, self.meta_hp,
                                                         self._meta_step)
            mask = self._mask(tuple(it[0] for it in items))
            for buf, new in ((self._beta, beta), *((self._meta_state[k], v) for k, v in state.items())):
                if mask is None:
                    buf.copy_(new)
                else:  # blocks without any gradient this step keep their meta state
                    torch.where(mask, new, buf, out=buf)
        return loss

    def _mask(self, active: tuple):
        """None when every parameter has a gradient, else the blocks that have one."""
        if len(active) == len(self._params):
            return None
        mask = self._masks.get(active)
        if mask is None:
            mask = torch.zeros(self.num_blocks, dtype=torch.bool)
            lay = self._layout
            for i in active:
                mask[lay.starts[i]:lay.starts[i] + lay.units[i]] = True
            mask = self._masks[active] = mask.to(self._beta.device)
        return mask
