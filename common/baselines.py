"""Learning-rate-free baselines: the paper's (DoG, Prodigy, Mechanic, gdtuo) and more (LDoG,
ScheduleFree, DAdaptAdam).

Every `--optimizer` value other than HF and AdamW is built here, from the authors' own PyPI
packages (pins in requirements.txt). This file only adds what the experiments need around them:
flags, clear errors, the step size each method uses (for logging), train()/eval() weight
switching, and checkpoints that hold everything (some packages keep state outside
`state_dict()` or in a form `torch.save`/`load_state_dict` cannot round-trip).

| --optimizer  | package (class)                                  | what this file adds                          |
|--------------|--------------------------------------------------|----------------------------------------------|
| DoG, LDoG    | dog-optimizer (DoG, LDoG, PolynomialDecayAverager)| averaging + eval()/train(); device fix        |
| Prodigy      | prodigyopt (Prodigy)                             | flags only                                   |
| DAdaptAdam   | dadaptation (DAdaptAdam)                         | flags only                                   |
| ScheduleFree | schedulefree (AdamWScheduleFree)                 | starts in train mode                         |
| Mechanic     | mechanic-pytorch (mechanize(<base>)); Lion base: | checkpoints of its per-parameter state       |
|              | lion-pytorch (Lion)                              |                                              |
| gdtuo        | gradient-descent-the-ultimate-optimizer          | `GDTUO`: a torch optimizer driving its stack |

Extension points used by common/specs.py:
- BASELINES: --optimizer value -> builder(params, options) -> optimizer (options: a resolved spec,
  common/specs.py, or any mapping of the baseline's argparse dests)
- OPTION_PREFIXES: --optimizer value -> the prefix of its options' dests
- add_baseline_args(parser): flags for the baselines' own knobs (defaults = the packages' defaults)
- build_baseline(name, params, options)
- d_adapted_step_sizes(optimizer): Prodigy's and DAdaptAdam's step sizes (d * lr), or None
- the other baselines' classes: an `effective_step_sizes()` method

Step sizes logged (`common.step_metrics.effective_step_sizes`), comparable to MetaOptimize's lr alpha:
DoG: eta = lr * rbar / sqrt(G) (one per param group; LDoG one per tensor); Prodigy and
DAdaptAdam: d * lr (times Adam's bias correction when it is on); ScheduleFree: the warmed-up lr;
Mechanic: sum(s) * base lr (s scales the base optimizer's accumulated update); gdtuo: the
learned lr of its base level (alpha; alpha**2 for its RMSProp, which stores sqrt(alpha); one per
tensor for SGDPerParam). Before the first step DoG, LDoG and Mechanic report 0.

Package fixes (kept small, in subclasses; nothing vendored):
- dog-optimizer 1.0.3: `load_state_dict` moves rbar/G/eta to the CPU, which breaks LDoG on a
  GPU (1-D CPU tensor against CUDA ones); `DoGAveraged` moves them back to the weights' device.
  Its step also fails on a parameter without a gradient; such a parameter gets zeros for it.
- mechanic-pytorch 0.0.1: keeps its per-parameter reference weights in
  `optimizer.state['_mechanic']` keyed by the parameter tensors themselves, which a checkpoint
  cannot map back to the new parameters; `state_dict()` here stores them by index instead.
- gradient-descent-the-ultimate-optimizer 1.0: `GDTUO` (see its docstring).

Checkpoints: write them outside `eval_weights(optimizer)` (in train mode), as the harness does;
load the model's state before the optimizer's.

Each package is imported by the builder that needs it (`_package`), so importing this module, and
logging the step size of any optimizer, needs none of them; a missing one is one error naming it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable, Mapping

import torch
from torch import nn

from common.cli import check_number

__all__ = [
    "BASELINES",
    "GDTUO",
    "add_baseline_args",
    "build_baseline",
    "d_adapted_step_sizes",
    "mechanic_optimizer",
]


# the baselines' packages: import name -> distribution name (pinned in requirements.txt)
PACKAGES = {
    "dog": "dog-optimizer", "prodigyopt": "prodigyopt", "mechanic_pytorch": "mechanic-pytorch",
    "gradient_descent_the_ultimate_optimizer": "gradient-descent-the-ultimate-optimizer",
    "schedulefree": "schedulefree", "dadaptation": "dadaptation", "lion_pytorch": "lion-pytorch",
}


def _package(name: str):
    """The baseline package `name` (a key of PACKAGES, or a module in it), imported now; a missing
    one is a ValueError naming what to install."""
    top = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"--optimizer: this baseline needs the {PACKAGES[top]} package ({e}); install the "
                         f"version pinned in requirements.txt (pip install -r requirements.txt)") from None


def _loaded(module: str, *names: str) -> tuple[type, ...]:
    """Classes of a package that is already imported (none if it is not: then no optimizer is one)."""
    found = sys.modules.get(module)
    return tuple(getattr(found, n) for n in names) if found is not None else ()


def _gdtuo():
    return _package("gradient_descent_the_ultimate_optimizer.gdtuo")


# --------------------------------------------------------------------------------------
# Flag checks: one ValueError naming the flag and what it accepts
# --------------------------------------------------------------------------------------


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _get(options, dest):
    if dest not in options:
        raise ValueError(f"{_flag(dest)} is missing from the options (resolve the spec: common.specs.resolve_spec)")
    return options[dest]


def _number(options, dest, **limits) -> float:
    """The flag's value checked by common.cli.check_number (the one home of numeric flag checks)."""
    return check_number(_get(options, dest), dest, **limits)


