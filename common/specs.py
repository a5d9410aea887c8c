"""Optimizers from specs: the one registry of the project's optimizers.

A spec is a plain JSON-able dict, `{"optimizer": NAME, **options}`:
- NAME is an `--optimizer` value: "HF" (MetaOptimize), "AdamW" (torch AdamW, the warm-up/cosine
  baseline) or a learning-rate-free baseline of `common.baselines.BASELINES` ("Prodigy", "DoG",
  ...); case-insensitive on input, canonical in a resolved spec.
- the option keys are the argparse dests of the optimizer flags (`common.optim_flags`), with the
  flags' values ("-1 = unset" included); `base_args` and `base_args_rest` are dicts.

Which options apply: HF takes MetaOptimize's (`HF_OPTIONS`), or with `base_optimizer` set the
meta options around that optimizer (`AROUND_OPTIONS`); AdamW takes `ADAMW_OPTIONS`; a baseline
the flags of its prefix (`baselines.OPTION_PREFIXES`). `resolve_spec` fills in the defaults (the
flags' defaults; alpha0 1e-6, or 1 around a base optimizer), refuses an option that does not
apply, and checks the values once (ValueError naming the flag, as the command line shows it).

`spec_from_args(args)` keeps, of parsed flags, the options that apply to the chosen optimizer,
plus --base-optimizer and --hessian when set (they change what is built, so another optimizer
refuses them); the other flags are left out whatever their value, as the command line always did.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import re
from collections.abc import Mapping

import torch

from common import baselines
from common.cli import flag_name
from common.optimizers import GROUP_KINDS, NAMED_STEPSIZE_GROUPS, MetaOptimize
from common.optimizers.blocks import parse_counts
from common.optimizers.hessian import check_hessian
from common.optimizers.metaoptimize import base_hyperparameters, check_settings

__all__ = ["build_optimizer", "build_scheduler", "resolve_spec", "spec_from_args", "spec_label", "optimizer_choices", "as_flags",
           "is_option"]

# --optimizer values besides the baselines; "metaoptimize" is an alias of HF
OPTIMIZER_CHOICES = {"hf": "HF", "metaoptimize": "HF", "adamw": "AdamW"}
STATE_DTYPES = {"param": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
# --hessian values and what MetaOptimize calls them
HESSIANS = {"none": None, "hvp": "hvp", "block_diagonal": "block_diagonal"}

_META = ("alg_meta", "alpha0", "meta_stepsize", "gamma", "stepsize_groups", "weight_decay_meta",
         "normalizer_param_meta", "momentum_param_meta", "Lion_beta2_meta")
# MetaOptimize with its built-in bases (--alg-base)
HF_OPTIONS = ("alg_base", *_META, "weight_decay_base", "normalizer_param_base", "momentum_param_base",
              "Lion_beta2_base", "optimizer_impl", "state_dtype", "hessian", "rectify")
# MetaOptimize around an optimizer's own step (--base-optimizer)
AROUND_OPTIONS = (*_META, "base_optimizer", "base_args", "base_args_rest")
# torch AdamW with linear warm-up and cosine decay (betas and weight decay from the base flags)
ADAMW_OPTIONS = ("lr", "warmup_steps", "momentum_param_base", "normalizer_param_base", "weight_decay_base")
# options that change what is built: spec_from_args keeps them when set, so other optimizers refuse them
_REFUSED_WHEN_SET = ("base_optimizer", "hessian")

# MetaOptimize's constructor arguments whose flag is not "--" + the name with dashes
FLAGS = {"impl": "--optimizer-impl", "lion_beta2_base": "--Lion-beta2-base", "lion_beta2_meta": "--Lion-beta2-meta",
         **{k: flag_name(k) for k in HF_OPTIONS if k not in ("optimizer_impl", "Lion_beta2_base", "Lion_beta2_meta")}}


def optimizer_choices() -> dict[str, str]:
    """Every --optimizer value, lower-cased -> canonical."""
    return {**OPTIMIZER_CHOICES, **{k.lower(): k for k in baselines.BASELINES}}


def as_flags(message: str) -> str:
    """An optimizer error with its argument names replaced by the flags that set them."""
    return re.sub(r"\b(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")\b", lambda m: FLAGS[m.group(1)],
                  message)


@functools.cache
def _defaults() -> dict:
    """The flags' defaults (their one home is `optim_flags.add_optimizer_args`), plus rectify (a flag of idbd/)."""
    from common.optim_flags import add_optimizer_args  # optim_flags imports this module at its top

    parsed = vars(add_optimizer_args(argparse.ArgumentParser(add_help=False)).parse_args([]))
    return {**parsed, "rectify": False, "base_args": {}, "base_args_rest": {}}


