"""`MetaOptimize`: the thin optimizer class around the rules and the step implementations."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from . import sharding
from .blocks import NAMED_STEPSIZE_GROUPS, Layout, resolve_stepsize_groups
from .hessian import HESSIANS, check_hessian, curvature_kind, curvature_terms
from .impl import TensorStep, keep_nonfinite, make_impl
from .legacy import convert_format_1
from .rules import BASE_RULES, META_RULES

BASE_ALGS = {"sgd": "SGD", "sgdm": "SGDm", "rmsprop": "RMSProp", "adamw": "AdamW", "adam": "AdamW", "lion": "Lion"}
META_ALGS = {"fixed": "fixed", "sgd": "SGD", "rmsprop": "RMSProp", "adam": "Adam", "lion": "Lion"}
BASE_HP = ("normalizer_param_base", "momentum_param_base", "lion_beta2_base")  # per group, beside weight_decay
# what a param group may hold: torch's and the ecosystem's keys (schedulers add more later)
GROUP_KEYS = {"params", "param_names", "name", "lr", "initial_lr", "block", "weight_decay", "weight_decay_base",
              *BASE_HP}
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
        lo = "(-inf, " if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "inf)" if high is None else f"{high}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be a finite number in {lo}{hi}, got {value!r}")


def _check_hyperparameter(name: str, value, needed_by: str):
    if value is None:
        raise ValueError(f"{name} is required by {needed_by} but is unset")
    if name.startswith(("weight_decay", "meta_stepsize", "lr")):
        _check(name, value, low=0.0)
    else:  # momentum, normalizer, Lion interpolation: decay rates
        _check(name, value, low=0.0, high=1.0, high_open=True)


STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}


def _state_dtype(value) -> torch.dtype | None:
    """state_dtype: None, a floating torch dtype, or its name ("bfloat16", "torch.bfloat16")."""
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key not in STATE_DTYPES:
            raise ValueError(f"state_dtype: unknown value {value!r}; accepted: None, {', '.join(STATE_DTYPES)}")
        return STATE_DTYPES[key]
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"state_dtype must be None or a floating torch dtype ({', '.join(STATE_DTYPES)}), "
                         f"got {value!r}")
    return value


def meta_settings(alg_meta, alpha0, gamma, stepsize_groups, meta_stepsize, weight_decay_meta, momentum_param_meta,
                  normalizer_param_meta, lion_beta2_meta) -> tuple[str, dict]:
    """The checks of the settings MetaOptimize and MetaOptimizeAround share; returns the canonical
    alg_meta and the meta rule's hyperparameters (ValueError naming the argument)."""
    alg_meta = canonical(alg_meta, META_ALGS, "alg_meta")
    _check("alpha0", alpha0, low=0.0, low_open=True)
    # beta = log(alpha0) lives in float32 (for float32 weights): exp(beta) must be a positive finite number
    alpha32 = torch.exp(torch.tensor(math.log(alpha0), dtype=torch.float32)).item()
    if not (math.isfinite(alpha32) and alpha32 > 0):
        raise ValueError(f"alpha0 must be a step size float32 can hold (about 1e-38 to 3e38), got {alpha0!r}")
    if stepsize_groups is None:
        raise ValueError("stepsize_groups: None is not a block layout; use 'scalar' (one step size), "
                         "'layerwise', 'nodewise', 'weightwise', 'param_groups' or a list of tensor counts")
    _check("gamma", gamma, low=0.0, high=1.0)
    meta_hp = {"meta_stepsize": meta_stepsize, "weight_decay": weight_decay_meta,
               "momentum_param": momentum_param_meta, "normalizer_param": normalizer_param_meta,
               "lion_beta2": lion_beta2_meta}
    meta = META_RULES[alg_meta]
    for key in meta.hyperparameters:
        _check_hyperparameter(key if key == "meta_stepsize" else key + "_meta", meta_hp[key], f"alg_meta={alg_meta!r}")
    return alg_meta, {k: meta_hp[k] for k in meta.hyperparameters}


