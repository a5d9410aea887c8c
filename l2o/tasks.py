"""Optimizees: the paper's MLPs, and `MLPTask`, one optimizee run in functional form.

A task is what an unroll optimizes. It has
    init_params() -> dict[str, Tensor]     # the optimizee's starting weights (by parameter name)
    loss(params, step) -> Tensor           # the training loss at `params` on the batch of `step`
so problems without a network (LASSO, Rosenbrock, ...) are tasks too. `MLPTask` also has `model`
(for the symmetry structures) and `evaluate(params)` (test loss and accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from l2o.data import StepBatches, as_float

# name -> (hidden sizes, activation, BatchNorm1d before the activation); all end Linear -> log-softmax
OPTIMIZEES = {
    "sigmoid": ((20,), "sigmoid", False),
    "relu": ((20,), "relu", False),
    "leaky_relu": ((20,), "leaky_relu", False),
    "relu_bn": ((20,), "relu", True),
    # transfer targets of the paper
    "sigmoid_20x20": ((20, 20), "sigmoid", False),
    "sigmoid_40": ((40,), "sigmoid", False),
    "sigmoid_100x100": ((100, 100), "sigmoid", False),
}
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}


def build_optimizee(name: str, input_size: int, num_classes: int = 10) -> nn.Sequential:
    """Flatten -> [Linear -> (BatchNorm1d, affine, batch statistics) -> activation] x k -> Linear -> LogSoftmax."""
    if name not in OPTIMIZEES:
        raise ValueError(f"--optimizee: unknown optimizee {name!r}; accepted: {', '.join(OPTIMIZEES)}")
    hidden, activation, batch_norm = OPTIMIZEES[name]
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_size
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h, affine=True, track_running_stats=False))
        layers.append(ACTIVATIONS[activation]())
        width = h
    layers += [nn.Linear(width, num_classes), nn.LogSoftmax(dim=1)]
    return nn.Sequential(*layers)


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_optimizee(name: str, input_size: int, seed: int, device=None) -> nn.Sequential:
    """`build_optimizee` with PyTorch's default initialisation drawn from `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_optimizee(name, input_size)
    return model.to(device) if device is not None else model


class MLPTask:
    """An MLP optimizee on a seeded stream of training batches, in functional form."""

    def __init__(self, model: nn.Module, batches: StepBatches, test: tuple[Tensor, Tensor] | None = None):
        self.model, self.batches = model, batches
        self.test = None if test is None else (as_float(test[0]), test[1])

    def init_params(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def loss(self, params: Mapping[str, Tensor], step: int) -> Tensor:
        x, y = self.batches(step)
        return F.nll_loss(functional_call(self.model, dict(params), (x,)), y)

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, Tensor]) -> tuple[float, float]:
        """(test loss, test accuracy in %) on the whole test split."""
        x, y = self.test
        out = functional_call(self.model, {k: v.detach() for k, v in params.items()}, (x,))
        return F.nll_loss(out, y).item(), 100.0 * (out.argmax(1) == y).float().mean().item()