def _positive(options, dest, **kw):
    return _number(options, dest, low=0.0, low_open=True, **kw)


def _nonneg(options, dest, **kw):
    return _number(options, dest, low=0.0, **kw)


def _unit(options, dest):  # a decay rate in [0, 1)
    return _number(options, dest, low=0.0, high=1.0, high_open=True)


def _optional(options, dest, check: Callable):
    """-1 (or None) means unset (the package's default)."""
    value = _get(options, dest)
    return None if value is None or value == -1 else check(options, dest)


def _floats(options, dest, count: int | None = None) -> tuple[float, ...]:
    """A comma-separated list of decay rates in [0, 1), e.g. "0.9,0.999"."""
    value = _get(options, dest)
    try:
        items = value if isinstance(value, (list, tuple)) else str(value).strip("()[] ").split(",")
        numbers = tuple(float(x) for x in items if str(x).strip())
    except ValueError:
        numbers = ()
    if not numbers or (count is not None and len(numbers) != count) or not all(0.0 <= x < 1.0 for x in numbers):
        what = f"{count} comma-separated numbers" if count else "comma-separated numbers"
        raise ValueError(f"{_flag(dest)} must be {what} in [0, 1), like "
                         f"{'0.9,0.999' if count == 2 else '0.9,0.99,0.999'}; got {value!r}")
    return numbers


def _choice(options, dest, table: dict[str, str]) -> str:
    value = _get(options, dest)
    key = str(value).strip().lower()
    if key not in table:
        accepted = ", ".join(dict.fromkeys(table.values()))
        raise ValueError(f"{_flag(dest)}: unknown value {value!r}; accepted: {accepted} (case-insensitive)")
    return table[key]


def _flat_params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


# --------------------------------------------------------------------------------------
# DoG / LDoG with polynomial-decay iterate averaging
# --------------------------------------------------------------------------------------


class _DoGAveraging:
    """Mixin over dog.DoG / dog.LDoG: the package's PolynomialDecayAverager after every step,
    and eval()/train() that swap the averaged weights into the parameters and back.

    The averager of the package works on an nn.Module; the optimizer only sees parameters, so
    they are held by an nn.ParameterList (the same tensors). Buffers (BatchNorm running
    statistics) are therefore not averaged: evaluation uses the model's current ones.
    `averaging_gamma=None` turns averaging off (eval()/train() then do nothing).
    """

    layerwise = False  # LDoG: one step size per tensor

    def __init__(self, params, *, averaging_gamma: float | None = 8.0, **kwargs):
        super().__init__(params, **kwargs)
        self._flat = _flat_params(self)
        self.averager = None
        if averaging_gamma is not None:
            self.averager = _package("dog").PolynomialDecayAverager(nn.ParameterList(self._flat), gamma=averaging_gamma)
        self._train_weights = None  # the training weights while eval() has the averaged ones in

    def step(self, closure=None):
        if self._train_weights is not None:
            raise RuntimeError("step() while the averaged weights are in (after eval()); call train() first")
        # fix: the package reads p.grad of every parameter; one without a gradient gets zeros
        # for the step (the same update and the same G as leaving it out)
        missing = [p for p in self._flat if p.grad is None]
        for p in missing:
            p.grad = torch.zeros_like(p)
        try:
            loss = super().step(closure)
        finally:
            for p in missing:
                p.grad = None
        if self.averager is not None:
            self.averager.step()
        return loss

    @torch.no_grad()
    def eval(self):
        if self.averager is None or self._train_weights is not None:
            return
        self._train_weights = [p.detach().clone() for p in self._flat]
        for p, a in zip(self._flat, self.averager.averaged_model.parameters(), strict=True):
            p.copy_(a)

    @torch.no_grad()
    def train(self):
        if self._train_weights is None:
            return
        for p, w in zip(self._flat, self._train_weights, strict=True):
            p.copy_(w)
        self._train_weights = None

    def state_dict(self):
        if self._train_weights is not None:
            raise RuntimeError("state_dict() while the averaged weights are in (inside eval_weights); "
                               "checkpoint in train mode")
        sd = super().state_dict()
        sd["dog_averager"] = None if self.averager is None else self.averager.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        state_dict["state"] = dict(state_dict["state"])
        averaged = state_dict.pop("dog_averager", None)
        super().load_state_dict(state_dict)
        # fix: the package moves rbar/G/eta to the CPU; put every group tensor on the weights' device
        device = self._flat[0].device
        for group in self.param_groups:
            for key, value in group.items():
                if key == "params":
                    continue
                if isinstance(value, torch.Tensor):
                    group[key] = value.to(device, copy=True)
                elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                    group[key] = [t.to(device, copy=True) for t in value]
        if self.averager is not None:
            if averaged is None:
                raise ValueError("--dog-averaging: the checkpoint was written without averaging; "
                                 "resume with --no-dog-averaging")
            self.averager.load_state_dict(averaged)

    def effective_step_sizes(self) -> torch.Tensor:
        sizes = []
        for group in self.param_groups:
            eta = group.get("eta")
            if eta is None:  # before the first step
                n = len(group["params"]) if self.layerwise else 1
                sizes.append(torch.zeros(n, device=group["params"][0].device))
            elif self.layerwise:
                sizes.append(torch.stack([torch.as_tensor(e) for e in eta]).reshape(-1))
            else:
                sizes.append(torch.as_tensor(eta[0]).reshape(1))
        return torch.cat([s.float().to(sizes[0].device) for s in sizes])


