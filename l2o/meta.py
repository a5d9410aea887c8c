"""Functional unrolls and meta-gradient methods for learned optimizers (library; no flags).

An optimizee run is a `Trajectory` (weights, the network's state, step) moved forward by
`unroll`, which applies the network through `torch.func.functional_call`:

    theta_{t+1} = theta_t + update(g_t, state_t),   g_t = grad L(theta_t; batch t), detached

so the meta-gradient flows through the updates only (first-order in the optimizee's
gradients, as in the paper), and through nothing before the unroll's start (truncated BPTT).
`unroll` returns the T + 1 losses L(theta_0) ... L(theta_T) of its T steps; a meta-loss
(`META_LOSSES`) turns them into the objective.

A meta-gradient method has `name` and `meta_step(task, trajectory, num_steps) -> (trajectory,
metrics)`: it advances the trajectory by `num_steps` optimizee steps and updates the network's
weights once. `TruncatedBPTT` is the paper's; first-order MAML (M-L2O) is another: support unroll,
`weights` adapted by one SGD step, query unroll with them (`unroll(..., weights=...)`), the
query's gradient at the adapted weights applied to the network's own. `meta_train.py` drives any
method through epochs of optimizee runs.
"""

from __future__ import annotations

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

    The meta-loss of the window (plus the symmetry penalty, if any) is backpropagated through the
    window's optimizee updates into the network's weights; `meta_optimizer` (Adam) steps.
    """

    name = "l2o"

    def __init__(self, network: nn.Module, meta_optimizer: torch.optim.Optimizer, meta_loss: str = "log_sum",
                 penalty: SymmetryPenalty | None = None):
        if meta_loss not in META_LOSSES:
            raise ValueError(f"--meta-loss: unknown {meta_loss!r}; accepted: {', '.join(META_LOSSES)}")
        self.network, self.meta_optimizer = network, meta_optimizer
        self.meta_loss, self.penalty = META_LOSSES[meta_loss], penalty

    def meta_step(self, task, trajectory: Trajectory, num_steps: int) -> tuple[Trajectory, dict]:
        on_step = self.penalty.on_step if self.penalty is not None else None
        trajectory, losses = unroll(self.network, task, trajectory, num_steps, train=True, on_step=on_step)
        objective = self.meta_loss(losses)
        metrics = {"meta/objective": objective.detach(), "train/loss": losses[:-1].detach().mean()}
        if self.penalty is not None:
            penalty = self.penalty.pop()
            objective = objective + penalty
            metrics["meta/penalty"] = penalty.detach()
        self.meta_optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.meta_optimizer.step()
        return trajectory.detached(), metrics


METHODS = {TruncatedBPTT.name: TruncatedBPTT}


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