def check_settings(alg_base, alg_meta, alpha0, gamma, stepsize_groups, meta_stepsize, weight_decay_meta,
                   momentum_param_meta, normalizer_param_meta, lion_beta2_meta, hessian, state_dtype):
    """MetaOptimize's checks of the settings that need no parameters (ValueError naming the argument):
    the constructor's, and a check before any model exists (common/specs.py) without building one.
    Returns the canonical alg_base and alg_meta, the meta rule's hyperparameters and the state dtype."""
    alg_base = canonical(alg_base, BASE_ALGS, "alg_base")
    alg_meta, meta_hp = meta_settings(alg_meta, alpha0, gamma, stepsize_groups, meta_stepsize, weight_decay_meta,
                                      momentum_param_meta, normalizer_param_meta, lion_beta2_meta)
    state_dtype = _state_dtype(state_dtype)
    if hessian not in HESSIANS:
        raise ValueError(f"hessian: unknown value {hessian!r}; accepted: None, 'hvp', 'block_diagonal'")
    return alg_base, alg_meta, meta_hp, state_dtype


def base_hyperparameters(alg_base: str, group: dict, where: str | None = "") -> dict:
    """The base rule's hyperparameters of a param group (or of the constructor's defaults), and lr,
    checked to be set and finite unless `where` is None (`where` goes into the message)."""
    hp = {"lr": group["lr"]}
    for key in BASE_RULES[alg_base].hyperparameters:
        hp[key] = group["weight_decay" if key == "weight_decay" else key + "_base"]
    if where is not None:
        for key, value in hp.items():
            name = key if key in ("lr",) else key + "_base"
            _check_hyperparameter(name, value, f"alg_base={alg_base!r}{where}")
    return {k: float(v) for k, v in hp.items()}


def blocks_of(layout, active, num_blocks: int) -> Tensor:
    """A host bool per block: True for the blocks of the tensors `active` (indices into the layout),
    those that had a gradient this step."""
    mask = torch.zeros(num_blocks, dtype=torch.bool)
    for i in active:
        mask[layout.starts[i]:layout.starts[i] + layout.units[i]] = True
    return mask


def _positional(spec) -> bool:
    """Whether a stepsize_groups value counts tensors in order (so the order of the parameters matters)."""
    if not isinstance(spec, str):
        return True
    low = spec.strip().lower()
    return low == "last_layer_and_others" or low in NAMED_STEPSIZE_GROUPS or low.strip("[]() ")[:1].isdigit()


def check_param_states(optimizer: torch.optim.Optimizer, state_dict: dict, keys: tuple[str, ...]) -> None:
    """ValueError (naming the parameter and the key) unless every parameter's state in `state_dict`
    holds "step" and `keys`, each a floating-point tensor of its parameter's shape, and the param
    groups match `optimizer`'s. For a load_state_dict pre-hook: torch maps saved states to the
    parameters by position and casts them to the parameter's dtype and device, so a wrong shape or
    a missing key would only show at step() (or as out-of-bounds writes of a fused step)."""
    groups, states = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(states, dict):
        raise ValueError("state dict: needs 'state' (a dict) and 'param_groups' (a list)")
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"state dict has {len(groups)} param groups; this optimizer has {len(optimizer.param_groups)}")
    ids, params = [], []
    for g, (saved, mine) in enumerate(zip(groups, optimizer.param_groups)):
        saved_ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(saved_ids, list) or len(saved_ids) != len(mine["params"]):
            n = len(saved_ids) if isinstance(saved_ids, list) else "no"
            raise ValueError(f"state dict: param group {g} has {n} parameters; this optimizer's has {len(mine['params'])}")
        ids += saved_ids
        params += mine["params"]
    unknown = set(states) - set(ids)
    if unknown:
        raise ValueError(f"state dict: state for parameter id {sorted(map(str, unknown))[0]} that no param group names")
    for index, (pid, p) in enumerate(zip(ids, params)):
        state = states.get(pid)
        if state is None:  # no step taken for it yet
            continue
        where = f"state dict: parameter {index} (shape {tuple(p.shape)})"
        if not isinstance(state, dict):
            raise ValueError(f"{where}: its state is a {type(state).__name__}, not a dict")
        step = state.get("step")
        if torch.is_tensor(step):
            step = step.item() if step.numel() == 1 else None
        if not (isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) and step >= 0):
            raise ValueError(f"{where}: 'step' must be a number >= 0, got {state.get('step')!r}")
        for key in keys:
            if key not in state:
                raise ValueError(f"{where}: no {key!r} in its state (needed by this optimizer's rule)")
            v = state[key]
            if not torch.is_tensor(v) or not (v.is_floating_point() or (p.is_complex() and v.is_complex())):
                what = f"a {v.dtype} tensor" if torch.is_tensor(v) else type(v).__name__
                raise ValueError(f"{where}: {key!r} must be a floating-point tensor, got {what}")
            # a complex parameter's state is complex, or its real view (a real state_dtype)
            shapes = {tuple(p.shape)} | ({tuple(p.shape) + (2,)} if p.is_complex() and not v.is_complex() else set())
            if tuple(v.shape) not in shapes:
                raise ValueError(f"{where}: {key!r} has shape {tuple(v.shape)}, not the parameter's")
            if v.device.type == "meta":
                raise ValueError(f"{where}: {key!r} is on the meta device (it holds no values)")


