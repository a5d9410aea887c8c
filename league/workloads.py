"""The league's workloads: CPU-sized tasks on real data (or the field's standard problems).

A workload fixes the model, the data, the metric, the step budget and how often it is evaluated;
`make(seed)` returns an `Instance`: `model` (an nn.Module whose parameters the optimizer trains),
`loss(step)` (the training loss of step `step`, a tensor) and `evaluate()` (the validation metric,
a float). The seed draws the initial weights and the batch order (and the problem instance of
the synthetic problems and the stream of the online tasks); the data splits never change.

Whole datasets are tensors and batches are cut from them (no DataLoader), so a run is ~1 s.
Targets are not here: they are data (`league/targets.json`), set by `league/run.py --calibrate`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.data import epoch_generator, load_digits, normalize
from l2o.problems import PROBLEMS, ProblemModel
from l2o.tasks import seeded_optimizee


@dataclass(frozen=True)
class Workload:
    name: str
    metric: str  # the key of the validation metric in metrics.jsonl
    higher_is_better: bool
    budget: int  # optimizer steps
    eval_every: int  # the metric is measured at eval_every, 2 eval_every, ..., budget
    about: str
    make: Callable[[int], Instance]
    family: str = "mlp"  # "mlp" (the LSTM L2O applies), "problem" (RNNprop applies) or "other"

    def reached(self, value: float, target: float) -> bool:
        """Whether a metric value meets the target (a NaN never does)."""
        return value >= target if self.higher_is_better else value <= target


class Instance:
    def __init__(self, model: nn.Module, loss: Callable[[int], Tensor], evaluate: Callable[[], float]):
        self.model, self.loss, self.evaluate = model, loss, evaluate


class Batches:
    """Batch t of a seeded stream of epochs over (x, y): batch t mod n of epoch t // n, drop-last."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int):
        self.x, self.y, self.size, self.seed = x, y, batch_size, seed
        self.per_epoch = len(x) // batch_size
        self._epoch, self._order = None, None

    def __call__(self, t: int) -> tuple[Tensor, Tensor]:
        epoch, i = divmod(t, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, torch.randperm(len(self.x), generator=epoch_generator(self.seed, epoch))
        idx = self._order[i * self.size:(i + 1) * self.size]
        return self.x[idx], self.y[idx]


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed; global RNG untouched
        torch.manual_seed(seed)
        return build()


# ---- data (loaded once per process) --------------------------------------------------------


@functools.cache
def digits(size: int = 8):
    """scikit-learn's digits (common.data's fixed 75/25 split) as float [N, 1, size, size] in [0, 1]."""
    d = load_digits(size)
    return normalize(d.train_x, 0.0, 1.0), d.train_y, normalize(d.test_x, 0.0, 1.0), d.test_y


@functools.cache
def table(name: str):
    """A bundled scikit-learn table, 75/25 split (seed 0, stratified for classes), features (and a
    regression target) standardised on the training split."""
    from sklearn.datasets import load_breast_cancer, load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = (load_breast_cancer if name == "breast_cancer" else load_diabetes)(return_X_y=True)
    classes = name == "breast_cancer"
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y if classes else None)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-8
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    if classes:
        return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)
    y_mean, y_std = y_tr.mean(), y_tr.std()
    as_y = lambda a: torch.tensor((a - y_mean) / y_std, dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


# ---- supervised workloads ----------------------------------------------------------------------


def _classifier(model: nn.Module, data, batch_size: int, seed: int, log_probs: bool = False) -> Instance:
    x_tr, y_tr, x_te, y_te = data
    batches = Batches(x_tr, y_tr, batch_size, seed)
    loss_fn = F.nll_loss if log_probs else F.cross_entropy

    def loss(step):
        x, y = batches(step)
        return loss_fn(model(x), y)

    @torch.no_grad()
    def evaluate():
        return (model(x_te).argmax(1) == y_te).float().mean().item()

    return Instance(model, loss, evaluate)


def digits_mlp(seed: int) -> Instance:
    build = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # noqa: E731
    return _classifier(_seeded(seed, build), digits(8), 64, seed)


def digits28_l2o(seed: int) -> Instance:
    """The L2O optimizees' shape: 784 -> 20 (BatchNorm, ReLU) -> 10 on the digits upsampled to 28x28."""
    return _classifier(seeded_optimizee("relu_bn", 784, seed), digits(28), 128, seed, log_probs=True)


def digits_cnn(seed: int) -> Instance:
    build = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> 2x2
        nn.Flatten(), nn.Linear(128, 10))
    return _classifier(_seeded(seed, build), digits(8), 64, seed)


def breast_cancer(seed: int) -> Instance:
    build = lambda: nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))  # noqa: E731
    return _classifier(_seeded(seed, build), table("breast_cancer"), 32, seed)


def diabetes(seed: int) -> Instance:
    x_tr, y_tr, x_te, y_te = table("diabetes")
    model = _seeded(seed, lambda: nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1)))
    batches = Batches(x_tr, y_tr, 32, seed)

    def loss(step):
        x, y = batches(step)
        return F.mse_loss(model(x).squeeze(1), y)

    @torch.no_grad()
    def evaluate():  # mean squared error of the standardised target (1 = predicting the mean)
        return F.mse_loss(model(x_te).squeeze(1), y_te).item()

    return Instance(model, loss, evaluate)


