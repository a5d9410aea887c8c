"""The paper's figures and tables: the sweep files against the paper's configurations, the index
scripts/paper.py, and the figure kinds of scripts/plot.py drawn from generated run folders.

The tables below are written from the paper (Appendix C's Tables 2-5, the text of sections 7.1-7.2
and the baselines' protocols; spec section 7), not from the sweep files: a sweep file that drifts
from the paper fails here.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sweep = _load("sweep")

# ---- the paper's configurations -------------------------------------------------------------

# optimizer flags compared run by run (a flag a run does not set is None)
BASE_KEYS = ("optimizer", "alg-base", "alg-meta", "alpha0", "momentum-param-base", "normalizer-param-base",
             "weight-decay-base", "Lion-beta2-base", "momentum-param-meta", "normalizer-param-meta",
             "Lion-beta2-meta", "lr", "warmup-steps")
LR_FREE_KEYS = ("optimizer", "dog-reps-rel", "mechanic-base", "mechanic-s-init", "gdtuo-base", "gdtuo-hyper")

# base updates: (rho, lambda, kappa, c) of Table 2
ADAMW = {"alg-base": "AdamW", "momentum-param-base": 0.9, "normalizer-param-base": 0.999, "weight-decay-base": 0.1}
LION = {"alg-base": "Lion", "momentum-param-base": 0.99, "weight-decay-base": 0.1, "Lion-beta2-base": 0.9}
RMSPROP = {"alg-base": "RMSProp", "normalizer-param-base": 0.999, "weight-decay-base": 0.1}
SGDM = {"alg-base": "SGDm", "momentum-param-base": 0.9, "weight-decay-base": 0.1}
# meta updates: (rho_bar, lambda_bar, c_bar)
ADAM_META = {"alg-meta": "Adam", "momentum-param-meta": 0.9, "normalizer-param-meta": 0.999}
LION_META = {"alg-meta": "Lion", "momentum-param-meta": 0.99, "Lion-beta2-meta": 0.9}
FIXED = {"alg-meta": "fixed"}
STEPS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]  # the fixed-step grid of Appendix C


def hf(base, meta, alpha0, groups=("scalar",)):
    """MetaOptimize rows: one per step-size grouping (None for a fixed step)."""
    row = {"optimizer": "HF", **base, **meta, "alpha0": alpha0}
    return [(row, None if meta is FIXED else g) for g in groups]


def cosine(warmup, peaks):
    return [({"optimizer": "AdamW", "warmup-steps": warmup, "momentum-param-base": 0.9,
              "normalizer-param-base": 0.999, "weight-decay-base": 0.1, "lr": lr}, None) for lr in peaks]


def fixed_grid(*bases):
    return [row for base in bases for a in STEPS for row in hf(base, FIXED, a)]


def lr_free():
    """Figure 5/6 protocols: DoG's r_eps grid, Prodigy's defaults, Mechanic on SGDm/Lion/Adam with the
    package's s_init and with MetaOptimize's alpha0 (1e-6), gdtuo with Adam at both levels."""
    rows = [{"optimizer": "DoG", "dog-reps-rel": r} for r in (1e-9, 1e-8, 1e-7, 1e-6)]
    rows += [{"optimizer": "Prodigy"}]
    rows += [{"optimizer": "Mechanic", "mechanic-base": b, "mechanic-s-init": s}
             for b in ("SGDm", "Lion", "Adam") for s in (1e-8, 1e-6)]
    rows += [{"optimizer": "gdtuo", "gdtuo-base": "Adam", "gdtuo-hyper": "Adam"}]
    return [(r, None) for r in rows]


BLOCKS = ("scalar", "resnet18_blocks")
# sweep file -> (rows, seeds, flags every run has)
PAPER = {
    # Figure 1, Table 2: four combinations, scalar and blockwise, against their tuned fixed steps
    "cifar10_combinations": (
        hf(ADAMW, FIXED, 1e-5) + hf(ADAMW, ADAM_META, 1e-6, BLOCKS)
        + hf(LION, FIXED, 1e-4) + hf(LION, LION_META, 1e-6, BLOCKS)
        + hf(RMSPROP, FIXED, 1e-5) + hf(RMSPROP, ADAM_META, 1e-6, BLOCKS)
        + hf(SGDM, FIXED, 1e-3) + hf(SGDM, ADAM_META, 1e-6, BLOCKS),
        3, {"num-epochs": 60, "batch-size": 100}),
    # Figure 2: (Lion, Lion) scalar from alpha0 1e-9
    "cifar10_alpha0": ([r for a in (1e-9, 1e-8, 1e-7, 1e-6) for r in hf(LION, LION_META, a)],
                       3, {"num-epochs": 60, "batch-size": 100}),
    "cifar10_baselines": (fixed_grid(ADAMW, LION, RMSPROP, SGDM), 3, {"num-epochs": 60, "batch-size": 100}),
    # Figure 4, Table 3
    "imagenet": (hf(ADAMW, FIXED, 1e-5) + hf(ADAMW, LION_META, 1e-6, BLOCKS) + hf(LION, FIXED, 1e-5)
                 + hf(LION, LION_META, 1e-6, BLOCKS) + hf(SGDM, LION_META, 1e-5) + cosine(10000, [1e-5, 1e-4, 1e-3]),
                 1, {"epochs": 90, "batch-size": 256}),
    "imagenet_baselines": (fixed_grid(ADAMW, LION), 1, {"epochs": 90, "batch-size": 256}),
    "imagenet_lr_free": (lr_free(), 1, {"epochs": 90, "batch-size": 256}),
    # Figure 6, Table 5: the text's (AdamW, Lion) and the table's (AdamW, Adam)
    "tinystories": (hf(ADAMW, FIXED, 1e-5) + hf(ADAMW, LION_META, 1e-6) + hf(ADAMW, ADAM_META, 1e-6)
                    + hf(LION, FIXED, 1e-4) + hf(LION, LION_META, 1e-6) + cosine(1000, [1e-5, 1e-4, 1e-3]),
                    1, {"max-iters": 30000, "batch-size": 128, "seq-len": 256, "dim": 288, "n-layers": 6,
                        "n-heads": 6}),
    "tinystories_baselines": (fixed_grid(ADAMW, LION), 1, {"max-iters": 30000, "batch-size": 128, "seq-len": 256}),
    "tinystories_lr_free": (lr_free(), 1, {"max-iters": 30000, "batch-size": 128, "seq-len": 256}),
    # Figure 7: 10 tasks, batch 1, 5 seeds
    "continual_cifar100": (hf(ADAMW, FIXED, 1e-4) + hf(ADAMW, ADAM_META, 1e-4, ("scalar", "last_layer_and_others")),
                           5, {"batch-size": 1, "classes-per-task": 10, "epochs-per-task": 1}),
    "continual_cifar100_baselines": (fixed_grid(ADAMW), 5, {"batch-size": 1, "classes-per-task": 10}),
}
SWEEP_FILES = {p.stem: p for p in sorted((SCRIPTS / "sweeps").glob("*.yaml"))}


def test_every_sweep_file_is_in_the_table():
    assert set(SWEEP_FILES) == set(PAPER)


def _canonical(flags: dict, keys) -> tuple:
    return tuple((k, flags.get(k)) for k in keys)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_sweep_file_expands_to_the_papers_runs(name):
    rows, seeds, shared = PAPER[name]
    s = sweep.read_sweep(SWEEP_FILES[name])
    assert s.seeds == list(range(seeds))
    assert len(s.jobs) == len(rows) * seeds  # no run more, none fewer
    keys = LR_FREE_KEYS if name.endswith("_lr_free") else BASE_KEYS
    expected = sorted(repr((_canonical(r, keys), g)) for r, g in rows for _ in range(seeds))
    got = []
    for job in s.jobs:
        f = job.flags
        meta = f.get("alg-meta")
        groups = None if f.get("optimizer") != "HF" or meta == "fixed" else f.get("stepsize-groups", "scalar")
        got.append(repr((_canonical(f, keys), groups)))
        for k, v in shared.items():
            assert f.get(k) == v, (job.run_name, k)
        if f.get("optimizer") == "HF" and meta != "fixed":  # eta 1e-3 everywhere; gamma 1 but continual's .999
            assert f.get("meta-stepsize") == 1e-3, job.run_name
            assert f.get("gamma") == (0.999 if name == "continual_cifar100" else 1.0), job.run_name
    assert sorted(got) == expected
