#!/usr/bin/env python3
"""The paper's figures from run folders (PNG and PDF).

    python scripts/plot.py outputs/cifar10_combinations outputs/cifar10_baselines --out figures/
    python scripts/plot.py outputs/continual_cifar100 --out figures/ --formats png
    python scripts/plot.py outputs/cifar10_combinations --kind base-panels --name figure1_cifar10 --out figures/
    python scripts/paper.py                  # which command rebuilds which figure of the paper

Without --kind (auto), it draws every figure the runs support. Per experiment (config.json
"experiment"), one line per configuration (mean over its seeds, shaded +- std; configurations as in
summarize.py):
- <exp>_test_acc, <exp>_val_loss, <exp>_train_loss: the metric against epochs (iterations when the
  runs log no epoch), one line per method;
- <exp>_step_sizes_<method>: the step size of every block against steps, log scale, for each
  configuration whose step sizes move;
- <exp>_alpha0_<metric>: the final test accuracy (or validation loss) against alpha0, log scale,
  one line per method that was run with several alpha0;
- <exp>_online_acc: the accumulated online accuracy of the continual task against steps, with the
  task switches marked; <exp>_task_test_acc: its test accuracy at the end of each task;
- <exp>_top1_top5: top-1 and top-5 accuracy, test and training (runs that log test/acc5: ImageNet).

With --kind, it draws one figure, named --name, from the runs chosen by --where (and --best-over):
- curves: the metric against epochs/iterations, one line per configuration (Figures 4, 5, 6, 11);
- base-panels: one panel per base update, each with its fixed step and MetaOptimize variants (Figure 1);
- block-panels: one panel per step-size block, one line per configuration (Figure 8);
- step-sizes: every block's step size on one axis, per configuration (Figure 3);
- alpha0: the metric per alpha0, the final metric against alpha0 and the step-size trajectories,
  fixed-step runs as references (Figure 2);
- task-end: accumulated online accuracy and the test accuracy at the end of each task (Figure 7);
- top1-top5: top-1 and top-5 accuracy, test solid and training dashed (Figure 9).
- l2o_*: the learned-optimizer figures (scripts/plot_l2o.py) for runs of l2o/evaluate.py and l2o/meta_train.py,
  instead of the figures above (the paper of Sobotka et al., Figures 4, 5, 7, 8, 9).
- idbd_*: Sutton's (1992) tracking task (scripts/plot_idbd.py) for runs of idbd/train.py, instead of the
  figures above: asymptotic error against the step-size parameter (his Figure 3) and the step sizes of
  relevant and irrelevant inputs (his Figure 4); --kind idbd-error and idbd-step-sizes draw one of them.
plot_data.json in the output folder holds the numbers behind every figure and the runs they come from.
Diverged runs (as summarize.py tells them) are left out of the means: each is drawn on its own as a
dashed line up to its divergence, ending in an x, and the legend says how many diverged.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common`
import plot_idbd  # noqa: E402  (Sutton's tracking task, experiment idbd)
import plot_l2o  # noqa: E402  (the learned-optimizer figures, experiments l2o_eval and l2o_meta)
from plotting import (  # noqa: E402  (the helpers the figure makers share)
    DPI,
    add_curve,
    diverged_note,
    figure,
    label_keys,
    mean_curve,
    panel_grid,
    series_record,
    slug,
    value_text,
    x_key,
)
from summarize import (  # noqa: E402  (scripts/ is not a package)
    ArgParser,
    InputError,
    Run,
    final_value,
    find_run_dirs,
    group_runs,
    load_run,
    load_wandb_runs,
    varying_keys,
)

# metrics drawn against epochs/iterations, with their axis labels
CURVE_METRICS = {"test/acc": "test accuracy (%)", "val/loss": "validation loss", "train/loss": "training loss"}
# the metric of the alpha0 robustness figure: the first of these the runs have
ROBUSTNESS_METRICS = ["test/acc", "val/loss", "online/acc", "train/loss"]
FORMATS = ("png", "pdf")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


# --------------------------------------------------------------------------------------
# Labels and averaging over seeds
# --------------------------------------------------------------------------------------


def _specs():
    """common.specs (which flags belong to which optimizer), imported at first use: it imports torch,
    and the scripts' imports stay torch-free (a login node, `sweep.py`'s start-up)."""
    from common import specs

    return specs


def _optimizer_options(config: dict) -> set[str] | None:
    """The keys of a run's config.json that belong to its optimizer: those of its spec (common/specs.py,
    from the flags it records; the recorded `optimizer_spec` is that same spec). None when the config is
    not one the registry can read (another --optimizer): then every key counts."""
    try:
        return set(_specs().spec_from_args(argparse.Namespace(**config)))
    except (ValueError, TypeError):
        return None


def _relevant(key: str, own: set[str] | None) -> bool:
    """Whether a config key means something for the run (config.json holds every flag): an option of
    its optimizer, or no optimizer's option at all."""
    return own is None or key in own or not _specs().is_option(key)


