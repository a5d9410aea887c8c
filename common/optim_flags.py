"""The optimizer flags of every train.py and the registry of `--optimizer` choices.

It sits above both `common.optimizers` (which knows nothing of flags) and `common.baselines`:
it turns parsed flags into an optimizer, and the optimizer's argument names in its errors into
the flags a user typed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import re

import torch
from torch import Tensor

from common.optimizers import GROUP_KINDS, NAMED_STEPSIZE_GROUPS, MetaOptimize
from common.optimizers.blocks import parse_counts

# --optimizer values handled here; the learning-rate-free baselines live in common/baselines.py
OPTIMIZER_CHOICES = {"hf": "HF", "metaoptimize": "HF", "adamw": "AdamW"}
STATE_DTYPES = {"param": None, "float32": torch.float32, "bfloat16": torch.bfloat16}

# MetaOptimize's constructor arguments and their flags (paper symbols in brackets)
FLAGS = {
    "alg_base": "--alg-base", "alg_meta": "--alg-meta", "alpha0": "--alpha0", "meta_stepsize": "--meta-stepsize",
    "gamma": "--gamma", "stepsize_groups": "--stepsize-groups", "weight_decay_base": "--weight-decay-base",
    "normalizer_param_base": "--normalizer-param-base", "momentum_param_base": "--momentum-param-base",
    "lion_beta2_base": "--Lion-beta2-base", "weight_decay_meta": "--weight-decay-meta",
    "normalizer_param_meta": "--normalizer-param-meta", "momentum_param_meta": "--momentum-param-meta",
    "lion_beta2_meta": "--Lion-beta2-meta", "impl": "--optimizer-impl", "state_dtype": "--state-dtype",
    "hessian": "--hessian", "rectify": "--rectify",
}
# --hessian values and what MetaOptimize calls them
HESSIANS = {"none": None, "hvp": "hvp", "block_diagonal": "block_diagonal"}


def _baselines():
    from common import baselines  # imported when a baseline is asked for: it needs every baseline package

    return baselines


def optimizer_choices() -> dict[str, str]:
    return {**OPTIMIZER_CHOICES, **{k.lower(): k for k in _baselines().BASELINES}}


def as_flags(message: str) -> str:
    """An optimizer error with its argument names replaced by the flags that set them."""
    return re.sub(r"\b(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")\b", lambda m: FLAGS[m.group(1)],
                  message)


def add_optimizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The paper's optimizer flags. -1 means "unset", as in the paper's scripts."""
    g = parser.add_argument_group("optimizer (paper symbols in brackets; -1 = unset)")
    g.add_argument("--optimizer", default="HF",
                   help="HF = MetaOptimize (Hessian-free); AdamW = torch AdamW with linear warmup and cosine decay"
                        "; or a learning-rate-free baseline: " + ", ".join(_baselines().BASELINES))
    g.add_argument("--alg-base", default="AdamW", help="base update: SGD, SGDm, RMSProp, AdamW (alias Adam), Lion")
    g.add_argument("--alg-meta", default="Lion", help="meta update of the log step sizes: fixed, SGD, RMSProp, Adam, Lion")
    g.add_argument("--alpha0", type=float, default=None,
                   help="[alpha0] initial step size (fixed step when --alg-meta fixed); default 1e-6, and 1 with "
                        "--base-optimizer (there alpha multiplies the base's own lr)")
    g.add_argument("--meta-stepsize", type=float, default=1e-3, help="[eta] meta step size")
    g.add_argument("--gamma", type=float, default=1.0, help="[gamma] discount of future losses, in [0, 1]")
    g.add_argument("--stepsize-groups", default="scalar",
                   help="step-size blocks: scalar, layerwise, nodewise, weightwise, last_layer_and_others, "
                        "resnet18_blocks, resnet50_blocks, transformer_blocks_15m, or a list like [3,12,47]")
    g.add_argument("--weight-decay-base", type=float, default=0.1, help="[kappa] base weight decay")
    g.add_argument("--normalizer-param-base", type=float, default=0.999, help="[lambda] base second-moment decay")
    g.add_argument("--momentum-param-base", type=float, default=0.9, help="[rho] base momentum")
    g.add_argument("--Lion-beta2-base", type=float, default=-1, help="[c] Lion interpolation of the base update")
    g.add_argument("--weight-decay-meta", type=float, default=0.0, help="[kappa_bar] meta weight decay on beta")
    g.add_argument("--normalizer-param-meta", type=float, default=-1, help="[lambda_bar] meta second-moment decay")
    g.add_argument("--momentum-param-meta", type=float, default=0.99, help="[rho_bar] meta momentum")
    g.add_argument("--Lion-beta2-meta", type=float, default=0.9, help="[c_bar] Lion interpolation of the meta update")
    g.add_argument("--optimizer-impl", default="auto", choices=["auto", "fused", "foreach"],
                   help="MetaOptimize's step: fused (one pass per tensor: compiled C on CPU, torch.compile on "
                        "CUDA), foreach, or auto (fused where it runs)")
    g.add_argument("--state-dtype", default="param", choices=list(STATE_DTYPES),
                   help="dtype of MetaOptimize's base state and trace (bfloat16 halves their memory); "
                        "param = the parameters' dtype")
    g.add_argument("--hessian", default="none", choices=list(HESSIANS),
                   help="MetaOptimize's trace: none = Hessian-free (the paper's runs); hvp = keep the Hessian term of "
                        "the weights' own update (spec section 9): one Hessian-vector product per step, which costs "
                        "a second backward pass, through the gradient's graph, and keeps that graph in memory (a "
                        "step took 4-6x as long on a CPU); block_diagonal = one product per step-size block (the "
                        "exact diagonal for weightwise blocks, small models only). Not with --amp fp16, --compile "
                        "or DDP")
    g.add_argument("--base-optimizer", default=None,
                   help="MetaOptimize around an optimizer's own step (spec section 10) instead of --alg-base: a "
                        "torch.optim name (AdamW, NAdam, RAdam, Adafactor, SGD, Muon, ...), module.Class of another "
                        "package (lion_pytorch.Lion), or A+B: A for the 2-D weight matrices, B for the other tensors "
                        "(Muon+AdamW)")
    g.add_argument("--base-args", default="{}",
                   help='keyword arguments of --base-optimizer as a JSON object, e.g. \'{"lr": 1e-3, "betas": [0.9, '
                        '0.95], "weight_decay": 0.1}\' (for A+B: those of A)')
    g.add_argument("--base-args-rest", default="{}",
                   help="with --base-optimizer A+B: the keyword arguments of B, as a JSON object")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the --optimizer AdamW baseline")
    g.add_argument("--warmup-steps", type=int, default=1000, help="linear warm-up steps of the --optimizer AdamW baseline")
    _baselines().add_baseline_args(parser)
    return parser


