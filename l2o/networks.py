"""Learned-optimizer networks: coordinate-wise recurrent nets that map a gradient to an update.

Every weight of the optimizee is one row of a batch. A network is an `nn.Module` with

    name: str                       # its key in NETWORKS (checkpoints store it)
    state_names: tuple[str, ...]    # one tensor per name, coordinates along dim 0
    config() -> dict                # constructor keyword arguments (checkpoints store them)
    init_state(num_coords, like) -> tuple[Tensor, ...]      # the state of a fresh optimizee run
    forward(grad [N], state) -> (update [N], new_state)     # theta <- theta + update

The update is final (already scaled), and the state is anything per coordinate, so a network with
its own statistics (RNNprop's Adam moments, say) fits the same `LearnedOptimizer`, unroll and
checkpoints. Because every state tensor has the coordinates along dim 0, the state of many
parameter tensors is their concatenation (`apply_network`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

PREPROC_P = 10.0  # the preprocessing's p (Andrychowicz et al. 2016, appendix A)


def preprocess_gradients(grad: Tensor, p: float = PREPROC_P) -> Tensor:
    """[N] -> [N, 2]: (log(|g| + 1e-8) / p, sign g) where |g| >= e^-p, else (-1, e^p g)."""
    magnitude = grad.abs()
    keep = magnitude >= math.exp(-p)
    first = torch.where(keep, torch.log(magnitude + 1e-8) / p, torch.full_like(grad, -1.0))
    second = torch.where(keep, torch.sign(grad), grad * math.exp(p))
    return torch.stack([first, second], dim=-1)


class LSTMOptimizer(nn.Module):
    """The optimizer of Andrychowicz et al. (2016) as used by Sobotka et al. (2023).

    preprocess(g) -> LSTMCell(2 -> H) -> LSTMCell(H -> H) -> Linear(H -> 1) -> times `output_scale`;
    the state is (h, c) of both cells, zero at the start of every optimizee run.
    """

    name = "lstm"
    state_names = ("h1", "c1", "h2", "c2")

    def __init__(self, hidden_size: int = 20, preproc_p: float = PREPROC_P, output_scale: float = 0.1):
        super().__init__()
        if int(hidden_size) < 1 or not preproc_p > 0 or not math.isfinite(output_scale):
            raise ValueError(f"LSTMOptimizer: needs hidden_size >= 1, preproc_p > 0 and a finite output_scale, "
                             f"got {hidden_size}, {preproc_p}, {output_scale}")
        self.hidden_size, self.preproc_p, self.output_scale = int(hidden_size), float(preproc_p), float(output_scale)
        self.cell1 = nn.LSTMCell(2, self.hidden_size)
        self.cell2 = nn.LSTMCell(self.hidden_size, self.hidden_size)
        self.output = nn.Linear(self.hidden_size, 1)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "preproc_p": self.preproc_p, "output_scale": self.output_scale}

    def init_state(self, num_coords: int, like: Tensor) -> tuple[Tensor, ...]:
        return tuple(like.new_zeros(num_coords, self.hidden_size) for _ in self.state_names)

    def forward(self, grad: Tensor, state: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        h1, c1, h2, c2 = state
        h1, c1 = self.cell1(preprocess_gradients(grad, self.preproc_p), (h1, c1))
        h2, c2 = self.cell2(h1, (h2, c2))
        return self.output(h2).squeeze(-1) * self.output_scale, (h1, c1, h2, c2)


class RNNprop(nn.Module):
    """RNNprop (Lv, Jiang and Li 2017) as M-L2O uses it: Adam's statistics in, a bounded step out.

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,   m^ = m / (1 - b1^t),   v^ = v / (1 - b2^t)
        in = (m^ / (sqrt(v^) + eps), g / (sqrt(v^) + eps))
        update = output_scale * tanh(Linear(LSTMCell(LSTMCell(ELU(Linear(in))))))

    with b1 = b2 = 0.95 and output_scale 0.01 (every update is within +-0.01 per coordinate). The
    state holds the moments m, v, the step count t of each coordinate (for the bias correction; a
    parameter that joins later starts at t = 0) and (h, c) of both cells, all zero at the start.
    """

    name = "rnnprop"
    state_names = ("m", "v", "t", "h1", "c1", "h2", "c2")

    def __init__(self, hidden_size: int = 20, beta1: float = 0.95, beta2: float = 0.95, eps: float = 1e-8,
                 output_scale: float = 0.01):
        super().__init__()
        if int(hidden_size) < 1 or not (0 <= beta1 < 1 and 0 <= beta2 < 1) or not eps > 0 or not (
                math.isfinite(output_scale) and output_scale > 0):
            raise ValueError(f"RNNprop: needs hidden_size >= 1, betas in [0, 1), eps > 0 and output_scale > 0, got "
                             f"{hidden_size}, {beta1}, {beta2}, {eps}, {output_scale}")
        self.hidden_size, self.beta1, self.beta2 = int(hidden_size), float(beta1), float(beta2)
        self.eps, self.output_scale = float(eps), float(output_scale)
        self.input = nn.Linear(2, self.hidden_size)
        self.cell1 = nn.LSTMCell(self.hidden_size, self.hidden_size)
        self.cell2 = nn.LSTMCell(self.hidden_size, self.hidden_size)
        self.output = nn.Linear(self.hidden_size, 1)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "output_scale": self.output_scale}

    def init_state(self, num_coords: int, like: Tensor) -> tuple[Tensor, ...]:
        flat = tuple(like.new_zeros(num_coords) for _ in range(3))
        return flat + tuple(like.new_zeros(num_coords, self.hidden_size) for _ in range(4))

    def forward(self, grad: Tensor, state: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        m, v, t, h1, c1, h2, c2 = state
        t = t + 1
        m = self.beta1 * m + (1 - self.beta1) * grad
        v = self.beta2 * v + (1 - self.beta2) * grad * grad
        denom = (v / (1 - torch.pow(self.beta2, t))).sqrt() + self.eps
        inputs = torch.stack([m / (1 - torch.pow(self.beta1, t)) / denom, grad / denom], dim=-1)
        h1, c1 = self.cell1(nn.functional.elu(self.input(inputs)), (h1, c1))
        h2, c2 = self.cell2(h1, (h2, c2))
        update = torch.tanh(self.output(h2).squeeze(-1)) * self.output_scale
        return update, (m, v, t, h1, c1, h2, c2)


NETWORKS = {LSTMOptimizer.name: LSTMOptimizer, RNNprop.name: RNNprop}


def build_network(name: str, config: Mapping | None = None) -> nn.Module:
    if name not in NETWORKS:
        raise ValueError(f"unknown learned-optimizer network {name!r}; known: {', '.join(NETWORKS)}")
    return NETWORKS[name](**dict(config or {}))


def network_spec(network: nn.Module) -> dict:
    """What rebuilds a network, weights aside: its name and constructor config (plain types)."""
    return {"name": network.name, "config": network.config()}


def network_record(network: nn.Module, state_dict: Mapping | None = None) -> dict:
    """A network in one dict: name, constructor config and weights (tensors, plain types)."""
    weights = network.state_dict() if state_dict is None else state_dict
    return {**network_spec(network), "state_dict": {k: v.detach().clone() for k, v in weights.items()}}


def network_from_record(record: Mapping) -> nn.Module:
    network = build_network(record["name"], record["config"])
    network.load_state_dict(record["state_dict"])
    return network


def apply_network(network: nn.Module, grads: Sequence[Tensor], state: Sequence[Tensor],
                  weights: Mapping[str, Tensor] | None = None) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """One network call over every coordinate of `grads` (a list of tensors of any shapes).

    `state` holds the concatenated state of those tensors, in order. Returns the updates shaped
    like `grads` and the new state. `weights` (a dict of the network's parameters) replaces the
    network's own through `torch.func.functional_call`, e.g. adapted weights in first-order MAML.
    The one place the network meets an optimizee: `LearnedOptimizer` and `unroll` both call it, so
    they agree to the last bit.
    """
    flat = torch.cat([g.reshape(-1) for g in grads])
    if weights is None:
        update, state = network(flat, tuple(state))
    else:
        update, state = functional_call(network, dict(weights), (flat, tuple(state)))
    return [u.view_as(g) for u, g in zip(update.split([g.numel() for g in grads]), grads)], tuple(state)
