"""How an optimizer moves through the symmetries of a network (Sobotka et al. 2023; Kunin et al. 2021).

A symmetry of the loss makes the gradient g satisfy a linear constraint C(g) = 0 at every point;
an update u "breaks" it by C(-u) (for plain SGD, -u = lr g, so C(-u) = 0). With W1, b1 a hidden
layer's weights and W2, b2 the next layer's, all taken before the update (spec l2o.md, section 1):

    rescale (Linear -> ReLU-like -> Linear):  R(v) = <v_W1, W1> + <v_b1, b1> - <v_W2, W2>
    scale   (Linear -> BatchNorm):            S(v) = <v_W1, W1> + <v_b1, b1>
    translation (final Linear -> softmax):    T(v) = sum_ij v_W2[i, j] + sum_i v_b2[i]

R holds for any positively homogeneous activation (ReLU, LeakyReLU, identity), also when the
incoming layer is an affine BatchNorm (its weight and bias play W1 and b1). S is exact only with
batch statistics and BN eps -> 0 (torch needs eps > 0, so it holds
to about eps / variance). Several structures of one kind add up.

    probe = SymmetryProbe(model, optimizer, every=10)   # hooks into optimizer.step()
    for step ...:
        loss.backward(); optimizer.step()
        run.log({"train/loss": ..., **probe.pop()}, step)

Every `every` steps the probe logs `sym/<kind>/grad` and `sym/<kind>/update` for the kinds the
model has; with `noise_every` and `sample_losses` (a callable returning losses of several
minibatches at the current weights) it also logs the tail index and the covariance of minibatch
gradients and of the updates the optimizer would make from them (`noise/...`); at `hist_steps`
it logs a histogram of |u| (`update_abs/hist`, over `update_abs/edges`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HIST_EDGES",
    "KINDS",
    "Symmetry",
    "SymmetryProbe",
    "covariance_stats",
    "deviation",
    "deviations",
    "find_symmetries",
    "tail_index",
    "update_histogram",
]

KINDS = ("rescale", "scale", "translation")
HIST_STEPS = (1, 5, 10, 20, 80, 500)  # the paper's Figure 9
HIST_EDGES = torch.logspace(-9, 1, 41, dtype=torch.float64)  # |u| bins; below and above counted apart

# positively homogeneous activations: f(a x) = a f(x) for a > 0
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.relu_}
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax)
_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}


@dataclass(frozen=True)
class Symmetry:
    """One symmetric structure: its kind and the parameter names it involves (None: no bias).

    rescale: (W1, b1, W2); scale: (W1, b1); translation: (W2, b2).
    """

    kind: str
    names: tuple

    def __str__(self):
        return f"{self.kind}({', '.join(n for n in self.names if n)})"


# --------------------------------------------------------------------------------------
# The constraints
# --------------------------------------------------------------------------------------


def _inner(v: Tensor | None, w: Tensor | None) -> Tensor | float:
    return 0.0 if v is None or w is None else (v.reshape(-1).to(w.dtype) * w.reshape(-1)).sum()


def deviation(sym: Symmetry, v: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Tensor:
    """C(v) of one structure; `v` and `params` map parameter names to tensors (v: g or -u)."""
    get = lambda d, name: d.get(name) if name else None  # noqa: E731
    if sym.kind == "rescale":
        w1, b1, w2 = sym.names
        return (_inner(get(v, w1), get(params, w1)) + _inner(get(v, b1), get(params, b1))
                - _inner(get(v, w2), get(params, w2)))
    if sym.kind == "scale":
        w1, b1 = sym.names
        return _inner(get(v, w1), get(params, w1)) + _inner(get(v, b1), get(params, b1))
    if sym.kind == "translation":
        w2, b2 = sym.names
        total = v[w2].sum()
        return total + v[b2].sum() if b2 else total
    raise ValueError(f"unknown symmetry kind {sym.kind!r}; known: {', '.join(KINDS)}")


def deviations(symmetries: Iterable[Symmetry], v, params) -> dict[str, Tensor]:
    """{kind: sum of C(v) over the structures of that kind} (tensors; no host sync)."""
    out: dict[str, Tensor] = {}
    for sym in symmetries:
        value = deviation(sym, v, params)
        out[sym.kind] = out[sym.kind] + value if sym.kind in out else value
    return out


# --------------------------------------------------------------------------------------
# Finding the structures (torch.fx)
# --------------------------------------------------------------------------------------


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_homogeneous(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_softmax(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _SOFTMAX_MODULES)
    if node.op == "call_function":
        return node.target in _SOFTMAX_FUNCTIONS
    return node.op == "call_method" and node.target in _SOFTMAX_METHODS


def _bias(module, target: str) -> str | None:
    return f"{target}.bias" if getattr(module, "bias", None) is not None else None


def find_symmetries(model: nn.Module, logits: bool = False) -> list[Symmetry]:
    """The rescale, scale and translation structures of `model`, found on its torch.fx graph.

    A Linear (or affine BatchNorm1d) whose only consumer is a ReLU-like activation whose only
    consumer is a Linear: rescale. A Linear whose only consumer is a BatchNorm with batch
    statistics: scale. A Linear whose only consumer is a softmax / log-softmax (or, with
    `logits=True`, a Linear whose output is the model's output, for losses with the softmax
    inside such as cross-entropy): translation. Raises ValueError when the model cannot be traced.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:
        raise ValueError(f"symmetry probe: cannot trace {type(model).__name__} with torch.fx "
                         f"({type(e).__name__}: {e}); the probe needs a traceable model") from None
    modules = dict(model.named_modules())
    found = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        is_linear = isinstance(module, nn.Linear)
        is_affine_bn = isinstance(module, nn.BatchNorm1d) and module.affine
        if not (is_linear or is_affine_bn):
            continue
        user = _only_user(node)
        if user is None:
            continue
        if _is_homogeneous(user, modules):
            nxt = _only_user(user)
            if nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], nn.Linear):
                found.append(Symmetry("rescale", (f"{node.target}.weight", _bias(module, node.target),
                                                   f"{nxt.target}.weight")))
        if not is_linear:
            continue
        if user.op == "call_module" and isinstance(modules[user.target], nn.modules.batchnorm._BatchNorm):
            bn = modules[user.target]
            if bn.training or not bn.track_running_stats:
                found.append(Symmetry("scale", (f"{node.target}.weight", _bias(module, node.target))))
        if _is_softmax(user, modules) or (logits and user.op == "output"):
            found.append(Symmetry("translation", (f"{node.target}.weight", _bias(module, node.target))))
    return found