def _unset(value):
    return None if value is None or value == -1 else value


def _params_of(model_or_params):
    if isinstance(model_or_params, torch.nn.Module):
        return [p for p in model_or_params.parameters() if p.requires_grad]
    return model_or_params


def _canonical_optimizer(value) -> str:
    key = str(value).strip().lower()
    choices = optimizer_choices()
    if key not in choices:
        raise ValueError(f"--optimizer: unknown value {value!r}; accepted: {', '.join(dict.fromkeys(choices.values()))}")
    return choices[key]


def _hessian(args) -> str:
    value = getattr(args, "hessian", None)
    if value in (None, "none"):
        return "none"
    if value not in HESSIANS:
        raise ValueError(f"--hessian: unknown value {value!r}; accepted: {', '.join(HESSIANS)}")
    return value


def _unit(name: str, value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def build_optimizer(model_or_params, args) -> torch.optim.Optimizer:
    """Turn parsed command-line arguments (see `add_optimizer_args`) into an optimizer."""
    name = _canonical_optimizer(args.optimizer)
    params = _params_of(model_or_params)
    if getattr(args, "base_optimizer", None):
        if name != "HF":
            raise ValueError(f"--base-optimizer: MetaOptimize's base (--optimizer HF), not one of --optimizer "
                             f"{args.optimizer}")
        return _build_around(model_or_params, params, args)
    if name == "HF":
        try:
            return MetaOptimize(
                params,
                alg_base=args.alg_base, alg_meta=args.alg_meta, alpha0=alpha0_of(args),
                meta_stepsize=_unset(args.meta_stepsize), gamma=args.gamma, stepsize_groups=args.stepsize_groups,
                weight_decay_base=_unset(args.weight_decay_base), normalizer_param_base=_unset(args.normalizer_param_base),
                momentum_param_base=_unset(args.momentum_param_base), lion_beta2_base=_unset(args.Lion_beta2_base),
                weight_decay_meta=_unset(args.weight_decay_meta), normalizer_param_meta=_unset(args.normalizer_param_meta),
                momentum_param_meta=_unset(args.momentum_param_meta), lion_beta2_meta=_unset(args.Lion_beta2_meta),
                impl=getattr(args, "optimizer_impl", "auto"),
                state_dtype=STATE_DTYPES[getattr(args, "state_dtype", "param")],
                hessian=HESSIANS[_hessian(args)], rectify=getattr(args, "rectify", False),
            )
        except ValueError as err:
            raise ValueError(as_flags(str(err))) from None
    if _hessian(args) != "none":
        raise ValueError(f"--hessian {args.hessian}: a trace option of MetaOptimize (--optimizer HF), not of "
                         f"--optimizer {args.optimizer}")
    if name != "AdamW":
        return _baselines().build_baseline(name, params, args)
    # AdamW baseline: torch's fused AdamW; betas and weight decay from the base flags
    beta1, beta2 = _unset(args.momentum_param_base), _unset(args.normalizer_param_base)
    beta1 = _unit("--momentum-param-base", 0.9 if beta1 is None else beta1)
    beta2 = _unit("--normalizer-param-base", 0.999 if beta2 is None else beta2)
    wd = _unset(args.weight_decay_base)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if wd is not None and not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"--weight-decay-base must be a finite number >= 0, got {wd}")
    return torch.optim.AdamW(list(params), lr=args.lr, betas=(beta1, beta2), weight_decay=0.0 if wd is None else wd,
                             fused=True)