# ---- online workloads (batch 1; the metric is the error of the predictions made before each update) ----

STREAM_TASK_STEPS = 200  # continual digits: the labels are permuted anew every this many examples
ONLINE_WINDOW = 100  # the online metric is the mean over the last this many examples


class _OnlineMeter:
    """The mean of a per-example value over the last ONLINE_WINDOW examples, kept on the device."""

    def __init__(self):
        self.values = torch.zeros(ONLINE_WINDOW)
        self.count = 0

    def add(self, value: Tensor) -> None:
        self.values[self.count % ONLINE_WINDOW] = value.detach()
        self.count += 1

    def mean(self) -> float:
        return self.values[:min(self.count, ONLINE_WINDOW)].mean().item() if self.count else float("nan")


def continual_digits(seed: int) -> Instance:
    """The continual setting on digits: one example per step, and every STREAM_TASK_STEPS examples a new
    task whose classes are relabelled by a random permutation (the network must keep adapting)."""
    x_tr, y_tr, _, _ = digits(8)
    model = _seeded(seed, lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
    batches = Batches(x_tr, y_tr, 1, seed)
    meter = _OnlineMeter()
    perms: dict[int, Tensor] = {}

    def loss(step):
        task = step // STREAM_TASK_STEPS
        if task not in perms:
            perms[task] = torch.randperm(10, generator=epoch_generator(seed, 10_000 + task))
        x, y = batches(step)
        y = perms[task][y]
        logits = model(x)
        meter.add((logits.argmax(1) == y).float().squeeze(0))
        return F.cross_entropy(logits, y)

    return Instance(model, loss, meter.mean)


TRACKING_INPUTS, TRACKING_RELEVANT, TRACKING_FLIP_EVERY = 20, 5, 20  # Sutton (1992), Experiment 1


def tracking(seed: int) -> Instance:
    """Sutton's tracking task (idbd/train.py's stream): a linear learner, one example per step, target
    weights +-1 on 5 of 20 inputs, one of them flipping sign every 20 examples; metric: the mean
    squared error (before each update) over the last ONLINE_WINDOW examples."""
    from idbd.train import CHUNK, TrackingTask

    stream = TrackingTask([seed], TRACKING_INPUTS, TRACKING_RELEVANT, TRACKING_FLIP_EVERY, 0.0, "cpu")
    model = nn.Linear(TRACKING_INPUTS, 1, bias=False)
    nn.init.zeros_(model.weight)  # Sutton's learners start at 0
    meter = _OnlineMeter()
    chunk: dict[int, tuple[Tensor, Tensor]] = {}

    def loss(step):
        c, i = divmod(step, CHUNK)
        if c not in chunk:
            chunk.clear()
            chunk[c] = tuple(t.float() for t in stream.chunk(c))
        x, y = chunk[c][0][i], chunk[c][1][i]  # [1, inputs], [1]
        error = y - model(x).squeeze(1)
        meter.add(error.square().squeeze(0))
        return 0.5 * error.square().mean()

    return Instance(model, loss, meter.mean)


# ---- M-L2O's synthetic problems (l2o/problems.py): the metric is the objective itself ----------


def _problem(family) -> Callable[[int], Instance]:
    def make(seed: int) -> Instance:
        model = ProblemModel(family.task(seed))

        @torch.no_grad()
        def evaluate():
            return model().item()

        return Instance(model, lambda step: model(step), evaluate)

    return make


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("digits_mlp", "val/acc", True, 300, 15, "MLP 64-32-10 on digits 8x8, batch 64", digits_mlp),
    Workload("digits28_l2o", "val/acc", True, 300, 15,
             "the L2O optimizee 784-20(BN, ReLU)-10 on digits upsampled to 28x28, batch 128", digits28_l2o),
    Workload("digits_cnn", "val/acc", True, 300, 15, "CNN conv16-pool-conv32-pool-linear on digits 8x8, batch 64",
             digits_cnn, family="other"),
    Workload("breast_cancer", "val/acc", True, 200, 10, "MLP 30-16-2 on breast cancer (569 rows), batch 32",
             breast_cancer),
    Workload("diabetes", "val/mse", False, 300, 15, "MLP 10-32-1 on diabetes (442 rows, standardised target), "
             "batch 32", diabetes),
    Workload("continual_digits", "online/acc", True, 1000, 50, "continual digits: MLP 64-32-10, batch 1, labels "
             f"permuted every {STREAM_TASK_STEPS} examples; accuracy of the last {ONLINE_WINDOW} predictions",
             continual_digits, family="other"),
    Workload("tracking", "online/mse", False, 2000, 100, "Sutton's tracking task: linear, batch 1, squared error "
             f"of the last {ONLINE_WINDOW} predictions", tracking, family="other"),
    Workload("lasso", "objective", False, 500, 25, "M-L2O's LASSO (A ~ N(0, 1), y ~ U(0, 1), l1 0.005), 128 "
             "problems of dim 10", _problem(PROBLEMS["lasso_train"][2]), family="problem"),
    Workload("rosenbrock", "objective", False, 500, 25, "2-d Rosenbrock from x0 ~ N(0, 1), 128 problems",
             _problem(PROBLEMS["rosenbrock"][0]), family="problem"),
)}


def workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"workload: unknown workload {name!r}; accepted: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]
