"""Command-line glue shared by the l2o scripts: the network flags, the optimizee choice and its data."""

from __future__ import annotations

import argparse
import inspect
import math

from l2o.data import load_dataset, resolve_dataset
from l2o.networks import NETWORKS
from l2o.problems import PROBLEMS
from l2o.tasks import OPTIMIZEES

# flag -> the network constructor's keyword; None means "the network's own default"
NETWORK_FLAGS = {"hidden_size": "hidden units of the LSTM cells (default 20)",
                 "output_scale": "update = output-scale * network output (lstm: 0.1, rnnprop: 0.01 after tanh)",
                 "preproc_p": "lstm: [p] of the gradient preprocessing (default 10)",
                 "beta1": "rnnprop: decay of the first moment (default 0.95)",
                 "beta2": "rnnprop: decay of the second moment (default 0.95)"}
DEFAULT_OPTIMIZEE = "relu"


def add_network_args(parser: argparse.ArgumentParser, default: str = "lstm") -> None:
    g = parser.add_argument_group("network")
    g.add_argument("--network", default=default, choices=sorted(NETWORKS), help="learned-optimizer network")
    for name, text in NETWORK_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=int if name == "hidden_size" else float, default=None,
                       help=text)


def network_config(parser: argparse.ArgumentParser, args) -> dict:
    """The constructor keywords of --network from the flags given; a flag it does not take is an error."""
    accepted = inspect.signature(NETWORKS[args.network]).parameters
    config = {}
    for name in NETWORK_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        if name not in accepted:
            parser.error(f"{flag}: the {args.network} network has no such setting")
        if not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} must be a positive number, got {value}")
        config[name] = value
    return config


def add_optimizee_args(group, problems_help: str = "") -> None:
    group.add_argument("--optimizee", default=None, choices=list(OPTIMIZEES),
                       help=f"MLP trained by the optimizer (default {DEFAULT_OPTIMIZEE})")
    group.add_argument("--problem", default=None, choices=list(PROBLEMS),
                       help="a synthetic problem family of M-L2O instead of an MLP " + problems_help)


def check_optimizee_args(parser: argparse.ArgumentParser, args) -> None:
    """--optimizee or --problem, not both; the MLP default when neither is given."""
    if args.problem is not None and args.optimizee is not None:
        parser.error(f"--problem {args.problem} and --optimizee {args.optimizee}: choose one")
    if args.problem is None and args.optimizee is None:
        args.optimizee = DEFAULT_OPTIMIZEE


def load_optimizee_data(args, device):
    """The data set of the MLP optimizees (--data, recorded in config.json as `dataset`); None with --problem."""
    if args.problem is not None:
        return None
    args.dataset = resolve_dataset(args.data, args.data_dir)
    return load_dataset(args.dataset, args.data_dir, download=not args.no_download, device=device,
                        batch_size=args.batch_size)