def method_label(config: dict, keys: list[str]) -> str:
    """A short name for a configuration, e.g. "AdamW+Adam resnet18_blocks" or "Lion fixed α=1e-4"."""
    optimizer = str(config.get("optimizer", "")).lower()
    own = _optimizer_options(config)
    keys = [k for k in keys if _relevant(k, own)]
    parts = []
    covered = {"optimizer"}
    if optimizer in ("hf", "metaoptimize") and "alg_base" in config:
        base, meta = config.get("alg_base"), config.get("alg_meta")
        covered |= {"alg_base", "alg_meta"}
        if str(meta).lower() == "fixed":
            alpha = config.get("alpha0")
            parts.append(f"{base} fixed" + (f" α={value_text(alpha)}" if alpha is not None else ""))
            covered |= {"alpha0", "stepsize_groups"}
        else:
            parts.append(f"{base}+{meta}")
    elif optimizer == "adamw" and "lr" in config:
        parts.append(f"AdamW cosine lr={value_text(config['lr'])}")
        covered |= {"lr", "alpha0", "alg_base", "alg_meta", "stepsize_groups"}
    elif optimizer:
        parts.append(str(config["optimizer"]))
        covered |= {"alpha0", "alg_base", "alg_meta", "stepsize_groups"}
    for k in keys:
        if k in covered:
            continue
        if k == "stepsize_groups":
            parts.append(str(config.get(k)))
        elif k == "alpha0":
            parts.append(f"α0={value_text(config.get(k))}")
        else:
            parts.append(f"{k}={value_text(config.get(k))}")
    return " ".join(parts) or "all runs"


def _add_config_curves(ax, data: dict, groups, keys, metric: str, x: str) -> None:
    """One curve per configuration: its runs (seeds) that did not diverge averaged; each diverged
    run dashed on its own, up to its divergence (an x)."""
    for config, members in groups:
        label = method_label(config, keys) + diverged_note(members)
        curve = mean_curve([r for r in members if not r.diverged], metric, x)
        if curve is not None:
            add_curve(ax, data, label, curve)
        for run in (r for r in members if r.diverged):
            xs, ys = run.series(metric, x)
            keep = [(a, b) for a, b in zip(xs, ys) if math.isfinite(b)]
            if keep:
                (line,) = ax.plot(*zip(*keep), linestyle="--", linewidth=0.8, alpha=0.7,
                                  label=None if curve is not None else label)
                ax.plot(*keep[-1], marker="x", color=line.get_color(), markersize=7)
                data["series"].append({"label": f"{label}: {run.name}", "runs": [run.name], "diverged": True,
                                       "x": [a for a, _ in keep], "mean": [b for _, b in keep],
                                       "std": [0.0] * len(keep)})


# --------------------------------------------------------------------------------------
# Figures (each returns {name: (figure, data)})
# --------------------------------------------------------------------------------------


def curve_figures(exp: str, groups, keys) -> dict:
    out = {}
    for metric, ylabel in CURVE_METRICS.items():
        runs = [r for _, members in groups for r in members]
        if not any(run.series(metric)[0] for run in runs):
            continue
        x = x_key(runs, metric)
        fig, ax = figure(f"{exp}: {ylabel}", "epoch" if x == "epoch" else "iteration", ylabel)
        data = {"kind": "curve", "metric": metric, "x": x, "series": []}
        _add_config_curves(ax, data, groups, keys, metric, x)
        ax.legend(fontsize=7)
        out[f"{exp}_{metric.replace('/', '_')}"] = (fig, data)
    return out