def alpha0_of(args) -> float:
    """--alpha0, or its default: 1e-6 for the built-in bases (the paper's), 1 around --base-optimizer."""
    if getattr(args, "alpha0", None) is not None:
        return args.alpha0
    return 1.0 if getattr(args, "base_optimizer", None) else 1e-6


def _json_object(flag: str, text) -> dict:
    if isinstance(text, dict):  # a namespace made in code
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag}: not valid JSON ({err.msg} at character {err.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a JSON object of keyword arguments, got {text!r}")
    return value


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


def _build_around(model_or_params, params, args) -> torch.optim.Optimizer:
    """MetaOptimize around --base-optimizer (one optimizer, or A for the 2-D weights and B for the rest)."""
    names = str(args.base_optimizer).split("+")
    if len(names) > 2 or not all(n.strip() for n in names):
        raise ValueError(f"--base-optimizer: {args.base_optimizer!r} is not NAME or A+B")
    classes = [base_optimizer_class(n) for n in names]
    kwargs = [_json_object("--base-args", getattr(args, "base_args", "{}")),
              _json_object("--base-args-rest", getattr(args, "base_args_rest", "{}"))]
    params = list(params)
    parts = [params] if len(classes) == 1 else [[p for p in params if p.dim() == 2],
                                                 [p for p in params if p.dim() != 2]]
    bases = []
    for cls, part, kw, flag in zip(classes, parts, kwargs, ("--base-args", "--base-args-rest")):
        if not part:
            continue  # A+B on a model with no tensor for one side
        try:
            bases.append(cls(part, **kw))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{flag}: {cls.__name__}: {err}") from None
    model = model_or_params if isinstance(model_or_params, torch.nn.Module) else None
    try:
        return MetaOptimize.around(
            bases if len(bases) > 1 else bases[0], alg_meta=args.alg_meta, alpha0=alpha0_of(args),
            meta_stepsize=_unset(args.meta_stepsize), gamma=args.gamma, stepsize_groups=args.stepsize_groups,
            weight_decay_meta=_unset(args.weight_decay_meta), normalizer_param_meta=_unset(args.normalizer_param_meta),
            momentum_param_meta=_unset(args.momentum_param_meta), lion_beta2_meta=_unset(args.Lion_beta2_meta),
            model=model)
    except ValueError as err:
        raise ValueError(as_flags(str(err))) from None


def check_optimizer_args(args) -> None:
    """Check the optimizer flags before any data or model is made; raises ValueError naming the flag.

    Builds the chosen optimizer on a dummy tensor, so every rule of the constructors applies;
    only the step-size group counts wait for the model (they must add up to its tensor count)."""
    spec = args.stepsize_groups
    if isinstance(spec, str) and spec.strip().lower() not in (*GROUP_KINDS, *NAMED_STEPSIZE_GROUPS):
        try:
            parse_counts(spec)  # a list of tensor counts: its syntax now, its sum once the model exists
        except ValueError as err:
            raise ValueError(as_flags(str(err))) from None
    check_hessian_args(args)
    if getattr(args, "base_optimizer", None) and _hessian(args) != "none":
        raise ValueError("--hessian: a trace option of MetaOptimize's built-in bases (--alg-base), not of "
                         "--base-optimizer (its trace is Hessian-free)")
    args.alpha0 = alpha0_of(args)  # resolved here, so config.json records the value the run uses
    dummy = argparse.Namespace(**{**vars(args), "stepsize_groups": "scalar", "optimizer_impl": "foreach"})
    if getattr(args, "rectify", False):  # its rule on the blocks (weight-wise) waits for the model
        dummy.stepsize_groups = "weightwise"
    dummy_params = [torch.nn.Parameter(torch.zeros(2))]
    if getattr(args, "base_optimizer", None):  # a matrix too: both sides of A+B get their arguments checked
        dummy_params.insert(0, torch.nn.Parameter(torch.zeros(2, 2)))
    build_optimizer(dummy_params, dummy)


def check_hessian_args(args) -> None:
    """--hessian needs the gradient's graph (backward(create_graph=True)) at the optimizer step: refuse
    the settings that cannot keep it, before any data or model is made."""
    hessian = _hessian(args)
    if hessian == "none":
        return
    if getattr(args, "amp", "none") == "fp16":
        raise ValueError(f"--hessian {hessian} does not work with --amp fp16: the gradient scaler unscales the "
                         "gradients in place, so the Hessian-vector product would be taken of the scaled ones; "
                         "use --amp bf16 or none")
    if getattr(args, "compile", False):
        raise ValueError(f"--hessian {hessian} does not work with --compile: torch.compile's autograd has no "
                         "double backward")
    if getattr(args, "fsdp", False):
        raise ValueError(f"--hessian {hessian} does not work with --fsdp: FSDP reduce-scatters and frees the "
                         "unsharded gradients in its backward hooks, so the second backward has no graph to use")


def needs_graph(optimizer) -> bool:
    """Whether the optimizer's step reads the gradient's graph (MetaOptimize with a Hessian trace): the
    backward pass must then be `loss.backward(create_graph=True)`."""
    while not hasattr(optimizer, "hessian") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return getattr(optimizer, "hessian", None) is not None


def build_scheduler(optimizer, args, total_steps: int):
    """Linear warm-up then cosine decay to 0 for the AdamW baseline; None for MetaOptimize."""
    if type(optimizer) is not torch.optim.AdamW:  # not subclasses: Mechanic wraps an AdamW subclass
        return None
    warmup = max(0, int(args.warmup_steps))
    total = max(int(total_steps), warmup + 1)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def current_step_sizes(optimizer) -> Tensor:
    """The step size(s) an optimizer is using now, as a 1-D tensor (one entry per block/group).

    MetaOptimize: lr alpha per block (device tensor, no sync; around a base: the base's lr alpha).
    Others: the lr of each param group.
    Looks through wrappers that keep the optimizer in `.optimizer` (accelerate, Lightning)."""
    while not hasattr(optimizer, "step_sizes") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if hasattr(optimizer, "effective_step_sizes") and hasattr(optimizer, "step_sizes"):
        return optimizer.effective_step_sizes()  # MetaOptimize around a base: lr alpha (step_sizes() is alpha)
    if hasattr(optimizer, "step_sizes"):
        return optimizer.step_sizes()
    if type(optimizer).__module__.split(".")[0] not in ("torch",):
        sizes = _baselines().effective_step_sizes(optimizer)
        if sizes is not None:
            return sizes
    return torch.tensor([float(g["lr"]) for g in optimizer.param_groups])


@contextlib.contextmanager
def eval_weights(optimizer):
    """Evaluate on the weights the optimizer means to be evaluated.

    Optimizers with `train()`/`eval()` methods (schedule-free, iterate averaging) are switched to
    eval mode inside the block and back afterwards; others are untouched."""
    switch = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if switch:
        optimizer.eval()
    try:
        yield
    finally:
        if switch:
            optimizer.train()
