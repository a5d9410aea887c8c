"""The league's methods: each optimizer of the project as a spec (`{"optimizer": NAME, **options}`,
the registry's form), with its documented defaults for the self-tuning ruleset and a 5-point grid
of its main step-size knob for the external-tuning ruleset.

Grids: a learning rate (AdamW, SGDm, Lion, Schedule-Free, gdtuo's alpha) is tried at its default
times {0.3, 1, 3, 10, 30}; an initial value that the method adapts (MetaOptimize's alpha0, DoG's
r_eps, Prodigy's and D-Adaptation's d0, Mechanic's s_init) at its default times {1e-4, 1e-2, 1,
1e2, 1e4}, since these methods claim to forget it. The learned optimizers have no knob (lr = 1,
as meta-trained) and run where they apply: the LSTM L2O on the MLP workloads, RNNprop on M-L2O's
problems; elsewhere they count as missing the target.

All optimizer construction goes through `build(spec, model)`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

LR_FACTORS = (0.3, 1.0, 3.0, 10.0, 30.0)  # leans up: short budgets favour larger steps
INIT_FACTORS = (1e-4, 1e-2, 1.0, 1e2, 1e4)
NETWORKS = Path(__file__).resolve().parent / "networks"  # the learned optimizers' networks (league/README.md)
# how `league/run.py --train-networks` meta-trains them (l2o/meta_train.py's flags; ~2 min each on one core)
NETWORK_COMMANDS = {
    "lstm-relu": ["--preset", "cpu", "--optimizee", "relu"],  # the LSTM L2O, on the relu MLP on digits 8x8
    "rnnprop-lasso": ["--preset", "ml2o_cpu"],  # M-L2O's RNNprop on its LASSO training mix
}

# MetaOptimize's meta settings: the paper's (AdamW, Adam) and the authors' Lion meta (their README)
ADAM_META = {"alg_meta": "Adam", "meta_stepsize": 1e-3, "momentum_param_meta": 0.9, "normalizer_param_meta": 0.999}
LION_META = {"alg_meta": "Lion", "meta_stepsize": 1e-3, "momentum_param_meta": 0.99, "Lion_beta2_meta": 0.9,
             "normalizer_param_meta": -1}


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "hand-designed", "adapting" or "learned"
    spec: dict  # the self-tuning configuration
    knob: str | None = None  # the spec key the grid sets ("base_args.lr": a key inside base_args)
    factors: tuple = ()
    applies: tuple = field(default=())  # workload families it runs on; () = all

    def default(self) -> float | None:
        return None if self.knob is None else _get(self.spec, self.knob)

    def grid(self) -> list[float]:
        return [float(f"{self.default() * f:.6g}") for f in self.factors]

    def spec_at(self, value: float | None) -> dict:
        """The spec with the knob at `value` (None: the self-tuning spec)."""
        spec = copy.deepcopy(self.spec)
        if value is not None:
            _set(spec, self.knob, value)
        return spec

    def applies_to(self, workload) -> bool:
        return not self.applies or workload.family in self.applies


def _get(spec, key):
    for part in key.split("."):
        spec = spec[part]
    return spec


def _set(spec, key, value):
    *path, last = key.split(".")
    for part in path:
        spec = spec[part]
    spec[last] = value


def _around(base: str, base_args: dict, meta: dict | None = None, **options) -> dict:
    """MetaOptimize around a torch optimizer; meta None: alpha fixed at 1, i.e. exactly that optimizer."""
    spec = {"optimizer": "HF", "base_optimizer": base, "base_args": base_args}
    return {**spec, **(meta or {"alg_meta": "fixed"}), "alpha0": 1.0, **options}


METHODS: dict[str, Method] = {m.name: m for m in (
    # hand-designed, fixed step
    Method("AdamW", "hand-designed", {"optimizer": "AdamW", "lr": 1e-3, "weight_decay_base": 0.0},
           "lr", LR_FACTORS),
    Method("SGDm", "hand-designed", _around("SGD", {"lr": 1e-2, "momentum": 0.9}), "base_args.lr", LR_FACTORS),
    Method("Lion", "hand-designed", _around("lion_pytorch.Lion", {"lr": 1e-4}), "base_args.lr", LR_FACTORS),
    # MetaOptimize: the paper's pairings (alpha0 1e-6, its default) and around torch's AdamW (alpha0 1)
    Method("MO(AdamW,Adam)", "adapting", {"optimizer": "HF", "alg_base": "AdamW", "alpha0": 1e-6, **ADAM_META},
           "alpha0", INIT_FACTORS),
    Method("MO(AdamW,Lion)", "adapting", {"optimizer": "HF", "alg_base": "AdamW", "alpha0": 1e-6, **LION_META},
           "alpha0", INIT_FACTORS),
    Method("MO(SGDm,Adam)", "adapting", {"optimizer": "HF", "alg_base": "SGDm", "alpha0": 1e-6, **ADAM_META},
           "alpha0", INIT_FACTORS),
    Method("MO(Lion,Lion)", "adapting", {"optimizer": "HF", "alg_base": "Lion", "alpha0": 1e-6,
                                         "Lion_beta2_base": 0.99, **LION_META}, "alpha0", INIT_FACTORS),
    Method("MO-around-AdamW", "adapting", _around("AdamW", {"lr": 1e-3, "weight_decay": 0.0}, ADAM_META),
           "alpha0", INIT_FACTORS),
    # the learning-rate-free baselines (common/baselines.py), their packages' defaults
    Method("DoG", "adapting", {"optimizer": "DoG", "dog_reps_rel": 1e-6}, "dog_reps_rel", INIT_FACTORS),
    Method("LDoG", "adapting", {"optimizer": "LDoG", "dog_reps_rel": 1e-6}, "dog_reps_rel", INIT_FACTORS),
    Method("Prodigy", "adapting", {"optimizer": "Prodigy", "prodigy_d0": 1e-6}, "prodigy_d0", INIT_FACTORS),
    Method("Mechanic", "adapting", {"optimizer": "Mechanic", "mechanic_s_init": 1e-8}, "mechanic_s_init",
           INIT_FACTORS),
    Method("DAdaptAdam", "adapting", {"optimizer": "DAdaptAdam", "dadapt_d0": 1e-6}, "dadapt_d0", INIT_FACTORS),
    Method("ScheduleFreeAdamW", "adapting", {"optimizer": "ScheduleFree", "sf_lr": 0.0025}, "sf_lr", LR_FACTORS),
    Method("gdtuo", "adapting", {"optimizer": "gdtuo", "gdtuo_base": "Adam", "gdtuo_hyper": "SGD",
                                 "gdtuo_alpha": 1e-3}, "gdtuo_alpha", LR_FACTORS),
    # learned (league/networks/, meta-trained by the commands in league/README.md)
    Method("L2O-LSTM", "learned", {"optimizer": "L2O", "checkpoint": "lstm-relu"}, applies=("mlp",)),
    Method("RNNprop", "learned", {"optimizer": "L2O", "checkpoint": "rnnprop-lasso"}, applies=("problem",)),
)}
QUICK_METHODS = ("AdamW", "MO(AdamW,Adam)", "Prodigy")


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; accepted: {', '.join(METHODS)}")
    return METHODS[name]


def spec_text(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def build(spec: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of a spec for `model` (the league's one place that constructs optimizers)."""
    if spec.get("optimizer") == "L2O":  # a learned optimizer: not in the registry
        from l2o.learned import LearnedOptimizer

        return LearnedOptimizer.from_checkpoint(model.parameters(), NETWORKS / spec["checkpoint"],
                                                lr=spec.get("lr", 1.0))
    from common.specs import build_optimizer

    return build_optimizer(model, spec)
