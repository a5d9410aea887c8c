"""MetaOptimize: step-size optimisation wrapped around a first-order base update.

    from common.optimizers import MetaOptimize
    opt = MetaOptimize(model.parameters(), alg_base="AdamW", alg_meta="Lion", alpha0=1e-6)
    opt = MetaOptimize.around(torch.optim.AdamW(model.parameters(), lr=1e-3))  # any torch optimizer

`around` (spec section 10) runs the base optimizer's own step and scales the change it makes.

Layout (as torch.optim and schedule_free): `rules` states each update rule once; `kernels` traces
the per-tensor step from the rules and turns it into code; `impl` holds the step implementations
side by side ("fused", "foreach") with one signature and one state form; `metaoptimize` is the
thin optimizer class; `reference` a plain float64 statement of the spec that the tests hold every
implementation against; `packaged` the authors' pip class; `around` MetaOptimize around any torch
optimizer. The maths: ../shared/spec/metaoptimize.md.
"""

from .around import MetaOptimizeAround
from .blocks import GROUP_KINDS, NAMED_STEPSIZE_GROUPS, resolve_stepsize_groups
from .metaoptimize import BASE_ALGS, META_ALGS, MetaOptimize
from .packaged import MetaOptimize_AdamW_Lion_hg
from .rules import BASE_RULES, EPS, META_RULES

__all__ = [
    "BASE_ALGS",
    "BASE_RULES",
    "EPS",
    "GROUP_KINDS",
    "META_ALGS",
    "META_RULES",
    "NAMED_STEPSIZE_GROUPS",
    "MetaOptimize",
    "MetaOptimizeAround",
    "MetaOptimize_AdamW_Lion_hg",
    "resolve_stepsize_groups",
]