def _block_order(key: str):
    m = re.search(r"(\d+)$", key)
    return (0, int(m.group(1))) if m else (1, key)


def step_size_figures(exp: str, groups, keys) -> dict:
    out = {}
    for config, members in groups:
        blocks = sorted({k for run in members for r in run.metrics for k in r if k.startswith("step_size/")},
                        key=_block_order)
        values = [v for run in members for r in run.metrics for k in blocks if (v := r.get(k)) is not None]
        if not blocks or len(set(values)) < 2:  # nothing logged, or fixed step sizes
            continue
        label = method_label(config, keys) + diverged_note(members)
        kept = [r for r in members if not r.diverged]  # a diverged run's step sizes stay out of the mean
        fig, ax = figure(f"{exp}: step sizes, {label}", "iteration", "step size")
        data = {"kind": "step_sizes", "config": label, "x": "step", "series": [],
                "diverged_left_out": len(members) - len(kept)}
        for block in blocks:
            curve = mean_curve(kept, block, "step")
            if curve is None or np.any(curve[1] <= 0):
                continue
            add_curve(ax, data, block.removeprefix("step_size/").replace("block_", "block "), curve)
        if not data["series"]:
            import matplotlib.pyplot as plt

            plt.close(fig)
            continue
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
        out[f"{exp}_step_sizes_{slug(label)}"] = (fig, data)
    return out


def robustness_figures(exp: str, groups, keys) -> dict:
    metric = next((m for m in ROBUSTNESS_METRICS if any(final_value(r, m) is not None
                                                          for _, members in groups for r in members)), None)
    if metric is None or "alpha0" not in keys:
        return {}
    others = [k for k in keys if k != "alpha0"]
    lines: dict[str, list] = {}
    for config, members in groups:
        alpha0 = config.get("alpha0")
        if not isinstance(alpha0, (int, float)) or alpha0 <= 0:
            continue
        finals = [v for r in members if not r.diverged and (v := final_value(r, metric)) is not None]
        if finals:
            label = method_label({k: v for k, v in config.items() if k != "alpha0"} | {"alpha0": None}, others)
            lines.setdefault(label, []).append((float(alpha0), finals, members))
    lines = {label: sorted(points, key=lambda p: p[0]) for label, points in lines.items() if len(points) >= 2}
    if not lines:
        return {}
    ylabel = CURVE_METRICS.get(metric, metric)
    fig, ax = figure(f"{exp}: final {ylabel} against initial step size", "α0 (initial step size)", f"final {ylabel}")
    data = {"kind": "alpha0", "metric": metric, "x": "alpha0", "series": []}
    _add_alpha0_points(ax, data, lines)
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    return {f"{exp}_alpha0_{metric.replace('/', '_')}": (fig, data)}


def _add_alpha0_points(ax, data: dict, lines: dict) -> None:
    """Final metric against alpha0, one line per method: {label: [(alpha0, final values, runs)]}."""
    for label, points in lines.items():
        grid = np.array([p[0] for p in points])
        mean = np.array([np.mean(p[1]) for p in points])
        std = np.array([np.std(p[1], ddof=1) if len(p[1]) > 1 else 0.0 for p in points])
        ax.errorbar(grid, mean, yerr=std, label=label, marker="o", markersize=4, capsize=3)
        record = series_record(label, grid, mean, std, [r for p in points for r in p[2]])
        record["diverged"] = [sum(r.diverged for r in p[2]) for p in points]  # left out of each point
        data["series"].append(record)
        for x, y, p in zip(grid, mean, points):
            if note := diverged_note(p[2]):
                ax.annotate(note.strip(" ()"), (x, y), textcoords="offset points", xytext=(0, 6), fontsize=6,
                            ha="center")


def task_switches(runs: list[Run]) -> list[float]:
    """Steps at which the task changes: the last logged step of every task but the last."""
    ends: dict[int, float] = {}
    for run in runs:
        for r in run.metrics:
            if isinstance(r.get("task"), int) and "step" in r:
                ends[r["task"]] = max(ends.get(r["task"], -math.inf), float(r["step"]))
    return [ends[t] for t in sorted(ends)[:-1]]