def is_option(key: str) -> bool:
    """Whether `key` is an option of some optimizer (an optimizer flag's dest)."""
    return key in _defaults() and key != "optimizer"


def _options_of(name: str, around: bool) -> tuple[str, ...]:
    if name == "HF":
        return AROUND_OPTIONS if around else HF_OPTIONS
    if name == "AdamW":
        return ADAMW_OPTIONS
    prefix = baselines.OPTION_PREFIXES[name]
    return tuple(k for k in _defaults() if k.startswith(prefix))


def _owners(key: str) -> list[str]:
    """The optimizers (as --optimizer values, with "HF --base-optimizer") an option belongs to."""
    out = [n for n, opts in (("HF", HF_OPTIONS), ("HF --base-optimizer", AROUND_OPTIONS), ("AdamW", ADAMW_OPTIONS))
           if key in opts]
    return out + [n for n, p in baselines.OPTION_PREFIXES.items() if key.startswith(p)]


def _canonical_optimizer(value) -> str:
    key = str(value).strip().lower()
    choices = optimizer_choices()
    if key not in choices:
        raise ValueError(f"--optimizer: unknown value {value!r}; accepted: {', '.join(dict.fromkeys(choices.values()))}")
    return choices[key]


def _json_object(flag: str, text) -> dict:
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag}: not valid JSON ({getattr(err, 'msg', err)}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a JSON object of keyword arguments, got {text!r}")
    return value


def _unset(value):
    return None if value is None or value == -1 else value


def _normalized(spec) -> dict:
    """The spec with its name canonical, its defaults filled in and every option checked to apply
    (the values' own checks are the constructors')."""
    if not isinstance(spec, Mapping) or "optimizer" not in spec:
        raise ValueError(f"--optimizer: a spec is a dict {{'optimizer': NAME, **options}}, got {spec!r}")
    name = _canonical_optimizer(spec["optimizer"])
    given = {k: v for k, v in spec.items() if k != "optimizer"}
    if given.get("base_optimizer", "") is None:
        given.pop("base_optimizer")  # None = not set, as the flag's default
    around = "base_optimizer" in given
    if around and name != "HF":
        raise ValueError(f"--base-optimizer: MetaOptimize's base (--optimizer HF), not one of --optimizer {name}")
    options = _options_of(name, around)
    defaults = _defaults()
    for key in given:
        if key in options:
            continue
        flag = flag_name(key)
        owners = _owners(key)
        if not owners:
            raise ValueError(f"{flag}: not an option of any optimizer (spec key {key!r})")
        if key == "hessian" and around:
            raise ValueError("--hessian: a trace option of MetaOptimize's built-in bases (--alg-base), not of "
                             "--base-optimizer (its trace is Hessian-free)")
        if key == "hessian":
            raise ValueError(f"--hessian {given[key]}: a trace option of MetaOptimize (--optimizer HF), not of "
                             f"--optimizer {name}")
        what = "--optimizer HF --base-optimizer" if name == "HF" and around else f"--optimizer {name}"
        raise ValueError(f"{flag}: an option of --optimizer {' / '.join(owners)}, not of {what}")
    out = {"optimizer": name}
    for key in options:
        value = given.get(key, defaults[key])
        if key == "alpha0" and value is None:
            value = 1.0 if around else 1e-6  # around a base optimizer alpha multiplies its own lr
        elif key in ("base_args", "base_args_rest"):
            value = _json_object(flag_name(key), value)
        elif key == "hessian":
            value = "none" if value is None else value
            if value not in HESSIANS:
                raise ValueError(f"--hessian: unknown value {value!r}; accepted: {', '.join(HESSIANS)}")
        elif key == "state_dtype" and value not in STATE_DTYPES:
            raise ValueError(f"--state-dtype: unknown value {value!r}; accepted: {', '.join(STATE_DTYPES)}")
        elif key == "stepsize_groups" and isinstance(value, str) and \
                value.strip().lower() not in (*GROUP_KINDS, *NAMED_STEPSIZE_GROUPS):
            try:
                parse_counts(value)  # a list of tensor counts: its syntax now, its sum once the model exists
            except ValueError as err:
                raise ValueError(as_flags(str(err))) from None
        out[key] = value
    return out


def resolve_spec(spec: Mapping) -> dict:
    """The resolved spec (canonical name, every option that applies with its default), checked once:
    ValueError naming the flag. Idempotent; the result is JSON-able.

    MetaOptimize's values are checked by its own checks of the settings (no optimizer built); the
    others' (torch's, the baselines' packages', the bases of --base-optimizer) only by their
    constructors, so they are built on a dummy tensor. Only the step-size group counts wait for the
    model (they must add up to its tensor count)."""
    out = _normalized(spec)
    if out["optimizer"] == "HF" and "base_optimizer" not in out:
        _check_metaoptimize(out)
        return out
    dummy = {**out}
    if out["optimizer"] == "HF":
        dummy["stepsize_groups"] = "scalar"
    params = [torch.nn.Parameter(torch.zeros(2))]
    if "base_optimizer" in out:  # a matrix too: both sides of A+B get their arguments checked
        params.insert(0, torch.nn.Parameter(torch.zeros(2, 2)))
    _build(params, params, dummy)
    return out


def spec_from_args(args, **overrides) -> dict:
    """The (normalized) spec of parsed flags (see `add_optimizer_args`): the options that apply to
    the chosen --optimizer, plus --base-optimizer and --hessian when set. Flags missing from the
    namespace take their defaults; `overrides` (dests) replace flags a script redefines (l2o's
    --optimizer and --lr). The values are checked by `resolve_spec` / `build_optimizer`."""
    defaults = _defaults()
    values = {**{k: getattr(args, k, defaults[k]) for k in defaults}, **overrides}
    name = _canonical_optimizer(values.get("optimizer") or "HF")
    around = bool(values["base_optimizer"])
    spec = {k: values[k] for k in _options_of(name, around) if k != "base_optimizer" or around}
    for key in _REFUSED_WHEN_SET:
        if key not in spec and values[key] not in (None, "", defaults[key]):
            spec[key] = values[key]
    return _normalized({"optimizer": name, **spec})


def _params_of(model_or_params):
    if isinstance(model_or_params, torch.nn.Module):
        return [p for p in model_or_params.parameters() if p.requires_grad]
    return model_or_params


def build_optimizer(model_or_params, spec: Mapping) -> torch.optim.Optimizer:
    """Any optimizer of the project from a spec (resolved first; see the module docstring)."""
    return _build(model_or_params, _params_of(model_or_params), _normalized(spec))


def _metaoptimize_kwargs(spec: dict) -> dict:
    """MetaOptimize's keyword arguments for a resolved --optimizer HF spec."""
    return dict(
        alg_base=spec["alg_base"], alg_meta=spec["alg_meta"], alpha0=spec["alpha0"],
        meta_stepsize=_unset(spec["meta_stepsize"]), gamma=spec["gamma"],
        stepsize_groups=spec["stepsize_groups"], weight_decay_base=_unset(spec["weight_decay_base"]),
        normalizer_param_base=_unset(spec["normalizer_param_base"]),
        momentum_param_base=_unset(spec["momentum_param_base"]),
        lion_beta2_base=_unset(spec["Lion_beta2_base"]), weight_decay_meta=_unset(spec["weight_decay_meta"]),
        normalizer_param_meta=_unset(spec["normalizer_param_meta"]),
        momentum_param_meta=_unset(spec["momentum_param_meta"]),
        lion_beta2_meta=_unset(spec["Lion_beta2_meta"]), impl=spec["optimizer_impl"],
        state_dtype=STATE_DTYPES[spec["state_dtype"]], hessian=HESSIANS[spec["hessian"]],
        rectify=spec["rectify"],
    )


def _check_metaoptimize(spec: dict) -> None:
    """The checks MetaOptimize's constructor makes of these settings, in its order, without a model:
    its settings, the base rule's hyperparameters (its one param group) and the Hessian options, these
    with scalar blocks, or weight-wise ones for --rectify (whose rule needs them), as the layout of
    --stepsize-groups waits for the model."""
    kw = _metaoptimize_kwargs(spec)
    groups = "weightwise" if kw["rectify"] else "scalar"
    try:
        alg_base, alg_meta, _, _ = check_settings(
            kw["alg_base"], kw["alg_meta"], kw["alpha0"], kw["gamma"], groups, kw["meta_stepsize"],
            kw["weight_decay_meta"], kw["momentum_param_meta"], kw["normalizer_param_meta"], kw["lion_beta2_meta"],
            kw["hessian"], kw["state_dtype"])
        group = {"lr": 1.0, "weight_decay": kw["weight_decay_base"], "normalizer_param_base": kw["normalizer_param_base"],
                 "momentum_param_base": kw["momentum_param_base"], "lion_beta2_base": kw["lion_beta2_base"]}
        base_hyperparameters(alg_base, group)
        check_hessian(kw["hessian"], kw["rectify"], alg_meta, "weightwise" if kw["rectify"] else "tensor", [])  # scalar: "tensor"
    except ValueError as err:
        raise ValueError(as_flags(str(err))) from None


def _build(model_or_params, params, spec: dict) -> torch.optim.Optimizer:
    name = spec["optimizer"]
    if name == "HF" and "base_optimizer" in spec:
        return _build_around(model_or_params, params, spec)
    if name == "HF":
        try:
            return MetaOptimize(params, **_metaoptimize_kwargs(spec))
        except ValueError as err:
            raise ValueError(as_flags(str(err))) from None
    if name == "AdamW":
        return _build_adamw(params, spec)
    return baselines.build_baseline(name, params, spec)


def build_scheduler(optimizer, spec: Mapping, total_steps: int):
    """Linear warm-up (the spec's warmup_steps) then cosine decay to 0 for the AdamW baseline; None otherwise."""
    if type(optimizer) is not torch.optim.AdamW:  # not subclasses: Mechanic wraps an AdamW subclass
        return None
    warmup = max(0, int(spec.get("warmup_steps", _defaults()["warmup_steps"])))
    total = max(int(total_steps), warmup + 1)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _unit(name: str, value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _build_adamw(params, spec: dict) -> torch.optim.Optimizer:
    """torch's fused AdamW; betas and weight decay from the base flags (its schedule: optim_flags.build_scheduler)."""
    beta1, beta2 = _unset(spec["momentum_param_base"]), _unset(spec["normalizer_param_base"])
    beta1 = _unit("--momentum-param-base", 0.9 if beta1 is None else beta1)
    beta2 = _unit("--normalizer-param-base", 0.999 if beta2 is None else beta2)
    wd, lr = _unset(spec["weight_decay_base"]), spec["lr"]
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {lr}")
    if wd is not None and not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"--weight-decay-base must be a finite number >= 0, got {wd}")
    return torch.optim.AdamW(list(params), lr=lr, betas=(beta1, beta2), weight_decay=0.0 if wd is None else wd,
                             fused=True)


def base_optimizer_class(name: str, flag: str = "--base-optimizer") -> type:
    """A torch.optim optimizer by name (case-insensitive), or module.Class of another package."""
    text = str(name).strip()
    if "." in text:
        module_name, _, cls_name = text.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{flag}: cannot import {text!r} ({err})") from None
    else:
        found = {k.lower(): v for k, v in vars(torch.optim).items()
                 if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer}
        cls = found.get(text.lower())
        if cls is None:
            raise ValueError(f"{flag}: unknown optimizer {name!r}; accepted: a torch.optim name "
                             f"({', '.join(sorted(c.__name__ for c in found.values()))}), module.Class of another "
                             "package, or A+B (e.g. Muon+AdamW)")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"{flag}: {text!r} is not a torch.optim.Optimizer class")
    return cls


