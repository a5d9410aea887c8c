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
        like = dict(device=self._params[0].device, dtype=self._params[0].dtype)  # follows the parameters
        self.meta_state = [
            {"beta": torch.tensor(math.log(alpha0), **like), "meta_momentum": torch.zeros((), **like)}
            for _ in counts
        ]

    def __getstate__(self):  # copy, deepcopy, pickle: keep the blocks and the meta state
        return dict(self.__dict__)

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