def continual_figures(exp: str, groups, keys) -> dict:
    runs = [r for _, members in groups for r in members]
    if not any(run.series("online/acc")[0] for run in runs):
        return {}
    fig, ax = figure(f"{exp}: accumulated online accuracy", "step", "online accuracy (%)")
    switches = task_switches(runs)
    for i, s in enumerate(switches):
        ax.axvline(s, color="gray", linestyle="--", linewidth=0.8, alpha=0.6, label="task switch" if i == 0 else None)
    data = {"kind": "online_acc", "metric": "online/acc", "x": "step", "task_switches": switches, "series": []}
    _add_config_curves(ax, data, groups, keys, "online/acc", "step")
    ax.legend(fontsize=7)
    return {f"{exp}_online_acc": (fig, data)}


def _has_task_end(groups) -> bool:
    return any(run.series("task/test_acc", "task")[0] for _, members in groups for run in members)


def _add_task_end_curves(ax, data: dict, groups, keys) -> None:
    """Test accuracy on the current task's classes at the end of each task, per configuration (tasks 1..N)."""
    for config, members in groups:
        curve = mean_curve(members, "task/test_acc", "task")
        if curve is not None:
            grid, mean, std, used = curve
            add_curve(ax, data, method_label(config, keys), (grid + 1, mean, std, used))
    ax.xaxis.get_major_locator().set_params(integer=True)


def task_end_figures(exp: str, groups, keys) -> dict:
    if not _has_task_end(groups):
        return {}
    fig, ax = figure(f"{exp}: test accuracy at the end of each task", "task", "test accuracy (%)")
    data = {"kind": "task_end", "metric": "task/test_acc", "x": "task", "series": []}
    _add_task_end_curves(ax, data, groups, keys)
    ax.legend(fontsize=7)
    return {f"{exp}_task_test_acc": (fig, data)}


# --------------------------------------------------------------------------------------
# The paper's figures (--kind): one named figure from chosen runs, often several panels
# --------------------------------------------------------------------------------------

KINDS = ("auto", "curves", "base-panels", "block-panels", "step-sizes", "alpha0", "task-end", "top1-top5",
         *plot_idbd.KIND_MAKERS)
# the metric a figure shows when --metric is not given: the first of these the runs logged
DEFAULT_METRICS = ["test/acc", "val/loss", "online/acc", "train/loss"]


def _metric(runs: list[Run], metric: str | None) -> str:
    if metric:
        if not any(run.series(metric)[0] for run in runs):
            raise InputError(f"--metric {metric}: none of the {len(runs)} runs logged it")
        return metric
    for m in DEFAULT_METRICS:
        if any(run.series(m)[0] for run in runs):
            return m
    raise InputError(f"the runs logged none of {', '.join(DEFAULT_METRICS)}; choose one with --metric")


def _is_fixed(config: dict) -> bool:
    return str(config.get("alg_meta", "")).lower() == "fixed" or str(config.get("optimizer", "hf")).lower() != "hf"


def _block_keys(groups) -> list[str]:
    return sorted({k for _, members in groups for run in members for r in run.metrics for k in r
                   if k.startswith("step_size/")}, key=_block_order)


def _moves(members: list[Run], key: str) -> bool:
    return len({r[key] for run in members for r in run.metrics if key in r}) > 1


def kind_curves(name, groups, keys, metric) -> dict:
    """One axis: the metric against epochs/iterations, one line per configuration (Figures 4, 5, 6)."""
    runs = [r for _, members in groups for r in members]
    x = x_key(runs, metric)
    ylabel = CURVE_METRICS.get(metric, metric)
    fig, ax = figure(name, "epoch" if x == "epoch" else "iteration", ylabel)
    if len(groups) > 10:  # the default cycle has 10 colors
        import matplotlib.pyplot as plt

        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    data = {"kind": "curves", "metric": metric, "x": x, "series": []}
    _add_config_curves(ax, data, groups, keys, metric, x)
    ax.legend(fontsize=7)
    return {name: (fig, data)}