# classes here that subclass a package's class: name -> (mixin, package, package class, extra attributes)
_PACKAGE_SUBCLASSES = {
    "DoGAveraged": ("_DoGAveraging", "dog", "DoG", {}),
    "LDoGAveraged": ("_DoGAveraging", "dog", "LDoG", {"layerwise": True}),
    "ScheduleFreeAdamW": ("_ScheduleFreeTrainMode", "schedulefree", "AdamWScheduleFree", {}),
}


@functools.cache
def _package_class(name: str) -> type:
    """`baselines.DoGAveraged` (dog.DoG plus averaging), `LDoGAveraged` (dog.LDoG plus averaging),
    `ScheduleFreeAdamW` (train mode from the start): made on first use, reached through the module's
    __getattr__ (pickle finds them by name; they stay out of __all__, so a star import needs no package)."""
    mixin, package, base, attrs = _PACKAGE_SUBCLASSES[name]
    bases = (globals()[mixin], getattr(_package(package), base))
    return type(name, bases, {**attrs, "__module__": __name__, "__qualname__": name,
                              "__doc__": f"{package}.{base} with {mixin} (see there)"})


def __getattr__(name: str):
    if name in _PACKAGE_SUBCLASSES:
        return _package_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_dog(params, options, cls):
    init_eta = _optional(options, "dog_init_eta", _positive)
    reps_rel = _positive(options, "dog_reps_rel")
    averaging = bool(_get(options, "dog_averaging"))
    gamma = _nonneg(options, "dog_avg_gamma") if averaging else None
    return cls(params, reps_rel=reps_rel, lr=_positive(options, "dog_lr"),
               weight_decay=_nonneg(options, "dog_weight_decay"), eps=_positive(options, "dog_eps"),
               init_eta=init_eta, averaging_gamma=gamma)


# --------------------------------------------------------------------------------------
# Prodigy, D-Adaptation Adam, Schedule-Free AdamW
# --------------------------------------------------------------------------------------


def _build_prodigy(params, options):
    return _package("prodigyopt").Prodigy(
        params, lr=_positive(options, "prodigy_lr"), betas=_floats(options, "prodigy_betas", 2),
        beta3=_optional(options, "prodigy_beta3", _unit), eps=_positive(options, "prodigy_eps"),
        weight_decay=_nonneg(options, "prodigy_weight_decay"), decouple=bool(_get(options, "prodigy_decouple")),
        use_bias_correction=bool(_get(options, "prodigy_use_bias_correction")),
        safeguard_warmup=bool(_get(options, "prodigy_safeguard_warmup")), d0=_positive(options, "prodigy_d0"),
        d_coef=_positive(options, "prodigy_d_coef"),
        growth_rate=_number(options, "prodigy_growth_rate", low=1.0, allow_inf=True),
        slice_p=int(_number(options, "prodigy_slice_p", low=1, integer=True)),
    )


def _build_dadapt_adam(params, options):
    return _package("dadaptation").DAdaptAdam(
        params, lr=_positive(options, "dadapt_lr"), betas=_floats(options, "dadapt_betas", 2),
        eps=_positive(options, "dadapt_eps"), weight_decay=_nonneg(options, "dadapt_weight_decay"),
        decouple=bool(_get(options, "dadapt_decouple")),
        use_bias_correction=bool(_get(options, "dadapt_use_bias_correction")), d0=_positive(options, "dadapt_d0"),
        growth_rate=_number(options, "dadapt_growth_rate", low=1.0, allow_inf=True),
    )


