"""`MetaOptimizeAround`: MetaOptimize around any constructed `torch.optim.Optimizer` (spec section 10).

    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = MetaOptimize.around(base, alg_meta="Adam", alpha0=1.0, meta_stepsize=1e-3)
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict

import torch
from torch import Tensor

from . import metaoptimize, sharding
from .around_kernel import make_around_impl
from .blocks import Layout, resolve_stepsize_groups
from .impl import TensorStep, _reduce_into, keep_nonfinite, meta_update
from .metaoptimize import _positional, blocks_of, meta_settings
from .rules import META_RULES

META_STATE_FORMAT = 1


class MetaOptimizeAround(torch.optim.Optimizer):
    r"""MetaOptimize around a base optimizer (spec section 10): the Hessian-free trace from the
    change the base's own ``step()`` makes to the weights.

    .. math::
        \begin{aligned}
            &\alpha_b = e^{\beta_b}, \quad \beta_b = \log \alpha_0 \text{ at the start} \\
            &z_b = \textstyle\sum_{i \in b} h_i g_i \quad (h \text{ before this step}) \\
            &w^0 = w; \quad \text{base.step()} \rightarrow w^1; \quad u = w^1 - w^0 \\
            &w \leftarrow w^0 + \alpha \odot u \\
            &h \leftarrow \gamma (1 - \alpha \ell \kappa) h + \alpha \odot u \\
            &\beta \leftarrow \text{alg\_meta}(\beta, z) \quad \text{(spec section 4; blocks without a gradient keep theirs)}
        \end{aligned}

    where :math:`\ell` and :math:`\kappa` are the base param group's ``lr`` and ``weight_decay``
    (0 when the group has none). Nothing of the base's internals is used, so torch's SGD, Adam,
    AdamW, NAdam, RAdam, Adagrad, RMSprop, Adafactor, Muon and third-party optimizers all work.

    Args:
        base: a constructed ``torch.optim.Optimizer`` or a list of them (Muon for the 2-D weights,
            AdamW for the rest): one set of blocks over all their tensors.
        alg_meta: fixed, SGD, RMSProp, Adam, Lion (case-insensitive).
        alpha0: initial step-size multiplier (1: exactly the base optimizer at the start).
        meta_stepsize: eta. gamma: discount of the trace, in [0, 1].
        stepsize_groups: as MetaOptimize's ("scalar", "layerwise", "nodewise", "weightwise",
            "param_groups", "last_layer_and_others", named lists, lists of tensor counts).
        weight_decay_meta, normalizer_param_meta, momentum_param_meta, lion_beta2_meta: the meta
            update's hyperparameters, as MetaOptimize's.
        model: the module whose parameter order block lists follow (else the order of the
            concatenated base param groups).
        impl: "foreach" (torch._foreach_* passes: the readable reference), "fused" (after the base's
            step one pass per tensor, z summed in it: a C loop on CPU, torch.compile on CUDA; see
            around_kernel.py) or "auto" (fused where it runs, else foreach with a warning).

    ``param_groups`` are the base optimizers' own param group dicts, so LR schedulers and
    gradient clipping act on the base's lr and alpha multiplies it. ``step_sizes()`` returns
    alpha per block as a device tensor (no host sync); ``effective_step_sizes()`` lr alpha, which
    the experiments log. ``normalizer_param_meta`` defaults to 0.999 (the paper's): MetaOptimize's
    own is unset because its default meta rule, Lion, does not read it; Adam, the default here, does. ``state_dict()`` holds the base state dicts
    and the meta state (beta, meta momentum and normalizer, meta step, traces) together.
    A block whose z is not finite skips that step's meta update, counted in ``skipped_nonfinite``
    (as MetaOptimize's).
    """

    def __init__(self, base, alg_meta="Adam", alpha0=1.0, meta_stepsize=1e-3, gamma=1.0, stepsize_groups="scalar",
                 weight_decay_meta=0.0, normalizer_param_meta=0.999, momentum_param_meta=0.99, lion_beta2_meta=0.9,
                 *, model: torch.nn.Module | None = None, impl: str = "auto"):
        bases = list(base) if isinstance(base, (list, tuple)) else [base]
        if not bases or not all(isinstance(b, torch.optim.Optimizer) for b in bases):
            raise ValueError("base: a constructed torch.optim.Optimizer or a list of them")
        alg_meta, self.meta_hp = meta_settings(alg_meta, alpha0, gamma, stepsize_groups, meta_stepsize,
                                               weight_decay_meta, momentum_param_meta, normalizer_param_meta,
                                               lion_beta2_meta)
        self.bases, self.alg_meta = bases, alg_meta
        self.alpha0, self.gamma = float(alpha0), float(gamma)
        self.stepsize_groups = stepsize_groups
        # what torch.optim.Optimizer.__init__ sets, without making param groups of our own
        self.defaults = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.state = defaultdict(dict)  # per tensor: "trace" (h) and "w0" (the reused scratch buffer)

        groups = self.param_groups
        in_groups = [p for g in groups for p in g["params"]]
        if not in_groups:
            raise ValueError("base: the base optimizer has no parameters")
        if len(set(in_groups)) != len(in_groups):
            raise ValueError("base: a parameter is in more than one param group")
        if model is not None:
            chosen = set(in_groups)
            order = [p for p in model.parameters() if p in chosen]
            if len(order) != len(chosen):
                raise ValueError(f"model: {len(chosen) - len(order)} parameter(s) of the base are not the model's")
            self._params = order
        else:
            if len(groups) > 1 and _positional(stepsize_groups):
                raise ValueError(
                    f"stepsize_groups={stepsize_groups!r} counts tensors in the model's order, but the base "
                    f"parameters come in {len(groups)} param groups, which may order them otherwise; pass model=")
            self._params = in_groups
        if len({p.device for p in self._params}) > 1:
            raise ValueError("base: MetaOptimize needs all parameters on one device")
        self._index = {p: i for i, p in enumerate(self._params)}
        group_of = {p: gi for gi, g in enumerate(groups) for p in g["params"]}
        shapes = [tuple(p.shape) for p in self._params]
        kind, counts = resolve_stepsize_groups(stepsize_groups, len(self._params), [len(g["params"]) for g in groups])
        by_group = isinstance(stepsize_groups, str) and stepsize_groups.strip().lower() == "param_groups"
        self._layout = Layout.of(kind, counts, shapes, [group_of[p] for p in self._params] if by_group else None)
        self.num_blocks = num_blocks = self._layout.num_blocks
        device = self._params[0].device
        dtype = torch.float64 if torch.float64 in {p.dtype for p in self._params} else torch.float32
        self._beta = torch.full((num_blocks,), math.log(self.alpha0), device=device, dtype=dtype)
        self._meta_state = {k: torch.zeros(num_blocks, device=device, dtype=dtype) for k in META_RULES[alg_meta].state}
        self._meta_step = 0
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)  # meta updates skipped: z not finite
        self._z = torch.zeros(num_blocks, device=device, dtype=dtype) if alg_meta != "fixed" else None
        self._masks = {}
        self.impl = impl
        # FSDP2 (DTensor) parameters: the step works on the local shards, z is summed across them
        self._sharding = sharding.Sharding.of(self._params, self._layout)
        self._step_layout = self._sharding.layout if self._sharding else self._layout
        self._fused = make_around_impl(impl, self._z is not None, self._step_layout, device,
                                       {p.dtype for p in self._params}, dtype)

    # ---- param groups: the base's own dicts ------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:
        return [g for b in self.bases for g in b.param_groups]

    @param_groups.setter
    def param_groups(self, value):
        raise AttributeError("param_groups of MetaOptimizeAround are the base optimizers'; change those")

    def add_param_group(self, param_group: dict):
        raise NotImplementedError("MetaOptimizeAround: add the param group to the base optimizer before wrapping it")

    def zero_grad(self, set_to_none: bool = True):
        for b in self.bases:
            b.zero_grad(set_to_none=set_to_none)

    def __repr__(self):
        meta = ", ".join(f"{k}={v}" for k, v in self.meta_hp.items())
        bases = ", ".join(type(b).__name__ for b in self.bases)
        return (f"MetaOptimizeAround(base=[{bases}], alg_meta={self.alg_meta}, alpha0={self.alpha0:g}, "
                f"gamma={self.gamma:g}, stepsize_groups={self.stepsize_groups!r} ({self.num_blocks} blocks), "
                f"meta: {meta or 'none'})")

    # ---- logging ---------------------------------------------------------------------------

    @property
    def skipped_nonfinite(self) -> Tensor:
        """Meta updates skipped because z was not finite (per block and step; a device int64 scalar)."""
        return self._skipped

    def step_sizes(self) -> Tensor:
        """alpha per block (multiplying the base's lr), a device tensor (no host sync)."""
        return torch.exp(self._beta)

    def effective_step_sizes(self) -> Tensor:
        """The step size applied now, lr alpha per block (lr of the base param group of the block's
        first tensor), a device tensor (no host sync), as MetaOptimize's."""
        lr_of = {p: g.get("lr", 0.0) for g in self.param_groups for p in g["params"]}
        return metaoptimize.lr_times_alpha(self.step_sizes(), [lr_of[p] for p in self._params], self._layout)

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """{"base": the base optimizers' state dicts, "meta": beta, the meta state, step, traces}; the
        hooks of register_state_dict_pre_hook / _post_hook are called as torch calls them."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        traces = [self.state[p].get("trace") if p in self.state else None for p in self._params]
        state_dict = {"base": [b.state_dict() for b in self.bases],
                      "meta": {"format": META_STATE_FORMAT, "alg_meta": self.alg_meta, "num_blocks": self.num_blocks,
                               "step": self._meta_step, "beta": self._beta, "skipped_nonfinite": self._skipped,
                               **{k: self._meta_state.get(k) for k in ("momentum", "normalizer")}, "trace": traces}}
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, state_dict)
            state_dict = state_dict if out is None else out
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            state_dict = state_dict if out is None else out
        meta = state_dict.get("meta") if isinstance(state_dict, dict) else None
        if meta is None or "base" not in state_dict:
            raise ValueError("not a MetaOptimizeAround state dict (no 'base' and 'meta' entries)")
        if (meta["num_blocks"], meta["alg_meta"]) != (self.num_blocks, self.alg_meta):
            raise ValueError(f"state dict is for alg_meta={meta['alg_meta']} with {meta['num_blocks']} blocks; "
                             f"this optimizer is alg_meta={self.alg_meta} with {self.num_blocks} blocks")
        if len(state_dict["base"]) != len(self.bases) or len(meta["trace"]) != len(self._params):
            raise ValueError("state dict is for another number of base optimizers or parameters")
        for b, s in zip(self.bases, state_dict["base"]):
            b.load_state_dict(s)
        with torch.no_grad():
            self._beta.copy_(meta["beta"])
            for k, buf in self._meta_state.items():
                buf.copy_(meta[k])
            for p, h in zip(self._params, meta["trace"]):
                state = self.state[p]
                state.pop("trace", None)
                if h is not None:
                    state["trace"] = h.to(device=p.device, dtype=p.dtype, copy=True)
        self._meta_step = int(meta["step"])
        if torch.is_tensor(meta.get("skipped_nonfinite")):  # older state dicts lack the counter
            self._skipped.copy_(meta["skipped_nonfinite"].reshape(()))
        if self._fused is not None:  # the traces are new tensors: forget the cached pointers
            self._fused.reset()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):  # copy, deepcopy, pickle: all of it (torch's keeps only its own three entries)
        state = dict(self.__dict__)
        state["_fused"] = None  # a loaded C kernel and cached pointers: made anew
        return state

    def __setstate__(self, state):
        state.setdefault("impl", "auto")  # pickled before the fused step existed
        state.setdefault("_sharding", None)
        state.setdefault("_step_layout", state["_layout"])
        self.__dict__.update(state)
        self._patch_step_function()
        self._fused = make_around_impl(self.impl, self._z is not None, self._step_layout, self._beta.device,
                                       {p.dtype for p in self._params}, self._beta.dtype)

    # ---- the step --------------------------------------------------------------------------

    def _buffers(self, p: Tensor, track: bool):
        state = self.state[p]
        if "w0" not in state:
            state["w0"] = torch.empty_like(p, memory_format=torch.preserve_format)
        if track and "trace" not in state:
            state["trace"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        track = self._z is not None
        hp = {p: (g.get("lr", 0.0), g.get("weight_decay", 0.0) or 0.0) for g in self.param_groups for p in g["params"]}
        active = tuple(i for i, p in enumerate(self._params) if p.grad is not None)
        if not active:
            for b in self.bases:  # nothing to scale; the base may still count its step
                b.step()
            return loss
        params = [self._params[i] for i in active]
        local = self._sharding.local if self._sharding else (lambda x: x)
        states = [{k: local(v) for k, v in self._buffers(p, track).items()} for p in params]
        hps = [hp[p] for p in params]
        ws, gs = [local(p) for p in params], [local(p.grad) for p in params]
        alpha = torch.exp(self._beta)  # 1. beta as it is before this step
        z = self._z
        if self._fused is not None and not any(isinstance(x, Tensor) for x, _ in hps):
            self._fused_step(active, ws, gs, states, alpha, hps)
        else:
            self._foreach_step(active, ws, gs, states, alpha, hps)
        if track and self._sharding:
            self._sharding.sum_across_shards(z)
        if track:  # 5. meta update of beta with z
            self._meta_step += 1
            meta_update(META_RULES[self.alg_meta], self._beta, z, self._meta_state, self.meta_hp, self._meta_step,
                        keep_nonfinite(z, self._keep(active), self._skipped))
        return loss

    def _foreach_step(self, active, params, grads, states, alpha, hps):
        """Steps 1-4 as torch._foreach_* passes (the reference of the fused step); params, grads and
        states are the local tensors (shards under FSDP2), hps their (lr, weight decay)."""
        lay, z, track = self._step_layout, self._z, self._z is not None
        alphas = [lay.view(alpha, i) for i in active]
        if track:  # z_b = sum h g, with h before this step
            z.zero_()
            traces = [s["trace"] for s in states]
            _reduce_into(lay, z, active, traces, grads)
        w0 = [s["w0"] for s in states]
        torch._foreach_copy_(w0, params)  # 2. w0 = w; the base's own step leaves w1
        for b in self.bases:
            b.step()
        torch._foreach_sub_(params, w0)  # u = w1 - w0
        torch._foreach_mul_(params, alphas)  # alpha u
        if track:  # 4. h <- gamma (1 - alpha lr kappa) h + alpha u
            lrk = [lr * wd for lr, wd in hps]
            if not all(isinstance(x, (int, float)) for x in lrk):  # a Tensor lr (torch allows it)
                torch._foreach_mul_(traces, [self.gamma * (1 - a * x) for a, x in zip(alphas, lrk)])
            elif any(x != 0 for x in lrk):
                decay = torch._foreach_mul(alphas, [-self.gamma * x for x in lrk])
                torch._foreach_add_(decay, self.gamma)
                torch._foreach_mul_(traces, decay)
            elif self.gamma != 1.0:
                torch._foreach_mul_(traces, self.gamma)
            torch._foreach_add_(traces, params)
        torch._foreach_add_(params, w0)  # 3. w = w0 + alpha u

    def _fused_step(self, active, params, grads, states, alpha, hps):
        """Steps 1-4 in two passes: w0 = w (one copy), and after the base's step one fused pass per
        tensor for w, h and z's terms (around_kernel.py)."""
        self._fused.save([s["w0"] for s in states], params)
        for b in self.bases:
            b.step()
        if self._z is not None:
            self._z.zero_()
        per_group = {}  # one dict per (lr, weight decay): the fused step makes its scalars once per dict
        items = []
        for i, p, g, s, key in zip(active, params, grads, states, hps):
            group_hp = per_group.get(key)
            if group_hp is None:
                group_hp = per_group[key] = {"lr": key[0], "weight_decay": key[1]}
            items.append(TensorStep(i, p, g, s, group_hp, 0))
        self._fused.step(items, alpha, self.gamma, self._z)

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
