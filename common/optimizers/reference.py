"""A plain float64 reference of the spec (../shared/spec/metaoptimize.md, sections 2-5).

It follows the spec's equations literally, one weight tensor at a time, and keeps for every
weight the index of its block, so that one code path covers every kind of step-size block. It is
written apart from `rules.py` on purpose: the tests hold every step implementation against it.

    ref = Reference(weights, "AdamW", "Lion", alpha0=1e-2, eta=1e-2, gamma=1.0,
                    block_ids=block_ids(shapes, "scalar"), hp=..., meta_hp=...)
    ref.step(grads)        # w, h, beta, ... as float64 tensors

`AroundReference` is section 10 (MetaOptimize around any optimizer): it runs a base optimizer
built on float64 copies of the weights and scales the change that its step makes.
"""

from __future__ import annotations

import math

import torch

from .blocks import Layout, resolve_stepsize_groups

EPS = 1e-10


def block_ids(shapes, stepsize_groups, group_sizes=None) -> tuple[list[torch.Tensor], int]:
    """The block index of every weight (a tensor per parameter) and the number of blocks."""
    kind, counts = resolve_stepsize_groups(stepsize_groups, len(shapes), group_sizes)
    layout = Layout.of(kind, counts, shapes)
    ids = []
    for s, start, n in zip(shapes, layout.starts, layout.units):
        if kind == "tensor":
            ids.append(torch.full(s, start, dtype=torch.long))
        elif kind == "weightwise":
            ids.append(torch.arange(start, start + n).reshape(s))
        else:  # nodewise: one block per index of the first dimension
            rows = torch.arange(start, start + n)
            ids.append(rows.reshape((-1,) + (1,) * (len(s) - 1)).expand(s).clone() if len(s) else rows.reshape(()))
    return ids, layout.num_blocks


class Reference:
    """hp: the base hyperparameters (weight_decay, momentum_param, normalizer_param, lion_beta2) for
    all tensors, or a list with one dict per tensor (param groups); meta_hp: the meta ones."""

    def __init__(self, weights, base, meta, alpha0, eta, gamma, block_ids, hp, meta_hp):
        self.w = [w.detach().double().clone() for w in weights]
        self.base, self.meta, self.eta, self.gamma = base, meta, eta, gamma
        self.hp = hp if isinstance(hp, list) else [hp] * len(self.w)
        self.meta_hp = meta_hp
        self.ids, num_blocks = block_ids
        self.beta = torch.full((num_blocks,), math.log(alpha0), dtype=torch.float64)
        self.h = [torch.zeros_like(w) for w in self.w]
        self.m = [torch.zeros_like(w) for w in self.w]
        self.v = [torch.zeros_like(w) for w in self.w]
        self.mb = torch.zeros_like(self.beta)
        self.vb = torch.zeros_like(self.beta)
        self.t = [0] * len(self.w)
        self.meta_t = 0

    def step(self, grads):
        """One step with these gradients (None: the tensor has no gradient and is skipped)."""
        alpha_all = torch.exp(self.beta)  # beta before this step
        z = torch.zeros_like(self.beta)
        active = torch.zeros_like(self.beta, dtype=torch.bool)
        for i, g in enumerate(grads):
            if g is not None:
                z.index_add_(0, self.ids[i].reshape(-1), (self.h[i] * g).reshape(-1))
                active[self.ids[i].reshape(-1)] = True
        for i, g in enumerate(grads):
            if g is None:
                continue
            self.t[i] += 1
            t, hp, w, a = self.t[i], self.hp[i], self.w[i], alpha_all[self.ids[i]]
            k = hp["weight_decay"]
            if self.base == "SGD":
                delta = a * (g + k * w)
            elif self.base == "SGDm":
                delta = a * (self.m[i] + k * w)
                self.m[i] = hp["momentum_param"] * self.m[i] + (1 - hp["momentum_param"]) * g
            elif self.base == "RMSProp":
                lam = hp["normalizer_param"]
                self.v[i] = lam * self.v[i] + g * g
                delta = a * (g / torch.sqrt((1 - lam) / (1 - lam**t) * self.v[i] + EPS) + k * w)
            elif self.base == "AdamW":
                lam = hp["normalizer_param"]
                self.m[i] = hp["momentum_param"] * self.m[i] + g
                self.v[i] = lam * self.v[i] + g * g
                delta = a * (self.m[i] / torch.sqrt((1 - lam) / (1 - lam**t) * self.v[i] + EPS) + k * w)
            elif self.base == "Lion":
                c, rho = hp["lion_beta2"], hp["momentum_param"]
                delta = a * (torch.sign(c * self.m[i] + (1 - c) * g) + k * w)
                self.m[i] = rho * self.m[i] + (1 - rho) * g
            self.w[i] = w - delta
            self.h[i] = self.gamma * (1 - k * a) * self.h[i] - delta
        self.meta_update(z, active)

    def meta_update(self, z, active):
        """Step 5 of spec section 2: the meta update of beta with z (section 4)."""
        if self.meta == "fixed":
            return
        self.meta_t += 1
        t, hp, eta = self.meta_t, self.meta_hp, self.eta
        beta, mb, vb = self.beta, self.mb, self.vb
        shrink = 1 - eta * hp["weight_decay"]
        if self.meta == "SGD":
            beta = shrink * beta - eta * z
        elif self.meta == "RMSProp":
            lam = hp["normalizer_param"]
            vb = lam * vb + z * z
            beta = shrink * beta - eta * z / torch.sqrt((1 - lam) / (1 - lam**t) * vb + EPS)
        elif self.meta == "Adam":
            lam = hp["normalizer_param"]
            mb = hp["momentum_param"] * mb + z
            vb = lam * vb + z * z
            beta = shrink * beta - eta * mb / torch.sqrt((1 - lam) / (1 - lam**t) * vb + EPS)
        elif self.meta == "Lion":
            c, rho = hp["lion_beta2"], hp["momentum_param"]
            beta = shrink * beta - eta * torch.sign(c * mb + (1 - c) * z)
            mb = rho * mb + (1 - rho) * z
        # blocks without any gradient this step keep their meta state
        self.beta = torch.where(active, beta, self.beta)
        self.mb = torch.where(active, mb, self.mb)
        self.vb = torch.where(active, vb, self.vb)