class _ScheduleFreeTrainMode:
    """Mixin over schedulefree.AdamWScheduleFree: put in train mode at construction (the package
    starts in eval mode and refuses to step). `eval_weights` switches it to eval mode (the averaged
    x) for evaluation. Checkpoints are written in train mode (the harness does)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.train()

    def effective_step_sizes(self) -> torch.Tensor:
        sizes = []
        for group in self.param_groups:
            if group["k"] > 0:
                sizes.append(float(group["scheduled_lr"]))
            else:
                warmup = group["warmup_steps"]
                sizes.append(float(group["lr"]) * (1.0 / warmup if warmup > 0 else 1.0))
        return torch.tensor(sizes)


def _build_schedulefree(params, options):
    return _package_class("ScheduleFreeAdamW")(
        params, lr=_positive(options, "sf_lr"), betas=_floats(options, "sf_betas", 2), eps=_positive(options, "sf_eps"),
        weight_decay=_nonneg(options, "sf_weight_decay"),
        warmup_steps=int(_number(options, "sf_warmup_steps", low=0, integer=True)), r=_nonneg(options, "sf_r"),
        weight_lr_power=_nonneg(options, "sf_weight_lr_power"),
    )


# --------------------------------------------------------------------------------------
# Mechanic
# --------------------------------------------------------------------------------------

MECHANIC_BASES = {"sgd": "SGD", "sgdm": "SGDm", "rmsprop": "RMSProp", "adam": "Adam", "adamw": "AdamW",
                  "lion": "Lion"}
_MECHANIC_BASE_CLASSES = {
    "SGD": (torch.optim.SGD, {}),
    "SGDm": (torch.optim.SGD, {"momentum": 0.9}),
    "RMSProp": (torch.optim.RMSprop, {}),
    "Adam": (torch.optim.Adam, {}),
    "AdamW": (torch.optim.AdamW, {}),
    # the paper also runs Mechanic on a Lion base; torch has none: lion-pytorch's (betas (c, rho) = (.9, .99),
    # the paper's Lion base; decoupled weight decay p <- p (1 - lr wd)), imported when asked for
    "Lion": ("lion_pytorch.Lion", {}),
}


def _mechanic_state_dict(self):
    """torch's state_dict, with Mechanic's per-parameter entries keyed by parameter index."""
    sd = super(self._mechanic_class, self).state_dict()
    mech = self.state.get("_mechanic")
    if mech is not None:
        index = {id(p): i for i, p in enumerate(_flat_params(self))}
        packed = {k: v for k, v in mech.items() if not isinstance(k, torch.Tensor)}
        packed["per_param"] = {index[id(k)]: v for k, v in mech.items() if isinstance(k, torch.Tensor)}
        sd["state"] = dict(sd["state"])
        sd["state"]["_mechanic"] = packed
    return sd


def _mechanic_load_state_dict(self, state_dict):
    state_dict = dict(state_dict)
    state_dict["state"] = dict(state_dict["state"])
    packed = state_dict["state"].pop("_mechanic", None)
    super(self._mechanic_class, self).load_state_dict(state_dict)
    self.state.pop("_mechanic", None)
    if packed is None:
        return
    params = _flat_params(self)
    device = params[0].device
    mech = {k: (v.to(device, copy=True) if isinstance(v, torch.Tensor) else v)
            for k, v in packed.items() if k != "per_param"}
    for i, entry in packed["per_param"].items():
        p = params[int(i)]
        mech[p] = {k: v.to(p.device, dtype=p.dtype, copy=True) for k, v in entry.items()}
    self.state["_mechanic"] = mech


def _mechanic_step_sizes(self) -> torch.Tensor:
    """sum(s) * base lr per param group (0 before the first step)."""
    mech = self.state.get("_mechanic")
    s = mech["s"].sum().float() if mech is not None else torch.zeros(())
    return torch.stack([s * float(g["lr"]) for g in self.param_groups])


def mechanic_optimizer(base: str, params, *, base_kwargs: dict | None = None, **mechanic_kwargs):
    """mechanic_pytorch.mechanize(<torch base class>)(params, **base_kwargs), with checkpoints fixed.

    base: SGD, SGDm (momentum 0.9), RMSProp, Adam, AdamW (torch.optim classes) or Lion (lion-pytorch).
    mechanic_kwargs: s_decay, betas, s_init, eps, store_delta (mechanize's arguments).
    """
    base_cls, extra = _MECHANIC_BASE_CLASSES[MECHANIC_BASES[base.lower()]]
    if isinstance(base_cls, str):
        module, name = base_cls.rsplit(".", 1)
        base_cls = getattr(_package(module), name)
    mechanized = _package("mechanic_pytorch").mechanize(base_cls, **mechanic_kwargs)
    cls = type(f"Mechanic{base_cls.__name__}", (mechanized,), {
        "state_dict": _mechanic_state_dict, "load_state_dict": _mechanic_load_state_dict,
        "effective_step_sizes": _mechanic_step_sizes,
    })
    cls._mechanic_class = cls
    return cls(params, **{**extra, **(base_kwargs or {})})


def _build_mechanic(params, options):
    base = _choice(options, "mechanic_base", MECHANIC_BASES)
    base_kwargs = {"lr": _positive(options, "mechanic_base_lr")}
    wd = _optional(options, "mechanic_base_weight_decay", _nonneg)
    if wd is not None:
        base_kwargs["weight_decay"] = wd
    return mechanic_optimizer(
        base, params, base_kwargs=base_kwargs, s_decay=_nonneg(options, "mechanic_s_decay"),
        betas=_floats(options, "mechanic_betas"), s_init=_positive(options, "mechanic_s_init"),
        eps=_positive(options, "mechanic_eps"), store_delta=bool(_get(options, "mechanic_store_delta")),
    )


# --------------------------------------------------------------------------------------
# gdtuo ("Gradient descent: the ultimate optimizer")
# --------------------------------------------------------------------------------------

GDTUO_BASES = {"sgd": "SGD", "adam": "Adam", "adambaydin": "AdamBaydin", "adagrad": "AdaGrad",
               "rmsprop": "RMSProp", "rmspropalpha": "RMSPropAlpha", "sgdperparam": "SGDPerParam"}
GDTUO_HYPERS = {"sgd": "SGD", "adam": "Adam", "adagrad": "AdaGrad", "rmsprop": "RMSProp", "none": "none"}
# the package's default alpha of each class (SGDPerParam has none: SGD's)
GDTUO_DEFAULT_ALPHA = {"SGD": 0.01, "Adam": 0.001, "AdamBaydin": 0.001, "AdaGrad": 0.01, "RMSProp": 0.01,
                       "RMSPropAlpha": 0.01, "SGDPerParam": 0.01}
_GDTUO_KEEP_OUT = ("parameters", "optimizer", "all_params_with_gradients")


def _gdtuo_levels(opt):
    while not isinstance(opt, _gdtuo().NoOpOptimizer):
        yield opt
        opt = opt.optimizer


def _tree(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _tree(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tree(v, fn) for v in value)
    return value


class GDTUO(torch.optim.Optimizer):
    """A torch optimizer that runs a gdtuo hyperoptimizer stack after a plain `loss.backward()`.

    gdtuo's own loop (ModuleWrapper) swaps the module's parameters for non-leaf tensors
    w_t = w_{t-1} - alpha * d_{t-1}(hyperparameters), so that the next `loss.backward()` reaches
    the hyperparameters. Here the parameters stay ordinary leaves, updated in place; the
    package's stack computes the same w_t (with its graph to the hyperparameters), its value
    is copied into the parameters, and the graph is kept. At the next `step()` the gradient
    g_{t+1} = p.grad is sent back through that graph (`autograd.backward(w_t, g_{t+1})`), which
    gives the hyperparameters exactly the gradients gdtuo's own backward gives them, then the
    stack steps. So a train.py drives it like any optimizer:
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    No `create_graph=True` is needed: the package detaches every gradient it reads, so it
    changes no number (tests/test_baselines.py checks this against the package's own loop).

    Stack: `base` (SGD, Adam, AdamBaydin, AdaGrad, RMSProp, RMSPropAlpha, SGDPerParam) whose
    hyperparameters are learned by `hyper` (SGD, Adam, AdaGrad, RMSProp, or "none") with step
    size `kappa`; the package's README uses Adam / SGD(1e-5), the default here.

    Checkpoints: `state_dict()` holds every level's hyperparameters and buffers, and the
    pending graph in a form that can be saved: for each base hyperparameter h, the Jacobian
    J = d w_t / d h (one weight-sized tensor per hyperparameter, computed by double
    backward when the checkpoint is written). After `load_state_dict` the graph is rebuilt
    as sum_h J * h, which sends the same gradients to the hyperparameters (up to float
    rounding), so a resumed run follows the uninterrupted one.
    """

    def __init__(self, params, base: str = "Adam", hyper: str = "SGD", alpha: float | None = None,
                 kappa: float = 1e-5, mu: float = 0.0, beta1: float = 0.9, beta2: float = 0.999,
                 gamma: float = 0.99):
        base = GDTUO_BASES[base.lower()]
        hyper = GDTUO_HYPERS[hyper.lower()]
        alpha = GDTUO_DEFAULT_ALPHA[base] if alpha is None else alpha
        super().__init__(params, dict(lr=alpha))
        self._params = _flat_params(self)
        self._names = [str(i) for i in range(len(self._params))]
        gdtuo = _gdtuo()
        if hyper == "none":
            top = gdtuo.NoOpOptimizer()
        else:
            top = {"SGD": gdtuo.SGD, "Adam": gdtuo.Adam, "AdaGrad": gdtuo.AdaGrad,
                   "RMSProp": gdtuo.RMSProp}[hyper](alpha=kappa, optimizer=gdtuo.NoOpOptimizer())
        if base == "SGD":
            stack = gdtuo.SGD(alpha=alpha, mu=mu, optimizer=top)
        elif base in ("Adam", "AdamBaydin"):
            stack = getattr(gdtuo, base)(alpha=alpha, beta1=beta1, beta2=beta2, optimizer=top)
        elif base == "AdaGrad":
            stack = gdtuo.AdaGrad(alpha=alpha, optimizer=top)
        elif base in ("RMSProp", "RMSPropAlpha"):
            stack = getattr(gdtuo, base)(alpha=alpha, gamma=gamma, optimizer=top)
        else:
            stack = gdtuo.SGDPerParam([(name, alpha) for name in self._names], optimizer=top)
        self.base, self.hyper, self.hyperopt = base, hyper, stack
        self._pending = None  # the last step's new weights, with their graph to the hyperparameters
        self._move_hyperparameters(self._params[0].device)

    def _move_hyperparameters(self, device):
        for level in _gdtuo_levels(self.hyperopt):
            for k, v in list(level.parameters.items()):
                if v.device != device:
                    level.parameters[k] = v.detach().to(device)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, stack = self._params, self.hyperopt
        with torch.enable_grad():
            self._move_hyperparameters(params[0].device)
            stack.begin()  # hyperparameters require (and retain) grad; clears their old grads
            stack.zero_grad()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if self._pending is not None:  # hypergradients: d loss_t / d hyperparameters
                pairs = [(w, g) for w, g in zip(self._pending, grads, strict=True) if w is not None]
                torch.autograd.backward([w for w, _ in pairs], grad_tensors=[g for _, g in pairs])
            # the stack reads .grad and detaches; hand it copies so later in-place changes to
            # p.grad (zero_grad(set_to_none=False), accumulation) cannot touch the saved graph
            named = {}
            for name, p, g in zip(self._names, params, grads, strict=True):
                leaf = p.detach()
                leaf.grad = g.detach().clone()
                named[name] = leaf
            stack.step(named)
            new = [named[name] for name in self._names]
        with torch.no_grad():
            for p, w in zip(params, new, strict=True):
                p.copy_(w)
        pending = []
        for p, w in zip(params, new, strict=True):
            if w.requires_grad:
                # every base ends with `w = p - update`: subtraction saves neither input nor
                # output, so the graph needs no value of w; let w share p's memory
                w.data = p.data
                pending.append(w)
            else:
                pending.append(None)
        self._pending = pending if self.hyper != "none" and any(w is not None for w in pending) else None
        return loss

    def _base_hyperparameters(self) -> dict[str, torch.Tensor]:
        return dict(self.hyperopt.parameters)

    def effective_step_sizes(self) -> torch.Tensor:
        hp = self.hyperopt.parameters
        if self.base == "SGDPerParam":
            alpha = torch.stack([hp[f"{name}_alpha"] for name in self._names])
        elif self.base in ("RMSProp", "RMSPropAlpha"):
            alpha = hp["alpha"].square().reshape(1)
        else:
            alpha = hp["alpha"].reshape(1)
        return alpha.detach().float()

    def _pending_jacobians(self):
        """{hyperparameter name: [d w_i / d h (weight-shaped) or None for each tensor i]}."""
        if self._pending is None:
            return None
        hp = self._base_hyperparameters()
        names = [k for k, v in hp.items() if v.requires_grad]
        idx = [i for i, w in enumerate(self._pending) if w is not None]
        jac = {k: [None] * len(self._pending) for k in names}
        if not names or not idx:
            return jac
        with torch.enable_grad():
            probes = [torch.zeros_like(self._pending[i], requires_grad=True) for i in idx]
            first = torch.autograd.grad([self._pending[i] for i in idx], [hp[k] for k in names],
                                        grad_outputs=probes, create_graph=True, retain_graph=True,
                                        allow_unused=True)
            for k, g in zip(names, first, strict=True):
                if g is None or not g.requires_grad:
                    continue
                rows = torch.autograd.grad(g, probes, retain_graph=True, allow_unused=True)
                for i, r in zip(idx, rows, strict=True):
                    if r is not None:
                        jac[k][i] = r.detach()
        return jac

    def state_dict(self):
        sd = super().state_dict()
        levels = []
        for level in _gdtuo_levels(self.hyperopt):
            attrs = {k: v for k, v in vars(level).items() if k not in _GDTUO_KEEP_OUT}
            levels.append({
                "class": type(level).__name__,
                "parameters": {k: v.detach().clone() for k, v in level.parameters.items()},
                "attrs": _tree(attrs, lambda t: t.detach().clone()),
            })
        sd["gdtuo"] = {"base": self.base, "hyper": self.hyper, "levels": levels,
                       "pending_jacobians": self._pending_jacobians()}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop("gdtuo")
        if (saved["base"], saved["hyper"]) != (self.base, self.hyper):
            raise ValueError(f"--gdtuo-base/--gdtuo-hyper: the checkpoint has {saved['base']}/{saved['hyper']}, "
                             f"this run {self.base}/{self.hyper}")
        super().load_state_dict(state_dict)
        device = self._params[0].device
        levels = list(_gdtuo_levels(self.hyperopt))
        for level, s in zip(levels, saved["levels"], strict=True):
            for k, v in s["parameters"].items():
                level.parameters[k] = v.detach().to(device, copy=True).requires_grad_(True)
            for k, v in s["attrs"].items():
                setattr(level, k, _tree(v, lambda t: t.to(device, copy=True)))
            level.all_params_with_gradients = []
        jac = saved["pending_jacobians"]
        self._pending = None
        if jac is not None:
            hp = self._base_hyperparameters()
            pending = []
            with torch.enable_grad():
                for i, p in enumerate(self._params):
                    terms = [rows[i].to(p.device) * hp[k] for k, rows in jac.items() if rows[i] is not None]
                    pending.append(sum(terms[1:], terms[0]) if terms else None)
            self._pending = pending if any(w is not None for w in pending) else None


def _build_gdtuo(params, options):
    base = _choice(options, "gdtuo_base", GDTUO_BASES)
    hyper = _choice(options, "gdtuo_hyper", GDTUO_HYPERS)
    return GDTUO(params, base=base, hyper=hyper, alpha=_optional(options, "gdtuo_alpha", _positive),
                 kappa=_positive(options, "gdtuo_kappa"), mu=_unit(options, "gdtuo_mu"),
                 beta1=_number(options, "gdtuo_beta1", low=0.0, high=1.0, low_open=True, high_open=True),
                 beta2=_number(options, "gdtuo_beta2", low=0.0, high=1.0, low_open=True, high_open=True),
                 gamma=_number(options, "gdtuo_gamma", low=0.0, high=1.0, low_open=True, high_open=True))


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

BASELINES: dict[str, Callable] = {
    "DoG": lambda params, options: _build_dog(params, options, _package_class("DoGAveraged")),
    "LDoG": lambda params, options: _build_dog(params, options, _package_class("LDoGAveraged")),
    "Prodigy": _build_prodigy,
    "Mechanic": _build_mechanic,
    "gdtuo": _build_gdtuo,
    "ScheduleFree": _build_schedulefree,
    "DAdaptAdam": _build_dadapt_adam,
}


# each baseline's options: the flags (argparse dests) with its prefix
OPTION_PREFIXES = {"DoG": "dog_", "LDoG": "dog_", "Prodigy": "prodigy_", "Mechanic": "mechanic_", "gdtuo": "gdtuo_",
                   "ScheduleFree": "sf_", "DAdaptAdam": "dadapt_"}


def add_baseline_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Each baseline's own knobs, prefixed by its name; defaults are the package's (-1 = unset)."""
    flag = argparse.BooleanOptionalAction
    g = parser.add_argument_group("--optimizer DoG / LDoG (dog-optimizer)")
    g.add_argument("--dog-reps-rel", type=float, default=1e-6,
                   help="r_eps relative to 1+|x0| (first step); the package suggests 1e-4 with batch norm")
    g.add_argument("--dog-lr", type=float, default=1.0, help="DoG's c (changing it is not recommended)")
    g.add_argument("--dog-weight-decay", type=float, default=0.0, help="L2 penalty added to the gradient")
    g.add_argument("--dog-eps", type=float, default=1e-8, help="added to the sum of squared gradient norms")
    g.add_argument("--dog-init-eta", type=float, default=-1, help="first step size; overrides --dog-reps-rel")
    g.add_argument("--dog-averaging", action=flag, default=True,
                   help="polynomial-decay iterate averaging; evaluation uses the averaged weights")
    g.add_argument("--dog-avg-gamma", type=float, default=8.0, help="gamma of the polynomial-decay averaging")

    g = parser.add_argument_group("--optimizer Prodigy (prodigyopt)")
    g.add_argument("--prodigy-lr", type=float, default=1.0, help="multiplies the estimated step size d")
    g.add_argument("--prodigy-betas", default="0.9,0.999", help="Adam's beta1,beta2")
    g.add_argument("--prodigy-beta3", type=float, default=-1, help="decay of the d estimate (unset: sqrt(beta2))")
    g.add_argument("--prodigy-eps", type=float, default=1e-8, help="Adam's epsilon")
    g.add_argument("--prodigy-weight-decay", type=float, default=0.0, help="weight decay")
    g.add_argument("--prodigy-decouple", action=flag, default=True, help="AdamW-style decoupled weight decay")
    g.add_argument("--prodigy-use-bias-correction", action=flag, default=False, help="Adam's bias correction")
    g.add_argument("--prodigy-safeguard-warmup", action=flag, default=False,
                   help="leave lr out of the d estimate's denominator (helps with warm-up)")
    g.add_argument("--prodigy-d0", type=float, default=1e-6, help="initial d")
    g.add_argument("--prodigy-d-coef", "--d-coef", dest="prodigy_d_coef", type=float, default=1.0,
                   help="multiplies the d estimate (the preferred knob)")
    g.add_argument("--prodigy-growth-rate", type=float, default=float("inf"), help="max growth factor of d per step")
    g.add_argument("--prodigy-slice-p", type=int, default=1, help="estimate d on every p-th weight only")

    g = parser.add_argument_group("--optimizer DAdaptAdam (dadaptation)")
    g.add_argument("--dadapt-lr", type=float, default=1.0, help="multiplies the estimated step size d")
    g.add_argument("--dadapt-betas", default="0.9,0.999", help="Adam's beta1,beta2")
    g.add_argument("--dadapt-eps", type=float, default=1e-8, help="Adam's epsilon")
    g.add_argument("--dadapt-weight-decay", type=float, default=0.0, help="weight decay")
    g.add_argument("--dadapt-decouple", action=flag, default=False, help="AdamW-style decoupled weight decay")
    g.add_argument("--dadapt-use-bias-correction", action=flag, default=False, help="Adam's bias correction")
    g.add_argument("--dadapt-d0", type=float, default=1e-6, help="initial d")
    g.add_argument("--dadapt-growth-rate", type=float, default=float("inf"), help="max growth factor of d per step")

    g = parser.add_argument_group("--optimizer ScheduleFree (schedulefree AdamWScheduleFree)")
    g.add_argument("--sf-lr", type=float, default=0.0025, help="learning rate")
    g.add_argument("--sf-betas", default="0.9,0.999", help="beta1 (interpolation), beta2 (second moment)")
    g.add_argument("--sf-eps", type=float, default=1e-8, help="Adam's epsilon")
    g.add_argument("--sf-weight-decay", type=float, default=0.0, help="weight decay (at y)")
    g.add_argument("--sf-warmup-steps", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--sf-r", type=float, default=0.0, help="polynomial weighting power of the average")
    g.add_argument("--sf-weight-lr-power", type=float, default=2.0, help="averaging weights = lr ** this")

    g = parser.add_argument_group("--optimizer Mechanic (mechanic-pytorch)")
    g.add_argument("--mechanic-base", default="AdamW",
                   help="optimizer Mechanic scales: SGD, SGDm (momentum 0.9), RMSProp, Adam, AdamW (torch.optim), "
                        "Lion (lion-pytorch, betas 0.9,0.99)")
    g.add_argument("--mechanic-base-lr", type=float, default=1.0, help="lr of the base (the package suggests 1)")
    g.add_argument("--mechanic-base-weight-decay", type=float, default=-1,
                   help="weight decay of the base (unset: torch's default of the base class)")
    g.add_argument("--mechanic-s-decay", type=float, default=0.01, help="Mechanic's lambda")
    g.add_argument("--mechanic-betas", default="0.9,0.99,0.999,0.9999,0.99999,0.999999",
                   help="Mechanic's betas (one scale s per beta)")
    g.add_argument("--mechanic-s-init", type=float, default=1e-8, help="initial scale")
    g.add_argument("--mechanic-eps", type=float, default=1e-8, help="Mechanic's epsilon")
    g.add_argument("--mechanic-store-delta", action=flag, default=False,
                   help="keep the offset from the reference weights (one more weight copy)")

    g = parser.add_argument_group("--optimizer gdtuo (gradient-descent-the-ultimate-optimizer)")
    g.add_argument("--gdtuo-base", default="Adam",
                   help="level that updates the weights: SGD, Adam, AdamBaydin, AdaGrad, RMSProp, RMSPropAlpha, "
                        "SGDPerParam (one lr per tensor)")
    g.add_argument("--gdtuo-hyper", default="SGD",
                   help="level that learns the base's hyperparameters: SGD, Adam, AdaGrad, RMSProp, none")
    g.add_argument("--gdtuo-alpha", type=float, default=-1,
                   help="initial lr of the base (unset: the package's default, 0.001 Adam, 0.01 others)")
    g.add_argument("--gdtuo-kappa", type=float, default=1e-5,
                   help="step size of the hyper level (the package README's Adam/SGD(1e-5))")
    g.add_argument("--gdtuo-mu", type=float, default=0.0, help="momentum of the SGD base (learned when > 0)")
    g.add_argument("--gdtuo-beta1", type=float, default=0.9, help="initial beta1 of an Adam base")
    g.add_argument("--gdtuo-beta2", type=float, default=0.999, help="initial beta2 of an Adam base")
    g.add_argument("--gdtuo-gamma", type=float, default=0.99, help="initial gamma of an RMSProp base")
    return parser


def build_baseline(name, params, options: Mapping):
    """The baseline `name` from its options (a resolved spec, `common.specs.resolve_spec`, holds them)."""
    if name not in BASELINES:
        raise ValueError(f"--optimizer: unknown baseline {name!r}; accepted: {', '.join(BASELINES)}")
    params = list(params)
    if not params:
        raise ValueError("--optimizer: the model has no trainable parameters")
    return BASELINES[name](params, options)


def d_adapted_step_sizes(optimizer) -> torch.Tensor | None:
    """Prodigy and DAdaptAdam: the Adam lr of the next step per param group, d * lr (* bias
    correction), as a 1-D float tensor; None for other optimizers."""
    adapted = _loaded("prodigyopt", "Prodigy") + _loaded("dadaptation", "DAdaptAdam")
    if not (adapted and isinstance(optimizer, adapted)):
        return None
    sizes = []
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        k = group["k"]
        bc = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)) if group["use_bias_correction"] else 1.0
        sizes.append(float(group["d"]) * float(group["lr"]) * bc)
    return torch.tensor(sizes)
