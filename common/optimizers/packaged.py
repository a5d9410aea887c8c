"""The authors' packaged optimizer, `MetaOptimize_AdamW_Lion_hg` (spec section 8).

Its rule differs from the paper's framework (bias-corrected AdamW moments, the trace takes the
update direction +alpha g / (sqrt(v) + 1e-8), the meta momentum is updated before its sign is
taken), so it keeps its own short implementation, as the authors' package does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .blocks import resolve_stepsize_groups
from .metaoptimize import _real, check_param_states, lr_times_alpha

# what a param group may set per tensor; the meta settings are the blocks', so the whole optimizer's
GROUP_KEYS = {"params", "param_names", "name", "lr", "initial_lr", "weight_decay", "b1", "b2"}
META_KEYS = ("meta_stepsize", "gamma", "meta_b1", "meta_c1")


class MetaOptimize_AdamW_Lion_hg(torch.optim.Optimizer):  # noqa: N801 (the authors' name)
    """Drop-in for `meta_optimize.optimizer.MetaOptimize_AdamW_Lion_hg` (AdamW base, Lion meta).

    Same argument names and defaults as the authors' package. Blocks are fixed by position,
    so a parameter with no gradient is skipped without shifting the blocks; a block none of
    whose tensors has a gradient is left unchanged.

    As in the torch ecosystem (beyond the authors' package): param groups may set `weight_decay`,
    `b1`, `b2` and `lr` (1 by default, a multiplier on the tuned step size, which LR schedulers
    change; `step_sizes()` reports alpha, `effective_step_sizes()` lr alpha); a group added later
    (`add_param_group`) is a new block at alpha0.
    """

    def __init__(self, params, meta_stepsize=1e-3, alpha0=1e-3, stepsize_blocks="scalar", gamma=0.9999,
                 b1=0.9, b2=0.999, meta_b1=0.99, meta_c1=0.9, weight_decay=0.0, *, lr=1.0):
        if not alpha0 > 0:
            raise ValueError(f"alpha0 must be > 0, got {alpha0}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        for name, value in (("b1", b1), ("b2", b2), ("meta_b1", meta_b1), ("meta_c1", meta_c1)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.alpha0 = alpha0
        defaults = dict(meta_stepsize=meta_stepsize, gamma=gamma, b1=b1, b2=b2, meta_b1=meta_b1,
                        meta_c1=meta_c1, weight_decay=weight_decay, lr=lr)
        super().__init__(params, defaults)
        self._params = [p for g in self.param_groups for p in g["params"]]
        if not self._params:
            raise ValueError("params: got an empty parameter list")
        spec = stepsize_blocks
        if isinstance(spec, str) and spec.lower() not in ("scalar", "layerwise"):
            raise ValueError(f"stepsize_blocks must be 'scalar', 'layerwise' or a list of tensor counts, got {spec!r}")
        _, counts = resolve_stepsize_groups(spec, len(self._params))
        self._blocks = []
        start = 0
        for c in counts:
            self._blocks.append(self._params[start:start + c])
            start += c
        self.meta_state = [self._new_block() for _ in counts]
        self.register_state_dict_post_hook(type(self)._save_meta, prepend=True)
        self.register_load_state_dict_pre_hook(type(self)._stash_meta, prepend=True)
        self.register_load_state_dict_post_hook(type(self)._load_meta, prepend=True)

    def _new_block(self) -> dict:
        # follows the parameters (a complex one's real dtype: beta is real)
        like = dict(device=self._params[0].device, dtype=self._params[0].dtype.to_real())
        return {"beta": torch.tensor(math.log(self.alpha0), **like), "meta_momentum": torch.zeros((), **like)}

    def add_param_group(self, param_group: dict):
        unknown = sorted(set(param_group) - GROUP_KEYS - set(META_KEYS))
        if unknown:
            raise ValueError(f"param group key {unknown[0]!r} is not a setting of MetaOptimize_AdamW_Lion_hg; "
                             f"accepted: {', '.join(sorted(GROUP_KEYS - {'params'}))}")
        for key in META_KEYS:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(f"param group: {key} is a setting of the whole optimizer (its blocks), not of "
                                 "a param group")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name in ("lr", "weight_decay"):
            if not (isinstance(group[name], (int, float)) and math.isfinite(group[name]) and group[name] >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {group[name]!r}")
        for name in ("b1", "b2"):
            if not 0.0 <= group[name] < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {group[name]}")
        if hasattr(self, "meta_state"):  # after construction: a new block
            self._add_block(group["params"])

    def _add_block(self, params):
        self._params += params
        self._blocks.append(list(params))
        self.meta_state.append(self._new_block())

    def _adopt_new_params(self):
        """A new block for each group's tensors put into `param_groups` without add_param_group
        (Lightning's BackboneFinetuning restores its groups so on resume)."""
        if sum(len(g["params"]) for g in self.param_groups) <= len(self._params):
            return
        known = set(self._params)
        for group in self.param_groups:
            new = [p for p in group["params"] if p not in known]
            if new:
                self._add_block(new)

    def __getstate__(self):  # copy, deepcopy, pickle: keep the blocks and the meta state
        return dict(self.__dict__)

    def _group_of(self) -> dict:
        return {p: g for g in self.param_groups for p in g["params"]}

    def step_sizes(self) -> Tensor:
        """alpha = exp(beta) per block, the factor tuned (without the lr), a device tensor."""
        return torch.exp(torch.stack([m["beta"] for m in self.meta_state]))

    def effective_step_sizes(self) -> Tensor:
        """The step size applied now, lr alpha per block (lr of the param group of the block's first
        tensor), a device tensor (no host sync)."""
        group_of = self._group_of()
        return lr_times_alpha(self.step_sizes(), [group_of[block[0]]["lr"] for block in self._blocks])

    # the meta state goes into state_dict() before, and comes out of it after, any user hook
    def _save_meta(self, state_dict):
        self._adopt_new_params()
        state_dict["meta_state"] = self.meta_state
        return state_dict

    def _stash_meta(self, state_dict):
        if "meta_state" not in state_dict:
            raise ValueError("not a MetaOptimize_AdamW_Lion_hg state dict (no 'meta_state' entry)")
        self._adopt_new_params()
        saved = state_dict["meta_state"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.meta_state):
            n = len(saved) if isinstance(saved, (list, tuple)) else "no list of"
            raise ValueError(f"state dict has {n} blocks; this optimizer has {len(self.meta_state)}")
        for b, block in enumerate(saved):  # checked before torch loads anything: a failed load changes nothing
            for key in ("beta", "meta_momentum"):
                v = block.get(key) if isinstance(block, dict) else None
                if not torch.is_tensor(v) or not v.is_floating_point() or v.numel() != 1:
                    raise ValueError(f"state dict: block {b}: {key!r} must be a floating-point tensor of one value")
        check_param_states(self, state_dict, ("base_momentum", "base_normalizer", "h"))
        self._loading = state_dict["meta_state"]
        return state_dict

    def _load_meta(self):
        for group in self.param_groups:  # state dicts saved before lr was a group key
            group.setdefault("lr", 1.0)
        for mine, saved in zip(self.meta_state, self.__dict__.pop("_loading")):
            for k in mine:
                mine[k].copy_(saved[k].reshape(()))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adopt_new_params()
        gamma = self.defaults["gamma"]
        group_of = self._group_of()
        for block, meta in zip(self._blocks, self.meta_state):
            params = [p for p in block if p.grad is not None]
            if not params:
                continue
            tuned = torch.exp(meta["beta"])
            z = torch.zeros((), device=tuned.device)
            for p in params:
                hp = group_of[p]
                alpha, wd = tuned * hp["lr"], hp["weight_decay"]
                st = self.state[p]
                if not st:  # complex parameters: complex state, as torch keeps it
                    st.update(step=0, base_momentum=torch.zeros_like(p), base_normalizer=torch.zeros_like(p),
                              h=torch.zeros_like(p))
                st["step"] += 1
                t = st["step"]
                b1_hat = (1 - hp["b1"]) / (1 - hp["b1"] ** t)
                b2_hat = (1 - hp["b2"]) / (1 - hp["b2"] ** t)
                # complex: everything on the real views, as torch's optimizers (z over both parts)
                w, g = _real(p), _real(p.grad)
                m, v, h = _real(st["base_momentum"]), _real(st["base_normalizer"]), _real(st["h"])
                m.lerp_(g, b1_hat)
                v.mul_(1 - b2_hat).addcmul_(g, g, value=b2_hat)
                if wd > 0:
                    w.mul_(1 - alpha * wd)
                denom = v.sqrt().add_(1e-8)
                w.addcdiv_(m * alpha, denom, value=-1.0)
                z = z + torch.sum(h * g)
                h.mul_(gamma * (1 - alpha * wd)).addcdiv_(g * alpha, denom)
            hp = self.defaults
            mm = meta["meta_momentum"]
            mm.lerp_(z, 1 - hp["meta_b1"])
            meta["beta"].add_(torch.lerp(z, mm, hp["meta_c1"]).sign() * hp["meta_stepsize"])
        return loss