def kind_base_panels(name, groups, keys, metric) -> dict:
    """One panel per base update (Figure 1): in each, its fixed step and its MetaOptimize variants.
    Runs of other optimizers (no base update) get a panel of their own."""
    panels: dict[str, list] = {}
    for config, members in groups:
        hf = str(config.get("optimizer", "HF")).lower() == "hf"
        panels.setdefault(str(config.get("alg_base")) if hf else "other optimizers", []).append((config, members))
    runs = [r for _, members in groups for r in members]
    x = x_key(runs, metric)
    ylabel = CURVE_METRICS.get(metric, metric)
    fig, axes = panel_grid(len(panels), name)
    data = {"kind": "base_panels", "metric": metric, "x": x, "panels": []}
    for ax, (base, members) in zip(axes, panels.items()):
        panel = {"title": base, "series": []}
        ax.set_title(base if base == "other optimizers" else f"{base} base", fontsize=9)
        ax.set_xlabel("epoch" if x == "epoch" else "iteration")
        _add_config_curves(ax, panel, members, [k for k in keys if k != "alg_base"], metric, x)
        ax.legend(fontsize=6)
        data["panels"].append(panel)
    axes[0].set_ylabel(ylabel)
    return {name: (fig, data)}


def kind_block_panels(name, groups, keys, metric=None) -> dict:
    """One panel per step-size block (Figure 8), one line per configuration whose blocks move."""
    blocks = [b for b in _block_keys(groups) if b.startswith("step_size/block_")]
    chosen = [(c, m) for c, m in groups if sum(any(b in r for run in m for r in run.metrics) for b in blocks) > 1
              and any(_moves(m, b) for b in blocks)]
    if not chosen:
        raise InputError("--kind block-panels: no configuration logged moving step sizes of several blocks")
    blocks = [b for b in blocks if any(b in r for _, m in chosen for run in m for r in run.metrics)]
    fig, axes = panel_grid(len(blocks), name, ncols=min(len(blocks), 3))
    data = {"kind": "block_panels", "x": "step", "panels": []}
    for ax, block in zip(axes, blocks):
        panel = {"title": block.removeprefix("step_size/").replace("_", " "), "series": []}
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel("iteration")
        for config, members in chosen:
            curve = mean_curve([r for r in members if not r.diverged], block, "step")
            if curve is not None and np.all(curve[1] > 0):
                add_curve(ax, panel, method_label(config, keys) + diverged_note(members), curve)
        ax.set_yscale("log")
        data["panels"].append(panel)
    axes[0].set_ylabel("step size")
    axes[0].legend(fontsize=6)
    return {name: (fig, data)}


def kind_step_sizes(name, groups, keys, metric=None) -> dict:
    """Every block's step size of each configuration on one axis (Figure 3), one figure per configuration."""
    figures = step_size_figures(name, groups, keys)
    if not figures:
        raise InputError("--kind step-sizes: no configuration logged moving step sizes")
    if len(figures) == 1:
        return {name: next(iter(figures.values()))}
    return {f"{name}_{k.removeprefix(name + '_step_sizes_')}": v for k, v in figures.items()}