def _build_around(model_or_params, params, spec: dict) -> torch.optim.Optimizer:
    """MetaOptimize around --base-optimizer (one optimizer, or A for the 2-D weights and B for the rest)."""
    names = str(spec["base_optimizer"]).split("+")
    if len(names) > 2 or not all(n.strip() for n in names):
        raise ValueError(f"--base-optimizer: {spec['base_optimizer']!r} is not NAME or A+B")
    classes = [base_optimizer_class(n) for n in names]
    params = list(params)
    parts = [params] if len(classes) == 1 else [[p for p in params if p.dim() == 2],
                                                 [p for p in params if p.dim() != 2]]
    bases = []
    for cls, part, key in zip(classes, parts, ("base_args", "base_args_rest")):
        if not part:
            continue  # A+B on a model with no tensor for one side
        try:
            bases.append(cls(part, **spec[key]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{flag_name(key)}: {cls.__name__}: {err}") from None
    model = model_or_params if isinstance(model_or_params, torch.nn.Module) else None
    try:
        return MetaOptimize.around(
            bases if len(bases) > 1 else bases[0], alg_meta=spec["alg_meta"], alpha0=spec["alpha0"],
            meta_stepsize=_unset(spec["meta_stepsize"]), gamma=spec["gamma"], stepsize_groups=spec["stepsize_groups"],
            weight_decay_meta=_unset(spec["weight_decay_meta"]),
            normalizer_param_meta=_unset(spec["normalizer_param_meta"]),
            momentum_param_meta=_unset(spec["momentum_param_meta"]), lion_beta2_meta=_unset(spec["Lion_beta2_meta"]),
            model=model)
    except ValueError as err:
        raise ValueError(as_flags(str(err))) from None


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# the option a baseline's label shows (its main knob): name -> (short name, option)
_BASELINE_LABEL_KEYS = {"DoG": ("reps_rel", "dog_reps_rel"), "LDoG": ("reps_rel", "dog_reps_rel"),
                        "Prodigy": ("d0", "prodigy_d0"), "DAdaptAdam": ("d0", "dadapt_d0"),
                        "ScheduleFree": ("lr", "sf_lr"), "Mechanic": ("base", "mechanic_base"),
                        "gdtuo": ("base", "gdtuo_base")}


def spec_label(spec: Mapping) -> str:
    """A short label for plots and tables, e.g. "HF AdamW/Lion a0=1e-06", "HF around SGD/Adam a0=1",
    "AdamW lr=0.001", "Prodigy d0=1e-06" (the step-size blocks follow unless scalar)."""
    s = _normalized(spec)
    name = s["optimizer"]
    if name == "HF":
        base = f"around {s['base_optimizer']}" if "base_optimizer" in s else s["alg_base"]
        label = f"HF {base}/{s['alg_meta']} a0={_num(s['alpha0'])}"
        groups = s["stepsize_groups"]
        return label if groups == "scalar" else f"{label} {groups}"
    if name == "AdamW":
        return f"AdamW lr={_num(s['lr'])}"
    short, key = _BASELINE_LABEL_KEYS.get(name, (None, None))
    return name if key is None else f"{name} {short}={_num(s[key])}"