# --------------------------------------------------------------------------------------
# Noise: tail index, covariance, histograms
# --------------------------------------------------------------------------------------


def tail_index(x: Tensor) -> float:
    """The tail-index estimate of Mohammadi et al. (2015), as used by Simsekli et al. (2019).

    x: samples (e.g. minibatch gradients minus their mean), flattened to N scalars; m = the largest
    divisor of N not above sqrt(N); Y = sums of consecutive groups of m; alpha = log m /
    (mean log|Y| - mean log|X|). 2 for Gaussian noise, smaller for heavier tails.
    """
    x = x.detach().reshape(-1).double()
    n = x.numel()
    m = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
    if m < 2:
        return float("nan")  # a prime N: no grouping
    y = x.view(n // m, m).sum(1)
    eps = torch.finfo(torch.float64).eps
    diff = (y.abs() + eps).log().mean() - (x.abs() + eps).log().mean()
    return float(math.log(m) / diff.item())


def covariance_stats(samples: Tensor) -> tuple[float, float]:
    """(trace, top eigenvalue) of the covariance of `samples` [S, P] (rows: per-minibatch vectors).

    trace = mean_i ||mean - x_i||^2; the top eigenvalue of the P x P covariance equals that of the
    S x S centred Gram matrix / S, computed exactly (S is small).
    """
    x = samples.detach().double()
    centred = x - x.mean(0, keepdim=True)
    gram = centred @ centred.T / x.shape[0]
    return float(gram.trace().item()), float(torch.linalg.eigvalsh(gram)[-1].item())


def update_histogram(update_abs: Tensor, edges: Tensor = HIST_EDGES) -> list[int]:
    """Counts of |u| per bin of `edges`: [below edges[0] (zeros too), bin 1, ..., above edges[-1]]."""
    values = update_abs.detach().reshape(-1).double().cpu()
    idx = torch.bucketize(values, edges.to(values.dtype), right=True)  # 0: below, len(edges): above
    return torch.bincount(idx, minlength=len(edges) + 1).tolist()


# --------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------


class SymmetryProbe:
    """Wraps any optimizer (through its step hooks) and measures its updates every `every` steps.

    model: the network the optimizer trains (its symmetries are found on its torch.fx graph).
    kinds: which symmetry kinds to require (default: all the model has; at least one, else
      ValueError); the deviation of the gradient and of the update are logged for each.
    sink: called as sink(metrics, step) after a measured step (e.g. `run.log`); without one, the
      metrics wait in `pop()`.
    noise_every, sample_losses: every `noise_every` steps, `sample_losses()` must return a list of
      scalar losses on different minibatches at the current weights; the probe logs the tail
      index and covariance of their gradients and of the updates the optimizer would make from
      each (its state saved and restored around these trial steps).
    hist_steps: steps at which the histogram of |u| is logged.
    Step numbers count optimizer steps since construction (`state_dict()` carries them on resume).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, every: int = 10,
                 kinds: Sequence[str] | None = None, sink: Callable[[dict, int], None] | None = None,
                 noise_every: int = 0, sample_losses: Callable[[], list[Tensor]] | None = None,
                 hist_steps: Sequence[int] = HIST_STEPS, logits: bool = False):
        if int(every) < 1 or int(noise_every) < 0:
            raise ValueError(f"SymmetryProbe: every must be >= 1 and noise_every >= 0, got {every}, {noise_every}")
        if noise_every and sample_losses is None:
            raise ValueError("SymmetryProbe: noise_every needs sample_losses (losses of several minibatches)")
        self.model, self.optimizer, self.sink = model, optimizer, sink
        self.every, self.noise_every, self.sample_losses = int(every), int(noise_every), sample_losses
        self.hist_steps = set(int(s) for s in hist_steps)
        symmetries = find_symmetries(model, logits=logits)
        if kinds is not None:
            unknown = [k for k in kinds if k not in KINDS]
            if unknown:
                raise ValueError(f"SymmetryProbe: unknown kind {unknown[0]!r}; known: {', '.join(KINDS)}")
            missing = [k for k in kinds if k not in {s.kind for s in symmetries}]
            if missing:
                raise ValueError(f"SymmetryProbe: {type(model).__name__} has no {missing[0]} symmetry (found: "
                                 f"{', '.join(map(str, symmetries)) or 'none'})")
            symmetries = [s for s in symmetries if s.kind in kinds]
        if not symmetries:
            raise ValueError(
                f"SymmetryProbe: {type(model).__name__} has none of the structures the deviations are defined "
                f"for (Linear -> ReLU-like -> Linear, Linear -> BatchNorm, final Linear -> softmax)")
        self.symmetries = symmetries
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.step = 0
        self._pending: dict = {}
        self._before = None
        self._busy = False
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    # ---- public ------------------------------------------------------------------------

    def pop(self) -> dict:
        """The metrics measured since the last call (empty on most steps)."""
        out, self._pending = self._pending, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping) -> None:
        self.step = int(state["step"])

    # ---- hooks -------------------------------------------------------------------------

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"] if id(p) in self.names]

    def _pre(self, optimizer, args, kwargs):
        if self._busy:
            return
        step = self.step + 1
        measure, noise = step % self.every == 0, bool(self.noise_every) and step % self.noise_every == 0
        hist = step in self.hist_steps
        if not (measure or noise or hist):
            return
        params = self._params()
        self._before = {
            "step": step, "measure": measure, "hist": hist,
            "params": {self.names[id(p)]: p.detach().clone() for p in params},
            "grads": {self.names[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None},
        }
        if noise:
            self._pending.update(self._noise(params))

    def _post(self, optimizer, args, kwargs):
        if self._busy:
            return
        self.step += 1
        before, self._before = self._before, None
        if before is None or before["step"] != self.step:
            return
        with torch.no_grad():
            updates = {self.names[id(p)]: p.detach() - before["params"][self.names[id(p)]] for p in self._params()}
            metrics = {}
            if before["measure"]:
                neg = {k: -u for k, u in updates.items()}
                grad_dev = deviations(self.symmetries, before["grads"], before["params"])
                update_dev = deviations(self.symmetries, neg, before["params"])
                for kind in grad_dev:
                    metrics[f"sym/{kind}/grad"] = float(grad_dev[kind])
                    metrics[f"sym/{kind}/update"] = float(update_dev[kind])
            if before["hist"]:
                flat = torch.cat([u.reshape(-1) for u in updates.values()]).abs()
                metrics["update_abs/hist"] = update_histogram(flat)
                metrics["update_abs/edges"] = HIST_EDGES.tolist()
                metrics["update_abs/mean"] = float(flat.double().mean())
        self._pending.update(metrics)
        if self.sink is not None and self._pending:
            self.sink(self.pop(), self.step)

    def _noise(self, params) -> dict:
        """Minibatch gradients at the current weights, the updates the optimizer would make from
        each (trial steps from a copy of its state), and their tail index and covariance."""
        with torch.enable_grad():
            losses = list(self.sample_losses())
            if len(losses) < 2:
                raise ValueError("SymmetryProbe: sample_losses() must return at least 2 losses")
            grads = [torch.autograd.grad(loss, params, allow_unused=True) for loss in losses]
        saved_params = [p.detach().clone() for p in params]
        saved_grads = [p.grad for p in params]
        saved_state = copy.deepcopy(self.optimizer.state_dict())
        flat_grads, flat_updates = [], []
        self._busy = True
        try:
            for sample in grads:
                sample = [torch.zeros_like(p) if g is None else g for g, p in zip(sample, params)]
                for p, g in zip(params, sample):
                    p.grad = g.detach().clone()
                self.optimizer.step()
                with torch.no_grad():
                    flat_updates.append(torch.cat([(p - p0).reshape(-1) for p, p0 in zip(params, saved_params)]))
                    flat_grads.append(torch.cat([g.reshape(-1) for g in sample]))
                    torch._foreach_copy_(params, saved_params)
                self.optimizer.load_state_dict(copy.deepcopy(saved_state))
        finally:
            self._busy = False
            for p, g in zip(params, saved_grads):
                p.grad = g
        out = {}
        for what, rows in (("grad", flat_grads), ("update", flat_updates)):
            x = torch.stack(rows)
            trace, top = covariance_stats(x)
            out[f"noise/{what}/tail_index"] = tail_index(x - x.mean(0, keepdim=True))
            out[f"noise/{what}/cov_trace"] = trace
            out[f"noise/{what}/cov_top_eig"] = top
        return out