def kind_alpha0(name, groups, keys, metric) -> dict:
    """Robustness to the initial step size (Figure 2): the metric against epochs per alpha0, the final
    metric against alpha0, and the learned step size against steps per alpha0. Fixed-step runs are
    drawn as references (dashed, and a horizontal line in the middle panel)."""
    moving = [(c, m) for c, m in groups if not _is_fixed(c) and isinstance(c.get("alpha0"), (int, float))]
    if len({c["alpha0"] for c, _ in moving}) < 2:
        raise InputError("--kind alpha0: needs MetaOptimize runs with at least two alpha0 values")
    moving.sort(key=lambda g: g[0]["alpha0"])
    references = [(c, m) for c, m in groups if _is_fixed(c)]
    runs = [r for _, members in groups for r in members]
    x = x_key(runs, metric)
    ylabel = CURVE_METRICS.get(metric, metric)
    fig, (ax_curve, ax_final, ax_step) = panel_grid(3, name, ncols=3, sharey=False)
    data = {"kind": "alpha0", "metric": metric, "x": x, "panels": []}
    import matplotlib.pyplot as plt

    colors = plt.cm.viridis(np.linspace(0, 0.9, len(moving)))
    other = [k for k in keys if k != "alpha0"]
    curves = {"title": f"{ylabel} per α0", "series": []}
    steps = {"title": "step size per α0", "series": []}
    finals = {"title": f"final {ylabel} against α0", "series": []}
    for (config, members), color in zip(moving, colors):
        label = f"α0={value_text(config['alpha0'])}"
        if len(other) and len({method_label(c, other) for c, _ in moving}) > 1:
            label = f"{method_label(config, other)} {label}"
        curve = mean_curve(members, metric, x)
        if curve is not None:
            add_curve(ax_curve, curves, label, curve, color=color)
        block = next((b for b in _block_keys([(config, members)]) if _moves(members, b)), None)
        if block is not None:
            curve = mean_curve(members, block, "step")
            if curve is not None and np.all(curve[1] > 0):
                add_curve(ax_step, steps, label, curve, color=color)
    for config, members in references:
        label = method_label(config, other + ["alpha0"] if "alpha0" not in other else other)
        curve = mean_curve(members, metric, x)
        if curve is not None:
            add_curve(ax_curve, curves, label, curve, color="black", linestyle="--")
        values = [v for r in members if (v := final_value(r, metric)) is not None]
        if values:
            ax_final.axhline(np.mean(values), color="black", linestyle="--", linewidth=1, label=label)
            finals.setdefault("references", []).append({"label": label, "mean": float(np.mean(values))})
    by_method: dict[str, list] = {}
    for config, members in moving:
        values = [v for r in members if (v := final_value(r, metric)) is not None]
        if values:
            by_method.setdefault(method_label(config, other), []).append((config["alpha0"], values, members))
    _add_alpha0_points(ax_final, finals, by_method)
    ax_curve.set(xlabel="epoch" if x == "epoch" else "iteration", ylabel=ylabel, title=curves["title"])
    ax_final.set(xscale="log", xlabel="α0 (initial step size)", ylabel=f"final {ylabel}", title=finals["title"])
    ax_step.set(yscale="log", xlabel="iteration", ylabel="step size", title=steps["title"])
    for ax in (ax_curve, ax_final, ax_step):
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6)
    data["panels"] = [curves, finals, steps]
    return {name: (fig, data)}


def kind_task_end(name, groups, keys, metric=None) -> dict:
    """The continual task (Figure 7): accumulated online accuracy against steps with the task switches
    marked, and the test accuracy on each task's classes at the end of the task."""
    if not _has_task_end(groups):
        raise InputError("--kind task-end: no run logged task/test_acc (the continual experiment's metric)")
    runs = [r for _, members in groups for r in members]
    fig, (ax_online, ax_task) = panel_grid(2, name, ncols=2, sharey=False)
    online = {"title": "accumulated online accuracy", "metric": "online/acc", "x": "step",
              "task_switches": task_switches(runs), "series": []}
    for i, s in enumerate(online["task_switches"]):
        ax_online.axvline(s, color="gray", linestyle="--", linewidth=0.8, alpha=0.6,
                          label="task switch" if i == 0 else None)
    _add_config_curves(ax_online, online, groups, keys, "online/acc", "step")
    task = {"title": "test accuracy at the end of each task", "metric": "task/test_acc", "x": "task", "series": []}
    _add_task_end_curves(ax_task, task, groups, keys)
    ax_online.set(xlabel="step", ylabel="online accuracy (%)", title=online["title"])
    ax_task.set(xlabel="task", ylabel="test accuracy (%)", title=task["title"])
    for ax in (ax_online, ax_task):
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6)
    return {name: (fig, {"kind": "task_end", "panels": [online, task]})}


def kind_top1_top5(name, groups, keys, metric=None) -> dict:
    """Top-1 and top-5 accuracy against epochs (Figure 9): test solid, training dashed (same color)."""
    runs = [r for _, members in groups for r in members]
    if not any(run.series("test/acc5")[0] for run in runs):
        raise InputError("--kind top1-top5: no run logged test/acc5 (top-5 accuracy: the ImageNet experiment)")
    fig, axes = panel_grid(2, name, ncols=2, sharey=False)
    data = {"kind": "top1_top5", "x": "epoch", "panels": []}
    for ax, (title, metrics) in zip(axes, (("top-1 accuracy", ("test/acc", "train/acc")),
                                           ("top-5 accuracy", ("test/acc5", "train/acc5")))):
        panel = {"title": title, "series": []}
        for i, (config, members) in enumerate(groups):
            for metric_key, style in zip(metrics, ("-", "--")):
                curve = mean_curve(members, metric_key, x_key(members, metric_key))
                if curve is None:
                    continue
                split = "test" if metric_key.startswith("test") else "train"
                add_curve(ax, panel, f"{method_label(config, keys)} ({split})", curve, color=f"C{i % 10}",
                           linestyle=style)
        ax.set(xlabel="epoch", ylabel=f"{title} (%)", title=title)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6)
        data["panels"].append(panel)
    return {name: (fig, data)}


