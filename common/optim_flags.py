"""The optimizer flags of every train.py, turned into a spec (`common.specs`, the registry that
builds the optimizers).

It sits above `common.optimizers` (which knows nothing of flags) and `common.baselines`; the
optimizer's argument names in its errors become the flags a user typed (`specs.as_flags`).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from common import baselines, specs
from common.specs import (
    HESSIANS,
    OPTIMIZER_CHOICES,
    STATE_DTYPES,
    as_flags,
    optimizer_choices,
    spec_from_args,
)

__all__ = ["add_optimizer_args", "as_flags", "build_optimizer", "build_scheduler", "check_optimizer_args",
           "eval_weights", "needs_graph", "optimizer_choices", "spec_from_args",
           "HESSIANS", "OPTIMIZER_CHOICES", "STATE_DTYPES"]


def add_optimizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The paper's optimizer flags. -1 means "unset", as in the paper's scripts."""
    g = parser.add_argument_group("optimizer (paper symbols in brackets; -1 = unset)")
    g.add_argument("--optimizer", default="HF",
                   help="HF = MetaOptimize (Hessian-free); AdamW = torch AdamW with linear warmup and cosine decay"
                        "; or a learning-rate-free baseline: " + ", ".join(baselines.BASELINES))
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
    baselines.add_baseline_args(parser)
    return parser


def build_optimizer(model_or_params, args) -> torch.optim.Optimizer:
    """Parsed command-line arguments (see `add_optimizer_args`) into an optimizer, through their spec."""
    return specs.build_optimizer(model_or_params, spec_from_args(args))


def check_optimizer_args(args) -> dict:
    """Check the optimizer flags before any data or model is made (ValueError naming the flag);
    returns their resolved spec, which is also set as `args.optimizer_spec` (config.json records it).

    The checks run once per namespace: again only if its optimizer flags changed since."""
    spec = spec_from_args(args)
    check_hessian_args(args)
    if getattr(args, "optimizer_spec", None) != spec:
        spec = specs.resolve_spec(spec)
    # alpha0 resolved here, so config.json records the value the run uses (the baselines, which have
    # none, keep recording 1e-6 as before)
    if hasattr(args, "alpha0"):
        args.alpha0 = spec.get("alpha0", 1e-6 if args.alpha0 is None else args.alpha0)
    args.optimizer_spec = spec
    return spec


def check_hessian_args(args) -> None:
    """--hessian needs the gradient's graph (backward(create_graph=True)) at the optimizer step: refuse
    the settings that cannot keep it, before any data or model is made."""
    hessian = getattr(args, "hessian", None) or "none"
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
    """Linear warm-up then cosine decay to 0 for the AdamW baseline; None for MetaOptimize (`specs.build_scheduler`)."""
    return specs.build_scheduler(optimizer, spec_from_args(args), total_steps)


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
