"""Synthetic optimizees of M-L2O (spec l2o.md, section 2): batched, seeded problem families.

A family draws problem instances from a seed; an instance is a task (`init_params()`,
`loss(params, step)`, see tasks.py) over one weight tensor "x" of shape [batch, dim], and its loss
is the mean over the batch of the per-problem objective, as in the authors' code:

    LeastSquares   1/2 ||A x - y||^2 + l1 ||x||_1      A [dim, dim] ~ N(0, a_std^2), y ~ U(y_low, y_high),
                                                       x0 ~ N(0, x0_std^2)   (l1 = 0: the quadratic)
    Rosenbrock     (1 - x_0)^2 + 100 (x_1 - x_0^2)^2   x0 ~ N(0, 1), dim 2; minimum 0 at (1, 1)

PROBLEMS names what meta_train.py, adapt.py and evaluate.py take as `--problem`: a tuple of
families. A training mix has several (M-L2O's tasks: LASSO with sigma in {0.1, 0.5, 1}); a target has
one. Add a problem by writing a family (a `task(seed, device)` that returns a task) and naming it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from l2o.tasks import derived_seed

BATCH, DIM = 128, 10
LASSO_L1 = 0.005


class LeastSquaresTask:
    """One batch of problems 1/2 ||A x - y||^2 + l1 ||x||_1 (mean over the batch)."""

    def __init__(self, a: Tensor, y: Tensor, x0: Tensor, l1: float):
        self.a, self.y, self.x0, self.l1 = a, y, x0, float(l1)

    def init_params(self) -> dict[str, Tensor]:
        return {"x": self.x0.clone()}

    def loss(self, params: Mapping[str, Tensor], step: int = 0) -> Tensor:
        x = params["x"]
        residual = torch.einsum("bij,bj->bi", self.a, x) - self.y
        objective = 0.5 * residual.square().sum(-1)
        if self.l1:
            objective = objective + self.l1 * x.abs().sum(-1)
        return objective.mean()


class RosenbrockTask:
    """One batch of 2-d Rosenbrock problems (mean over the batch)."""

    def __init__(self, x0: Tensor):
        self.x0 = x0

    def init_params(self) -> dict[str, Tensor]:
        return {"x": self.x0.clone()}

    def loss(self, params: Mapping[str, Tensor], step: int = 0) -> Tensor:
        x = params["x"]
        return ((1 - x[:, 0]).square() + 100 * (x[:, 1] - x[:, 0].square()).square()).mean()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed))


@dataclass(frozen=True)
class LeastSquares:
    """The LASSO (l1 > 0) and quadratic (l1 = 0) families; drawn on the CPU, so a seed gives the
    same instance on every device."""

    a_std: float
    y_low: float
    y_high: float
    l1: float = 0.0
    x0_std: float = 0.01
    batch: int = BATCH
    dim: int = DIM

    def task(self, seed: int, device=None) -> LeastSquaresTask:
        g = _generator(seed)
        a = torch.randn(self.batch, self.dim, self.dim, generator=g) * self.a_std
        y = torch.rand(self.batch, self.dim, generator=g) * (self.y_high - self.y_low) + self.y_low
        x0 = torch.randn(self.batch, self.dim, generator=g) * self.x0_std
        return LeastSquaresTask(a.to(device), y.to(device), x0.to(device), self.l1)


@dataclass(frozen=True)
class Rosenbrock:
    x0_std: float = 1.0
    batch: int = BATCH

    def task(self, seed: int, device=None) -> RosenbrockTask:
        return RosenbrockTask((torch.randn(self.batch, 2, generator=_generator(seed)) * self.x0_std).to(device))


PROBLEMS = {
    # M-L2O's meta-training tasks: LASSO with A ~ N(0, sigma^2), sigma in {0.1, 0.5, 1}, y ~ U(0, 1)
    "lasso_train": tuple(LeastSquares(a_std=s, y_low=0.0, y_high=1.0, l1=LASSO_L1) for s in (0.1, 0.5, 1.0)),
    # the out-of-distribution targets: A ~ N(0, 100^2), y ~ U(-1, 1)
    "lasso_ood": (LeastSquares(a_std=100.0, y_low=-1.0, y_high=1.0, l1=LASSO_L1),),
    "quadratic_ood": (LeastSquares(a_std=100.0, y_low=-1.0, y_high=1.0),),
    "rosenbrock": (Rosenbrock(),),
}


def problem_families(name: str) -> tuple:
    if name not in PROBLEMS:
        raise ValueError(f"--problem: unknown problem {name!r}; accepted: {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def problem_tasks(name: str, seed: int, device=None) -> list:
    """One instance of every family of `name` (family i drawn from derived_seed(seed, i))."""
    return [family.task(derived_seed(seed, i), device) for i, family in enumerate(problem_families(name))]


class ProblemModel(nn.Module):
    """A task as an `nn.Module` whose parameters are the task's weights and whose `forward()` is the
    loss, so that any `torch.optim.Optimizer` (Adam, MetaOptimize, LearnedOptimizer) can train it."""

    def __init__(self, task):
        super().__init__()
        self.task = task
        self.weights = nn.ParameterDict({k: nn.Parameter(v) for k, v in task.init_params().items()})

    def forward(self, step: int = 0) -> Tensor:
        return self.task.loss(dict(self.weights), step)