KIND_MAKERS = {"curves": kind_curves, "base-panels": kind_base_panels, "block-panels": kind_block_panels,
               "step-sizes": kind_step_sizes, "alpha0": kind_alpha0, "task-end": kind_task_end,
               "top1-top5": kind_top1_top5, **plot_idbd.KIND_MAKERS}


def _matches(value, text: str) -> bool:
    """A config value equals a command-line value: as text, or as numbers (1e-6 == 1e-06 == 0.000001)."""
    if str(value) == text or value_text(value) == text:
        return True
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and float(text) == float(value)
    except ValueError:
        return False


def select_runs(runs: list[Run], where: list[str]) -> list[Run]:
    """--where KEY=V1,V2 (config.json key, any of the values; repeat for several keys)."""
    for condition in where:
        key, sep, values = condition.partition("=")
        if not sep or not key:
            raise InputError(f"--where {condition!r}: expected KEY=VALUE[,VALUE...], e.g. stepsize_groups=scalar")
        wanted = [v.strip() for v in values.split(",")]
        runs = [r for r in runs if any(_matches(r.config.get(key), w) for w in wanted)]
        if not runs:
            raise InputError(f"--where {condition}: no run has it")
    return runs


def best_configurations(groups, over: list[str], metric: str):
    """Of the configurations that differ only in the keys `over` (a grid searched for one method), keep
    the one with the best mean final metric (highest accuracy, lowest loss)."""
    from summarize import higher_is_better

    best: dict[str, tuple] = {}
    sign = 1 if higher_is_better(metric) else -1
    for config, members in groups:
        key = json.dumps({k: v for k, v in config.items() if k not in over}, sort_keys=True, default=str)
        values = [v for r in members if (v := final_value(r, metric)) is not None]
        score = sign * float(np.mean(values)) if values else -math.inf
        if key not in best or score > best[key][0]:
            best[key] = (score, config, members)
    return [(config, members) for _, config, members in best.values()]


def make_kind_figure(kind: str, runs: list[Run], name: str, metric: str | None = None, where=(),
                     best_over=(), extra_ignored=(), title: str | None = None) -> dict:
    """{name: (figure, data)}: one figure of the given kind (KINDS) from the selected runs, titled
    `title` (default: its name)."""
    import matplotlib

    matplotlib.use("Agg")
    runs = select_runs(runs, list(where))
    groups = group_runs(runs, extra_ignored)
    needs_metric = kind in ("curves", "base-panels", "alpha0")
    metric = _metric(runs, metric) if needs_metric or best_over else metric
    if best_over:
        groups = best_configurations(groups, list(best_over), metric)
    keys = label_keys(groups)
    figures = KIND_MAKERS[kind](name, groups, keys, metric)
    for key, (fig, data) in figures.items():
        if title:  # several figures of one kind (step-sizes): each says its configuration
            text = title if len(figures) == 1 else f"{title}: {data.get('config', key)}"
            if fig._suptitle is not None:
                fig._suptitle.set_text(text)
            else:
                fig.axes[0].set_title(text, fontsize=10)
            data["title"] = text
    return figures


def make_figures(runs: list[Run], extra_ignored=()) -> dict:
    """{figure name: (matplotlib figure, data)} for every figure the runs support."""
    import matplotlib

    matplotlib.use("Agg")
    figures = {}
    experiments = list(dict.fromkeys(run.experiment for run in runs))
    for exp in experiments:
        groups = group_runs([r for r in runs if r.experiment == exp], extra_ignored)
        keys = varying_keys([c for c, _ in groups])
        name = exp or "runs"
        makers = {**plot_l2o.MAKERS, **plot_idbd.MAKERS}
        for make in makers.get(exp, (curve_figures, step_size_figures, robustness_figures, continual_figures,
                                     task_end_figures)):
            figures.update(make(name, groups, keys))
        if any(run.series("test/acc5")[0] for _, members in groups for run in members):
            figures.update(kind_top1_top5(f"{name}_top1_top5", groups, keys))
    return figures


