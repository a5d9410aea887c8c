"""Functional unrolls and meta-gradient methods for learned optimizers (library; no flags).

An optimizee run is a `Trajectory` (weights, the network's state, step) moved forward by
`unroll`, which applies the network through `torch.func.functional_call`:

    theta_{t+1} = theta_t + update(g_t, state_t),   g_t = grad L(theta_t; batch t), detached

so the meta-gradient flows through the updates only (first-order in the optimizee's
gradients, as in the paper), and through nothing before the unroll's start (truncated BPTT).
`unroll` returns the T + 1 losses L(theta_0) ... L(theta_T) of its T steps; a meta-loss
(`META_LOSSES`) turns them into the objective.

A meta-gradient method has `name` and `meta_step(tasks, trajectories, num_steps) -> (trajectories,
metrics)`: it advances each task's trajectory by `num_steps` optimizee steps and updates the
network's weights once, with the mean over the tasks of their meta-gradients (one task: Sobotka et
al.'s optimizee; several: M-L2O's families of problems). `TruncatedBPTT` is plain meta-training;
`FirstOrderMAML` is M-L2O's. `Curriculum` is M-L2O's schedule of optimizee horizons.
`meta_train.py` drives any method through epochs of optimizee runs, `adapt.py` adapts a network to
one fixed optimizee.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.diagnostics import KINDS, Symmetry, deviations
from l2o.networks import apply_network

META_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "log_sum": lambda losses: losses.sum().log(),  # Sobotka et al.: log of the summed training loss
    "sum": lambda losses: losses.sum(),  # Andrychowicz et al., M-L2O
}
REG_TARGETS = ("none", *KINDS, "all")


@dataclass
class Trajectory:
    """An optimizee run between unrolls: weights by name, the network's state, steps done."""

    params: dict[str, Tensor]
    state: tuple[Tensor, ...]
    step: int = 0

    @classmethod
    def start(cls, network: nn.Module, task) -> Trajectory:
        params = task.init_params()
        first = next(iter(params.values()))
        state = network.init_state(sum(p.numel() for p in params.values()), first.detach().reshape(-1).float())
        return cls(params, tuple(state), 0)

    def detached(self) -> Trajectory:
        return Trajectory({k: v.detach() for k, v in self.params.items()}, tuple(s.detach() for s in self.state),
                          self.step)

    def state_dict(self) -> dict:
        t = self.detached()
        return {"params": t.params, "state": list(t.state), "step": t.step}

    @classmethod
    def from_state_dict(cls, state: Mapping, device=None) -> Trajectory:
        move = (lambda v: v.to(device)) if device is not None else (lambda v: v)
        return cls({k: move(v) for k, v in state["params"].items()}, tuple(move(s) for s in state["state"]),
                   int(state["step"]))


def unroll(network: nn.Module, task, trajectory: Trajectory, num_steps: int, *,
           weights: Mapping[str, Tensor] | None = None, train: bool = True,
           on_step: Callable[[int, dict, list, list], None] | None = None) -> tuple[Trajectory, Tensor]:
    """`num_steps` optimizee steps from `trajectory` (detached at its start); returns the new
    trajectory (attached to the graph when `train`) and the losses at its num_steps + 1 points.

    weights: the network's parameters to use instead of its own (functional_call).
    train=False: no graph is kept (evaluation; the weights and state are detached every step).
    on_step(step, params, grads, updates): called before each update (params detached, updates
    attached when `train`), e.g. to add a symmetry penalty or record diagnostics.
    """
    start = trajectory.detached()
    names = list(start.params)
    params = {k: v.requires_grad_() for k, v in start.params.items()}
    state = start.state
    losses = []
    for i in range(num_steps):
        step = start.step + i
        loss = task.loss(params, step)
        grads = torch.autograd.grad(loss, [params[k] for k in names], retain_graph=train)
        with torch.set_grad_enabled(train):
            updates, state = apply_network(network, grads, state, weights)
        if on_step is not None:
            on_step(step, {k: v.detach() for k, v in params.items()}, list(grads), updates)
        if train:
            params = {k: params[k] + u for k, u in zip(names, updates)}
            losses.append(loss)
        else:
            with torch.no_grad():
                params = {k: (params[k] + u).requires_grad_() for k, u in zip(names, updates)}
            losses.append(loss.detach())
    with torch.set_grad_enabled(train):
        losses.append(task.loss(params, start.step + num_steps))
    return Trajectory(params, tuple(state), start.step + num_steps), torch.stack(losses)