def _check_vector(meta: dict, key: str, size: int) -> None:
    v = meta.get(key)
    if not torch.is_tensor(v) or not v.is_floating_point() or v.numel() != size or v.device.type == "meta":
        what = f"a {v.dtype} tensor of {v.numel()} values" if torch.is_tensor(v) else type(v).__name__
        raise ValueError(f"state dict: meta {key!r} must be a floating-point tensor of {size} values "
                         f"(one per block), got {what}")


class MetaOptimize(torch.optim.Optimizer):
    r"""MetaOptimize (spec sections 2-5 and 9; the rules: `rules.py`).

    Each block b of weights has a log step size beta_b, alpha_b = exp(beta_b) = alpha0 at the start.
    Per step: z_b = sum_{i in b} h_i g_i; the base update w <- w - lr alpha d (d from `alg_base`);
    h <- gamma (1 - kappa lr alpha) h - lr alpha d; then `alg_meta` moves beta with z.

    Args (the paper's flags in snake case; algorithm names are case-insensitive; hyperparameters
    the chosen algorithms do not read are ignored, so None is fine for them):
        params: parameters, named parameters, param groups, or a module (its trainable parameters).
            Complex parameters step as their real views (torch.view_as_real), as in torch's optimizers.
        alg_base: SGD, SGDm, RMSProp, AdamW (alias Adam), Lion.
        alg_meta: fixed (beta never moves), SGD, RMSProp, Adam, Lion.
        alpha0: initial step size. meta_stepsize: eta (0 freezes beta). gamma: discount in [0, 1].
        stepsize_groups: "scalar", "layerwise", "nodewise", "weightwise", "param_groups" (a block
            per param group), "last_layer_and_others", a named list ("resnet18_blocks", ...) or a
            list of tensor counts such as [3, 12, 47]. Lists count tensors in the model's order:
            with several param groups (timm, HF), pass `model=` so that they mean the same tensors.
        weight_decay_base (alias weight_decay): kappa; *_base: lambda (normalizer), rho (momentum),
            c (Lion interpolation) of the base update. Param groups may set `weight_decay` and the
            *_base keys, `lr` (1 by default: a multiplier on the tuned step size, which is what LR
            schedulers change) and `block` (the index of an existing block to join, for groups
            added later). Any other key is an error. *_meta: the same for the meta update.
        lr: the default `lr` of the param groups (1: alpha as tuned).
        model: the module whose parameter order block lists follow.
        hessian: None (the Hessian-free trace), "hvp" (one Hessian-vector product per step; call
            `loss.backward(create_graph=True)`), or "block_diagonal" (H_bb h_b per block; for
            weight-wise blocks the exact Hessian diagonal, one product per weight). With several
            ranks, run the forward through the module itself (DDP's reducer cannot take a double
            backward): the optimizer averages the gradients and the products across ranks.
        rectify: with hessian="block_diagonal" and weight-wise blocks, IDBD's (1 - alpha H_ii)^+.
        impl: "auto" (default: "fused" where it runs, else "foreach", with one warning; also when
            torch.compile fails at its first call), "fused" (one pass per tensor: a compiled C loop on
            CPU, torch.compile on CUDA; raises where it cannot run), or "foreach" (torch._foreach_*).
        state_dtype: dtype of the base state and the trace (torch.bfloat16 halves their memory):
            a floating torch dtype or its name ("bfloat16", "float16", "float32", "float64"); None
            keeps the parameters' dtype. Anything else is a ValueError.

    `step_sizes()` returns alpha per block and `effective_step_sizes()` lr alpha (lr of the block's
    first param group), as device tensors (no host sync): `.tolist()` them when you log. State per
    tensor: "step", "momentum" and "normalizer" as in the spec (sums for AdamW), "trace" (h); beta
    and the meta state are in `state_dict()["meta"]`. Parameters sharded by FSDP2 (DTensor) update
    their local shards, and z is summed across the shards, so every rank keeps the same beta.

    Non-finite gradients: a block whose z (sum of h g) is NaN or inf at a step skips that step's
    meta update (beta and its meta state unchanged, as for a block without gradients), and
    `skipped_nonfinite` counts it (per block and step, a device tensor saved in the state dict). The
    base update still applies the gradient it got: a NaN gradient element makes that weight (and its
    trace) NaN, which the caller sees; the step sizes and the other weights stay finite.
    """

    def __init__(
        self,
        params: Iterable | torch.nn.Module,
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
        lr: float = 1.0,
        weight_decay: float | None = None,
        model: torch.nn.Module | None = None,
        hessian: str | None = None,
        rectify: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | None = None,
    ):
        alg_base, alg_meta, meta_hp, state_dtype = check_settings(
            alg_base, alg_meta, alpha0, gamma, stepsize_groups, meta_stepsize, weight_decay_meta, momentum_param_meta,
            normalizer_param_meta, lion_beta2_meta, hessian, state_dtype)
        if weight_decay is not None:  # the ecosystem's name for the base weight decay
            weight_decay_base = weight_decay
        if isinstance(params, torch.nn.Module):
            model = params if model is None else model
            params = [p for p in params.parameters() if p.requires_grad]
        self.alg_base, self.alg_meta = alg_base, alg_meta
        self.alpha0, self.gamma = float(alpha0), float(gamma)
        self.meta_hp = meta_hp
        self.stepsize_groups, self.impl_name, self.state_dtype = stepsize_groups, impl, state_dtype
        self.hessian, self.rectify = hessian, bool(rectify)
        defaults = dict(lr=lr, weight_decay=weight_decay_base, normalizer_param_base=normalizer_param_base,
                        momentum_param_base=momentum_param_base, lion_beta2_base=lion_beta2_base)
        super().__init__(params, defaults)
        self._build_blocks(None if model is None else list(model.parameters()))
        # beta and the meta state go into state_dict() before, and come out of it after, any user hook
        self.register_state_dict_post_hook(MetaOptimize._save_meta, prepend=True)
        self.register_load_state_dict_pre_hook(MetaOptimize._stash_meta, prepend=True)
        self.register_load_state_dict_post_hook(MetaOptimize._load_meta, prepend=True)

    @staticmethod
    def around(base, alg_meta="Adam", alpha0=1.0, meta_stepsize=1e-3, gamma=1.0, stepsize_groups="scalar",
               weight_decay_meta=0.0, normalizer_param_meta=0.999, momentum_param_meta=0.99, lion_beta2_meta=0.9,
               *, model=None, impl="auto"):
        """MetaOptimize around a constructed torch.optim.Optimizer, or a list of them (spec section 10):
        its own step() runs and alpha scales the change it makes. See `MetaOptimizeAround`."""
        from .around import MetaOptimizeAround

        return MetaOptimizeAround(base, alg_meta, alpha0, meta_stepsize, gamma, stepsize_groups, weight_decay_meta,
                                  normalizer_param_meta, momentum_param_meta, lion_beta2_meta, model=model,
                                  impl=impl)

    # ---- param groups and blocks -------------------------------------------------------------

    def add_param_group(self, param_group: dict):
        """Add a param group; after construction its tensors get new blocks (alpha0), or join the
        existing block `param_group["block"]` (tensor blocks)."""
        group = dict(param_group)
        if "weight_decay_base" in group:
            wd = group.pop("weight_decay_base")
            if "weight_decay" in group and group["weight_decay"] != wd:
                raise ValueError("param group: weight_decay and weight_decay_base disagree; give one")
            group["weight_decay"] = wd
        self._check_keys(group)
        super().add_param_group(group)
        group = self.param_groups[-1]
        self._check_group(group, len(self.param_groups) - 1)
        if hasattr(self, "_beta"):  # torch's __init__ adds the initial groups through here
            self._add_blocks(group)

    @staticmethod
    def _check_keys(group):
        unknown = sorted(set(group) - GROUP_KEYS)
        if unknown:
            raise ValueError(f"param group key {unknown[0]!r} is not a MetaOptimize setting; accepted: "
                             f"{', '.join(sorted(GROUP_KEYS - {'params'}))}")

    def _check_group(self, group, index):
        where = f" (param group {index})" if len(self.param_groups) > 1 else ""
        self._hyperparameters(group, where)
        if self.hessian is not None and any(p.is_complex() for p in group["params"]):
            raise ValueError(f"hessian={self.hessian!r} does not support complex parameters (view them as real "
                             "with torch.view_as_real)")

    def _adopt_new_params(self):
        """Give blocks to tensors put into `param_groups` without add_param_group (Lightning's
        BackboneFinetuning restores its groups so on resume), as add_param_group would have."""
        if sum(len(g["params"]) for g in self.param_groups) <= len(self._params):
            return
        for index, group in enumerate(self.param_groups):
            new = [p for p in group["params"] if p not in self._index]
            if new:
                self._check_keys(group)
                self._check_group(group, index)
                self._add_blocks({**group, "params": new})

    def _hyperparameters(self, group, where="") -> dict:
        """The base rule's hyperparameters of a param group, and lr."""
        return base_hyperparameters(self.alg_base, group, where)

    def _build_blocks(self, model_order):
        in_groups = [p for g in self.param_groups for p in g["params"]]
        if not in_groups:
            raise ValueError("params: MetaOptimize got an empty parameter list")
        if model_order is not None:
            missing = set(in_groups) - set(model_order)
            if missing:
                raise ValueError(f"model: {len(missing)} parameter(s) given to the optimizer are not the model's")
            chosen = set(in_groups)
            self._params = [p for p in model_order if p in chosen]
        else:
            if len(self.param_groups) > 1 and _positional(self.stepsize_groups):
                raise ValueError(
                    f"stepsize_groups={self.stepsize_groups!r} counts tensors in the model's order, but the "
                    f"parameters come in {len(self.param_groups)} param groups, which may order them otherwise "
                    "(timm, HF); pass model=the module (or one group)")
            self._params = in_groups
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(f"params: MetaOptimize needs all parameters on one device, got {sorted(map(str, devices))}")
        self._index = {p: i for i, p in enumerate(self._params)}
        group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        kind, counts = resolve_stepsize_groups(self.stepsize_groups, len(self._params),
                                               [len(g["params"]) for g in self.param_groups])
        if isinstance(self.stepsize_groups, str) and self.stepsize_groups.strip().lower() == "param_groups":
            blocks = [group_of[p] for p in self._params]  # by membership, whatever the order
        else:
            blocks = [b for b, c in enumerate(counts or []) for _ in range(c)]
        self._kind, self._tensor_blocks = kind, blocks if kind == "tensor" else None
        self._check_hessian()
        device = self._params[0].device
        # beta and the meta state: float32, or float64 for float64 parameters (then exact to ~1e-15)
        dtype = torch.float64 if torch.float64 in {p.dtype.to_real() for p in self._params} else torch.float32
        num_blocks = len(counts) if kind == "tensor" else 0
        self._beta = torch.empty(0, device=device, dtype=dtype)
        self._meta_state = {k: torch.empty(0, device=device, dtype=dtype) for k in META_RULES[self.alg_meta].state}
        self._meta_step = 0
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)  # see skipped_nonfinite
        self._relayout(num_blocks)

    def _add_blocks(self, group):
        new = [p for p in group["params"]]
        for p in new:
            self._index[p] = len(self._params)
            self._params.append(p)
        num_blocks = self.num_blocks
        if self._kind == "tensor":
            join = group.get("block")
            if join is not None:
                if not (isinstance(join, int) and 0 <= join < num_blocks):
                    raise ValueError(f"param group block: {join!r} is not a block index (0..{num_blocks - 1})")
                self._tensor_blocks += [join] * len(new)
            elif str(self.stepsize_groups).strip().lower() == "layerwise":
                self._tensor_blocks += list(range(num_blocks, num_blocks + len(new)))
                num_blocks += len(new)
            else:
                self._tensor_blocks += [num_blocks] * len(new)
                num_blocks += 1
        self._relayout(num_blocks)

    def _relayout(self, num_tensor_blocks):
        """(Re)make the layout for self._params; beta and the meta state keep their values and grow."""
        self._layout = Layout.of(self._kind, None, [_real_shape(p) for p in self._params], self._tensor_blocks,
                                 num_tensor_blocks)
        num_blocks = self._layout.num_blocks
        grow = num_blocks - self._beta.numel()
        like = dict(device=self._beta.device, dtype=self._beta.dtype)
        self._beta = torch.cat([self._beta, torch.full((grow,), math.log(self.alpha0), **like)])
        self._meta_state = {k: torch.cat([v, torch.zeros(grow, **like)]) for k, v in self._meta_state.items()}
        self.num_blocks = num_blocks
        self._z = torch.zeros(num_blocks, **like) if self.alg_meta != "fixed" else None
        self._sharding = sharding.Sharding.of(self._params, self._layout)
        self._impl = self._make_impl()
        self._masks = {}

    def _check_hessian(self):
        check_hessian(self.hessian, self.rectify, self.alg_meta, self._kind, self._params)

    @property
    def _curvature_kind(self):
        return curvature_kind(self.hessian, self.rectify, self._kind)

    def _make_impl(self):
        return make_impl(self.impl_name, BASE_RULES[self.alg_base], self.alg_meta != "fixed",
                         self._sharding.layout if self._sharding else self._layout, self._beta.device,
                         [p.dtype.to_real() for p in self._params], self.state_dtype, self._beta.dtype, self._curvature_kind,
                         META_RULES[self.alg_meta])

    @property
    def impl(self) -> str:
        """The implementation in use: "fused" or "foreach"."""
        return self._impl.name

    def __repr__(self):
        kind = self.stepsize_groups if isinstance(self.stepsize_groups, str) else list(self.stepsize_groups)
        meta = ", ".join(f"{k}={v}" for k, v in self.meta_hp.items())
        lines = [f"{type(self).__name__}(alg_base={self.alg_base}, alg_meta={self.alg_meta}, alpha0={self.alpha0:g}, "
                 f"gamma={self.gamma:g}, stepsize_groups={kind!r} ({self.num_blocks} blocks), impl={self.impl}"
                 + (f", hessian={self.hessian!r}" if self.hessian else "")
                 + (f", state_dtype={self.state_dtype}" if self.state_dtype else ""),
                 f"  meta: {meta or 'none'}"]
        for i, group in enumerate(self.param_groups):
            settings = ", ".join(f"{k}={v}" for k, v in group.items() if k not in ("params", "param_names"))
            lines.append(f"  param group {i} ({len(group['params'])} tensors): {settings}")
        return "\n".join(lines) + "\n)"

    # ---- state -----------------------------------------------------------------------------

    def _state_for(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            dtype = self.state_dtype or p.dtype
            # complex: complex state as torch keeps it, or its real view in a real state_dtype
            like = torch.view_as_real(p) if p.is_complex() and self.state_dtype is not None else p
            for name in self._state_names():
                state[name] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
            self._impl.reset()
        return state

    def _state_names(self) -> tuple[str, ...]:
        """The state tensors of each parameter: the base rule's, and the trace h (not for a fixed step size)."""
        return BASE_RULES[self.alg_base].state + (("trace",) if self.alg_meta != "fixed" else ())

    @staticmethod
    def _save_meta(self, state_dict):
        self._adopt_new_params()
        state_dict["meta"] = {"format": STATE_FORMAT, "alg_base": self.alg_base, "alg_meta": self.alg_meta,
                              "num_blocks": self.num_blocks, "step": self._meta_step, "beta": self._beta,
                              "skipped_nonfinite": self._skipped,
                              **{k: self._meta_state.get(k) for k in ("momentum", "normalizer")}}
        return state_dict

    @staticmethod
    def _stash_meta(self, state_dict):
        meta = state_dict.get("meta")
        if meta is None:
            raise ValueError("not a MetaOptimize state dict (no 'meta' entry)")
        self._adopt_new_params()
        # everything is checked here, before torch loads anything: a failed load changes nothing
        missing = [k for k in ("num_blocks", "alg_base", "alg_meta", "step", "beta") if k not in meta]
        if missing:
            raise ValueError(f"state dict: meta has no {missing[0]!r}")
        if (meta["num_blocks"], meta["alg_base"], meta["alg_meta"]) != (self.num_blocks, self.alg_base, self.alg_meta):
            raise ValueError(
                f"state dict is for ({meta['alg_base']}, {meta['alg_meta']}) with {meta['num_blocks']} blocks; "
                f"this optimizer is ({self.alg_base}, {self.alg_meta}) with {self.num_blocks} blocks")
        for key in ("beta", *self._meta_state):
            _check_vector(meta, key, self.num_blocks)
        if meta.get("format", 1) == 1 and meta.get("trace_scale") is not None:
            _check_vector(meta, "trace_scale", len(self._params))
        check_param_states(self, state_dict, self._state_names())
        self._loading = meta
        return state_dict

    @staticmethod
    def _load_meta(self):
        meta = self.__dict__.pop("_loading")
        for group in self.param_groups:  # param groups saved before lr and weight_decay were group keys
            if "weight_decay_base" in group:
                group["weight_decay"] = group.pop("weight_decay_base")
            group.setdefault("lr", 1.0)
        with torch.no_grad():
            if meta.get("format", 1) == 1:
                convert_format_1(self.state, self.param_groups, self.alg_base, meta.get("trace_scale"), self._index)
            for state in self.state.values():  # torch casts state to the parameter's dtype
                for k, v in state.items():
                    if torch.is_tensor(v) and k != "step" and self.state_dtype is not None:
                        state[k] = v.to(self.state_dtype)
            self._beta.copy_(meta["beta"].reshape(-1))
            for k, buf in self._meta_state.items():
                buf.copy_(meta[k].reshape(-1))
        self._meta_step = int(meta["step"])
        if torch.is_tensor(meta.get("skipped_nonfinite")):  # older state dicts lack the counter
            self._skipped.copy_(meta["skipped_nonfinite"].reshape(()))
        self._impl.reset()

    def __getstate__(self):  # copy, deepcopy, pickle, torch.save(optimizer)
        state = dict(self.__dict__)
        state.pop("_impl", None)  # compiled code and raw pointers: made anew on unpickling
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_layout" in state:
            self._impl = self._make_impl()

    # ---- logging ---------------------------------------------------------------------------

    @property
    def skipped_nonfinite(self) -> Tensor:
        """Meta updates skipped because z was not finite, counted per block and step: a device int64
        scalar (no host sync; the harness logs it as meta/skipped_nonfinite)."""
        return self._skipped

    def step_sizes(self) -> Tensor:
        """alpha = exp(beta) per block, the factor MetaOptimize tunes (without the lr), a device
        tensor (no host sync): `.tolist()` it when logging."""
        return torch.exp(self._beta)

    def effective_step_sizes(self) -> Tensor:
        """The step size applied now, lr alpha per block (a block takes the lr of the param group of
        its first tensor; lr is 1 unless a scheduler sets it), a device tensor (no host sync)."""
        lr_of = {p: g["lr"] for g in self.param_groups for p in g["params"]}
        return lr_times_alpha(self.step_sizes(), [lr_of[p] for p in self._params], self._layout)

    # ---- the step --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adopt_new_params()
        items, local = [], self._sharding.local if self._sharding else (lambda x: x)
        # every gradient is checked before any state is touched: an error leaves the optimizer as it was
        if any(p.grad is not None and p.grad.is_sparse for g in self.param_groups for p in g["params"]):
            raise RuntimeError("MetaOptimize does not support sparse gradients")
        for group in self.param_groups:
            hp = self._hyperparameters(group, None)
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self._state_for(p)
                state["step"] += 1
                streams = {k: _real(local(v)) for k, v in state.items() if k != "step"}
                items.append(TensorStep(self._index[p], _real(local(p)), _real(local(g)), streams, hp, state["step"]))
        if not items:
            return loss
        if self.hessian is not None:
            self._curvature(items)
        if not self._sharding and getattr(self._impl, "fuses_meta", False) and self._impl.fused_meta_ready(items):
            # 1-5 in one pass per weight (weight-wise blocks: z is the weight's h g); what it could not
            # step (the compiled step failed) takes the path below
            items = self._impl.step_with_meta(items, self.gamma, self._beta, self._meta_state, self.meta_hp,
                                              self._meta_step + 1, self._skipped)
            if not items:
                self._meta_step += 1
                return loss
        alpha = torch.exp(self._beta)  # 1. beta as it is before this step
        z = self._z
        if z is not None:
            z.zero_()
        self._impl.step(items, alpha, self.gamma, z)  # 2-4. z, w <- w - Delta, h
        if z is not None:  # 5. meta update of beta with z
            if self._sharding:
                self._sharding.sum_across_shards(z)
            self._meta_step += 1
            keep = keep_nonfinite(z, self._keep(tuple(it.index for it in items)), self._skipped)
            self._impl.meta_update(self._beta, z, self._meta_state, self.meta_hp, self._meta_step, keep)
        return loss

    def _keep(self, active: tuple):
        """None when every parameter has a gradient, else a device uint8 per block, set for the blocks
        without one: they keep their beta and meta state."""
        if len(active) == len(self._params):
            return None
        keep = self._masks.get(active)
        if keep is None:
            keep = self._masks[active] = (~blocks_of(self._layout, active, self.num_blocks)).to(
                device=self._beta.device, dtype=torch.uint8)
        return keep

    def _curvature(self, items):
        """The Hessian term of spec section 9 (hessian.py), put in each item's "curvature"."""
        products = curvature_terms(self.hessian, self._curvature_kind, [self._params[it.index] for it in items],
                                   [it.state["trace"] for it in items], [self._layout.starts[it.index] for it in items],
                                   sharded=bool(self._sharding))
        for it, product in zip(items, products):
            it.state["curvature"] = product


def lr_times_alpha(alpha: Tensor, lrs: list, layout=None) -> Tensor:
    """lr alpha per block, a tensor on alpha's device (no host sync). `lrs`: the lr of each tensor of
    `layout` (a block takes the lr of its first tensor), or without a layout one lr per block. One lr
    for all (floats, or one tensor): no host-device copy."""
    if not lrs:
        return alpha
    first = lrs[0]
    if all(x is first for x in lrs) or all(not isinstance(x, Tensor) and x == first for x in lrs):
        return alpha if not isinstance(first, Tensor) and first == 1 else alpha * first
    per_block = lrs
    if layout is not None:
        per_block = [None] * alpha.numel()
        for i, lr in enumerate(lrs):
            for b in range(layout.starts[i], layout.starts[i] + layout.units[i]):
                if per_block[b] is None:
                    per_block[b] = lr
    if not any(isinstance(x, Tensor) for x in per_block):
        return alpha * torch.tensor(per_block, dtype=alpha.dtype).to(alpha.device, non_blocking=True)
    return alpha * torch.stack([torch.as_tensor(x, dtype=alpha.dtype).to(alpha.device) for x in per_block])


def _real(t: Tensor) -> Tensor:
    """A complex tensor as its real view (..., 2), as torch's optimizers step it."""
    return torch.view_as_real(t) if t.is_complex() else t


def _real_shape(p: Tensor) -> tuple:
    return tuple(p.shape) + ((2,) if p.is_complex() else ())