def save_figures(figures: dict, out_dir: Path, formats=FORMATS) -> list[Path]:
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    written, index = [], {}
    for name, (fig, data) in tqdm(figures.items(), desc="figures", unit="fig", disable=len(figures) < 5):
        fig.tight_layout()
        for fmt in formats:
            path = out_dir / f"{name}.{fmt}"
            fig.savefig(path, dpi=DPI)
            written.append(path)
        plt.close(fig)
        index[name] = data
    # one index per folder: figures drawn by earlier commands into the same folder keep their entries
    index_path = out_dir / "plot_data.json"
    try:
        previous = json.loads(index_path.read_text())
    except (OSError, ValueError):
        previous = {}
    index = {**(previous if isinstance(previous, dict) else {}), **index}
    index_path.write_text(json.dumps(index, indent=1) + "\n")
    return written


def main(argv=None) -> int:
    parser = ArgParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folders, or folders holding them")
    parser.add_argument("--out", required=True, help="folder for the figures")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: png, pdf, svg")
    parser.add_argument("--ignore", default="", help="comma-separated config keys to leave out of the configuration")
    parser.add_argument("--wandb-project", help="also read the runs of this wandb project (entity/project)")
    g = parser.add_argument_group("one figure of a given kind (the paper's figures: scripts/paper.py)")
    g.add_argument("--kind", default="auto", choices=KINDS,
                   help="auto: every figure the runs support; otherwise one figure of this kind")
    g.add_argument("--name", help="file name of the figure, without extension (default: <experiment>_<kind>)")
    g.add_argument("--title", help="the figure's title (default: its name)")
    g.add_argument("--metric", help=f"metric to draw (default: the first of {', '.join(DEFAULT_METRICS)} logged)")
    g.add_argument("--where", action="append", default=[], metavar="KEY=V1[,V2]",
                   help="only runs whose config.json KEY has one of these values (repeat for more keys)")
    g.add_argument("--best-over", default="", metavar="KEY[,KEY]",
                   help="of configurations differing only in these config keys (a searched grid), draw the "
                        "one with the best final metric")
    args = parser.parse_args(argv)
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    try:
        bad = [f for f in formats if f not in ("png", "pdf", "svg")]
        if bad or not formats:
            raise InputError(f"--formats {args.formats!r}: accepted: png, pdf, svg")
        if not args.run_dirs and not args.wandb_project:
            raise InputError("give RUN_DIR folders and/or --wandb-project")
        from tqdm import tqdm

        dirs = find_run_dirs(args.run_dirs) if args.run_dirs else []
        runs = [load_run(d) for d in tqdm(dirs, desc="runs", unit="run", disable=len(dirs) < 20)]
        if args.wandb_project:
            runs += load_wandb_runs(args.wandb_project)
        ignore = {k.strip() for k in args.ignore.split(",") if k.strip()}
        if args.kind == "auto":
            if args.where or args.best_over or args.name or args.metric or args.title:
                raise InputError("--where, --best-over, --name, --title and --metric draw one figure: give --kind too")
            figures = make_figures(runs, ignore)
        else:
            name = args.name or f"{runs[0].experiment or 'runs'}_{args.kind.replace('-', '_')}"
            if _UNSAFE_NAME.search(name):
                raise InputError(f"--name {name!r}: use letters, digits, '.', '_', '-' only")
            figures = make_kind_figure(args.kind, runs, name, args.metric, args.where,
                                       [k.strip() for k in args.best_over.split(",") if k.strip()], ignore,
                                       args.title)
        if not figures:
            raise InputError("the runs logged nothing to plot (no test/acc, val/loss, train/loss, step sizes or "
                             "online/acc in metrics.jsonl)")
        written = save_figures(figures, Path(args.out), formats)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out under a file, not writable, disk full
        print(f"error: --out {args.out}: cannot write figures there ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"{len(figures)} figures from {len(runs)} runs in {args.out}:")
    for name in figures:
        print(f"  {name}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