class SymmetryPenalty:
    """The paper's symmetry regularisation: beta * sum_t |C(-u_t)| over an unroll, with C the
    deviation of one kind (summed over its structures) or, for "all", the mean over the kinds the
    optimizee has; parameters taken before the update, detached."""

    def __init__(self, symmetries: Sequence[Symmetry], target: str, beta: float):
        if target not in REG_TARGETS or target == "none":
            raise ValueError(f"--reg: unknown target {target!r}; accepted: {', '.join(REG_TARGETS)}")
        kinds = sorted({s.kind for s in symmetries})
        if target != "all" and target not in kinds:
            raise ValueError(f"--reg {target}: the optimizee has no {target} symmetry (it has: "
                             f"{', '.join(kinds) or 'none'})")
        if not kinds:
            raise ValueError("--reg all: the optimizee has no symmetry to regularise")
        self.symmetries = [s for s in symmetries if target == "all" or s.kind == target]
        self.target, self.beta = target, float(beta)
        self.terms: list[Tensor] = []

    def on_step(self, step, params, grads, updates) -> None:
        by_kind = deviations(self.symmetries, {k: -u for k, u in zip(params, updates)}, params)
        value = sum(by_kind.values()) / len(by_kind)
        self.terms.append((self.beta * value).abs())

    def pop(self) -> Tensor | None:
        terms, self.terms = self.terms, []
        return torch.stack(terms).sum() if terms else None


class TruncatedBPTT:
    """Andrychowicz et al. (2016) / Sobotka et al. (2023): one meta-update per unroll window.

    The meta-loss of each task's window (plus the symmetry penalty, if any) is backpropagated
    through the window's optimizee updates into the network's weights; the mean over the tasks is
    the meta-gradient, and `meta_optimizer` (Adam) steps. M-L2O's plain pretraining ("transfer") is
    this method over its families of problems.
    """

    name = "l2o"

    def __init__(self, network: nn.Module, meta_optimizer: torch.optim.Optimizer, meta_loss: str = "log_sum",
                 penalty: SymmetryPenalty | None = None):
        if meta_loss not in META_LOSSES:
            raise ValueError(f"--meta-loss: unknown {meta_loss!r}; accepted: {', '.join(META_LOSSES)}")
        self.network, self.meta_optimizer = network, meta_optimizer
        self.meta_loss, self.penalty = META_LOSSES[meta_loss], penalty

    def meta_step(self, tasks: Sequence, trajectories: Sequence[Trajectory],
                  num_steps: int) -> tuple[list[Trajectory], dict]:
        on_step = self.penalty.on_step if self.penalty is not None else None
        self.meta_optimizer.zero_grad(set_to_none=True)
        ends, metrics = [], _TaskMean()
        for task, trajectory in zip(tasks, trajectories, strict=True):
            trajectory, losses = unroll(self.network, task, trajectory, num_steps, train=True, on_step=on_step)
            objective = self.meta_loss(losses)
            metrics.add({"meta/objective": objective.detach(), "train/loss": losses[:-1].detach().mean()})
            if self.penalty is not None:
                penalty = self.penalty.pop()
                objective = objective + penalty
                metrics.add({"meta/penalty": penalty.detach()})
            (objective / len(tasks)).backward()  # the graph of one task at a time
            ends.append(trajectory.detached())
        self.meta_optimizer.step()
        return ends, metrics.mean()


class FirstOrderMAML:
    """M-L2O (Yang et al., ICLR 2023): first-order MAML over tasks, one meta-update per window.

    For each task i, from its trajectory:
        support:  L_S = meta-loss of an unroll of `num_steps` with the network's weights phi
        inner:    phi_i' = phi - inner_lr * grad_phi L_S            (one SGD step, gradient detached)
        query:    L_Q = meta-loss of the next `num_steps` from where the support ended, with phi_i'
    then phi.grad = mean_i grad_{phi_i'} L_Q (the first-order approximation: no gradient through the
    inner step) and `meta_optimizer` (Adam) steps. The trajectory moves on by the support window only:
    the next meta-step's support is this query window, as in the authors' code.
    """

    name = "ml2o"

    def __init__(self, network: nn.Module, meta_optimizer: torch.optim.Optimizer, meta_loss: str = "sum",
                 inner_lr: float = 1e-3):
        if meta_loss not in META_LOSSES:
            raise ValueError(f"--meta-loss: unknown {meta_loss!r}; accepted: {', '.join(META_LOSSES)}")
        self.network, self.meta_optimizer = network, meta_optimizer
        self.meta_loss, self.inner_lr = META_LOSSES[meta_loss], float(inner_lr)

    def adapted_weights(self, task, trajectory: Trajectory, num_steps: int):
        """(phi', support trajectory, support losses): the inner step of one task."""
        weights = dict(self.network.named_parameters())
        support, losses = unroll(self.network, task, trajectory, num_steps, train=True)
        grads = torch.autograd.grad(self.meta_loss(losses), list(weights.values()))
        adapted = {k: (w.detach() - self.inner_lr * g).requires_grad_() for (k, w), g in zip(weights.items(), grads)}
        return adapted, support.detached(), losses.detach()

    def meta_step(self, tasks: Sequence, trajectories: Sequence[Trajectory],
                  num_steps: int) -> tuple[list[Trajectory], dict]:
        params = list(self.network.parameters())
        total = [torch.zeros_like(p) for p in params]
        ends, metrics = [], _TaskMean()
        for task, trajectory in zip(tasks, trajectories, strict=True):
            adapted, support, support_losses = self.adapted_weights(task, trajectory, num_steps)
            _, query_losses = unroll(self.network, task, support, num_steps, weights=adapted, train=True)
            objective = self.meta_loss(query_losses)
            torch._foreach_add_(total, torch.autograd.grad(objective, list(adapted.values())))
            metrics.add({"meta/objective": objective.detach(), "meta/support_objective": self.meta_loss(
                support_losses), "train/loss": support_losses[:-1].mean()})
            ends.append(support)
        self.meta_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, total):
            p.grad = g / len(tasks)
        self.meta_optimizer.step()
        return ends, metrics.mean()