class AroundReference(Reference):
    """Spec section 10 in float64: `base` is a torch optimizer (or a list of them) built on float64
    parameters `weights`, in the order of `block_ids`; ell and kappa are read from its param groups.

        ref = AroundReference(weights64, torch.optim.Adam(weights64, lr=1e-2), "Adam", alpha0=1.0, eta=1e-2,
                              gamma=1.0, block_ids=block_ids(shapes, "scalar"), meta_hp=...)
        ref.step(grads)
    """

    def __init__(self, weights, base, meta, alpha0, eta, gamma, block_ids, meta_hp):
        super().__init__(weights, None, meta, alpha0, eta, gamma, block_ids, {}, meta_hp)
        self.params = list(weights)
        assert all(p.dtype == torch.float64 for p in self.params)
        self.bases = list(base) if isinstance(base, (list, tuple)) else [base]
        self.w = [p.detach() for p in self.params]

    def step(self, grads):
        alpha_all = torch.exp(self.beta)  # 1. beta before this step
        z = torch.zeros_like(self.beta)
        active = torch.zeros_like(self.beta, dtype=torch.bool)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            p.grad = None if g is None else g.clone()
            if g is not None:  # z with h before this step
                z.index_add_(0, self.ids[i].reshape(-1), (self.h[i] * g).reshape(-1))
                active[self.ids[i].reshape(-1)] = True
        w0 = [p.detach().clone() for p in self.params]  # 2. the base's own step
        for b in self.bases:
            b.step()
        group = {p: g for b in self.bases for g in b.param_groups for p in g["params"]}
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(self.params, grads)):
                if g is None:
                    continue
                a = alpha_all[self.ids[i]]
                u = p.detach() - w0[i]
                p.copy_(w0[i] + a * u)  # 3. w = w0 + alpha u
                lr, k = group[p].get("lr", 0.0), group[p].get("weight_decay", 0.0) or 0.0
                self.h[i] = self.gamma * (1 - a * lr * k) * self.h[i] + a * u  # 4.
        self.w = [p.detach() for p in self.params]
        self.meta_update(z, active)  # 5.
