"""Learning-rate-free baselines of the paper (DoG, Prodigy, Mechanic, gdtuo, ...).

Extension points used by common/optimizers.py:
- BASELINES: --optimizer value -> builder(params, args) -> optimizer
- add_baseline_args(parser): flags for the baselines' own knobs
- build_baseline(name, params, args)
- effective_step_sizes(optimizer): 1-D tensor of the step size(s) in use, or None
"""

from __future__ import annotations

BASELINES: dict = {}


def add_baseline_args(parser):
    return parser


def build_baseline(name, params, args):
    return BASELINES[name](params, args)


def effective_step_sizes(optimizer):
    return None