class _TaskMean:
    """Per-task metrics (0-d tensors) -> their means over the tasks (still tensors: no host sync)."""

    def __init__(self):
        self.values: dict[str, list[Tensor]] = {}

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v)

    def mean(self) -> dict:
        return {k: torch.stack(v).mean() for k, v in self.values.items()}


METHODS = {TruncatedBPTT.name: TruncatedBPTT, FirstOrderMAML.name: FirstOrderMAML}


def meta_test(network: nn.Module, tasks, num_steps: int) -> dict:
    """The network (not trained) on fresh optimizee runs: mean over `tasks` of the summed training
    loss of `num_steps` steps (the paper's selection criterion), the final loss and test metrics."""
    sums, finals, test_losses, test_accs = [], [], [], []
    for task in tasks:
        traj, losses = unroll(network, task, Trajectory.start(network, task), num_steps, train=False)
        sums.append(losses[:-1].sum().item())
        finals.append(losses[-1].item())
        if getattr(task, "test", None) is not None:
            test_loss, test_acc = task.evaluate(traj.params)
            test_losses.append(test_loss)
            test_accs.append(test_acc)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    out = {"meta_test/loss_sum": mean(sums), "meta_test/final_loss": mean(finals)}
    if test_losses:
        out.update({"meta_test/test_loss": mean(test_losses), "meta_test/test_acc": mean(test_accs)})
    return out


class Curriculum:
    """M-L2O's curriculum of optimizee horizons (the authors' `--if_cl`), driven by meta-tests.

    Training runs optimizees for `horizons[stage]` steps and meta-tests them for the next horizon's
    (the last stage: its own). After each meta-test (`record`):
      "improved"  the loss beat the stage's best: keep this network as the stage's best;
      "advance"   at least `min_evals` meta-tests in this stage, one of them improved, this one did
                  not: go back to the stage's best network and move to the next horizon (then
                  `start_stage` with that network's meta-test at the new horizon as the baseline);
      "stop"      `min_evals` meta-tests without improvement: meta-training has converged;
      "continue"  otherwise.
    """

    def __init__(self, horizons: Sequence[int], min_evals: int = 3):
        horizons = [int(h) for h in horizons]
        if not horizons or any(h < 1 for h in horizons) or int(min_evals) < 1:
            raise ValueError(f"--curriculum: needs positive horizons and min_evals >= 1, got {horizons}, {min_evals}")
        self.horizons, self.min_evals = horizons, int(min_evals)
        self.stage, self.evals, self.improved, self.best = 0, 0, False, math.inf

    @property
    def steps(self) -> int:
        return self.horizons[self.stage]

    @property
    def test_steps(self) -> int:
        return self.horizons[min(self.stage + 1, len(self.horizons) - 1)]

    def record(self, loss: float) -> str:
        self.evals += 1
        if loss < self.best:
            self.best, self.improved = loss, True
            return "improved"
        if self.evals < self.min_evals:
            return "continue"
        return "advance" if self.improved else "stop"

    def advance(self) -> None:
        """The next horizon (the last one repeats); call `start_stage` after its first meta-test."""
        self.stage = min(self.stage + 1, len(self.horizons) - 1)
        self.evals, self.improved, self.best = 0, False, math.inf

    def start_stage(self, baseline: float) -> None:
        self.best = baseline

    def state_dict(self) -> dict:
        return {"stage": self.stage, "evals": self.evals, "improved": self.improved, "best": self.best}

    def load_state_dict(self, state: Mapping) -> None:
        self.stage, self.evals = int(state["stage"]), int(state["evals"])
        self.improved, self.best = bool(state["improved"]), float(state["best"])
