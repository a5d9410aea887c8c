"""The learned-optimizer figures (Sobotka et al. 2023), with MetaOptimize beside the paper's optimizers.

Drawn by scripts/plot.py for runs of l2o/evaluate.py (experiment "l2o_eval") and l2o/meta_train.py
("l2o_meta"), per dataset and optimizee; seeds averaged, shaded +- std:
- l2o_sym_<optimizee>: |C(-u)| of every symmetry the optimizee has, per optimizer, against steps
  (log scale; the dotted line is |C(g)| of the gradients), and the training loss below (Figure 4);
- l2o_reg_<optimizee>: training loss of learned optimizers meta-trained with and without symmetry
  regularisation, beside Adam, SGD and MetaOptimize (Figure 5);
- l2o_lion_sgd_<optimizee>: the Lion-SGD interpolation: loss curves per lambda_L, and the summed
  training loss and mean |translation deviation| against lambda_L (Figure 7);
- l2o_noise_<optimizee>: tail index of gradients (dashed) and updates (solid), trace and top
  eigenvalue of the update covariance, against steps (Figure 8);
- l2o_hist_<optimizee>: histograms of |u| at the logged steps (Figure 9);
- l2o_meta_test: the meta-test loss of every meta-training run against epochs;
- l2o_problem_<problem>: M-L2O's test on a synthetic problem (evaluate.py --problem): the loss per
  step of every optimizer (L2O networks named by their protocol: vanilla L2O, direct transfer,
  transfer learning, M-L2O), mean over the seeds (the fixed optimizees) shaded +- std, and a table of
  the final losses (train/final_loss, mean +- std over the seeds; also in plot_data.json).
Losses of the MLPs are 10-step running means of the mini-batch loss.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import plotting
from summarize import Run

KINDS = ("rescale", "scale", "translation")
SMOOTH = 10  # running mean of the per-step mini-batch loss
PAPER = ("L2O", "Adam", "SGD", "Lion")



def label(config: dict) -> str:
    """A short name for an evaluated optimizer, e.g. "Adam lr=0.01", "L2O reg=all β=0.1", "MetaOptimize AdamW+Adam"."""
    method = str(config.get("method", "?"))
    lr = config.get("lr_used")
    if method == "L2O":
        text = "L2O"
        if config.get("l2o_reg") not in (None, "none"):
            text += f" reg={config['l2o_reg']} β={config.get('l2o_reg_beta'):g}"
        if config.get("l2o_optimizee") not in (None, config.get("optimizee")):
            text += f" (meta-trained on {config['l2o_optimizee']})"
        return text
    if method == "LionSGD":
        return f"Lion-SGD λL={config.get('lion_fraction'):g}"
    if method.lower() in ("hf", "metaoptimize"):
        groups = config.get("stepsize_groups")
        return f"MetaOptimize {config.get('alg_base')}+{config.get('alg_meta')}" + (
            f" {groups}" if groups not in (None, "scalar") else "")
    text = method + (f" m={config.get('momentum'):g}" if method == "SGD" else "")
    return text + (f" lr={lr:g}" if isinstance(lr, (int, float)) else "")


def _kind(config: dict) -> str:
    method = str(config.get("method", ""))
    if method == "LionSGD":
        return "lion_sgd"
    if method == "L2O" and config.get("l2o_reg") not in (None, "none"):
        return "l2o_reg"
    return "main"


def _order(item):
    config = item[0]
    method = str(config.get("method"))
    return (PAPER.index(method) if method in PAPER else len(PAPER), label(config))


def _derived(runs: list[Run], key: str, fn, out: str) -> list[Run]:
    """Copies of `runs` whose metrics are {step, out: fn(value of key)} (to average |C| or smoothed losses)."""
    copies = []
    for run in runs:
        xs, ys = run.series(key)
        values = fn(np.array(ys)) if ys else []
        copies.append(Run(run.name, run.config, [{"step": x, out: float(v)} for x, v in zip(xs, values)]))
    return copies


def _smooth(values: np.ndarray) -> np.ndarray:
    """Running mean over the last SMOOTH values (fewer at the start)."""
    total = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    width = np.minimum(ends, SMOOTH)
    return (total[ends] - total[ends - width]) / width


def _curve(ax, data, runs, key, name, fn=None, **style):
    runs = _derived(runs, key, fn or (lambda v: v), "value")
    curve = plotting.mean_curve(runs, "value", "step")
    if curve is None:
        return None
    grid, mean, std, used = curve
    (line,) = ax.plot(grid, mean, label=name, **style)
    if np.any(std > 0):  # on log axes a band below 0 would vanish: keep its bottom at a tenth of the mean
        lower = np.where((mean > 0) & (mean - std <= 0), mean / 10, mean - std)
        ax.fill_between(grid, lower, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    data["series"].append({**plotting.series_record(name, grid, mean, std, used), "metric": key})
    return line


def _figure(title: str, rows: int = 1, cols: int = 1, height: float = 3.0, width: float = 6.4):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width, height * rows), squeeze=False)
    fig.suptitle(title, fontsize=10)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _by_optimizee(groups):
    out = defaultdict(list)
    for config, members in groups:
        out[(config.get("dataset"), config.get("optimizee"))].append((config, members))
    return out


def sym_figure(tag, groups) -> dict:
    kinds = [k for k in KINDS if any(r.series(f"sym/{k}/update")[0] for _, m in groups for r in m)]
    if not kinds:
        return {}
    fig, axes = _figure(f"{tag}: symmetry breaking of the updates, |C(-u)| (dotted: |C(g)|)", len(kinds) + 1)
    data = {"kind": "l2o_sym", "series": []}
    for ax, kind in zip(axes[:, 0], kinds):
        for config, members in groups:
            _curve(ax, data, members, f"sym/{kind}/update", label(config), np.abs)
        _curve(ax, data, [r for _, m in groups for r in m], f"sym/{kind}/grad", "gradient", np.abs,
               color="gray", linestyle=":")
        ax.set_yscale("log")
        ax.set_ylabel(f"|{kind}|")
    ax = axes[-1, 0]
    for config, members in groups:
        _curve(ax, data, members, "train/loss", label(config), _smooth)
    ax.set_yscale("log")
    ax.set_ylabel("training loss")
    ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=6, ncol=2)
    return {f"l2o_sym_{tag}": (fig, data)}


def reg_figure(tag, groups, reg_groups) -> dict:
    if not reg_groups:
        return {}
    fig, axes = _figure(f"{tag}: training loss after symmetry regularisation in meta-training", height=4.2)
    ax = axes[0, 0]
    data = {"kind": "l2o_reg", "series": []}
    for config, members in [g for g in groups if str(g[0].get("method")) != "Lion"] + reg_groups:
        _curve(ax, data, members, "train/loss", label(config), _smooth,
               linestyle="--" if config.get("l2o_reg") not in (None, "none") else "-")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=6)
    return {f"l2o_reg_{tag}": (fig, data)}


def lion_sgd_figure(tag, lion_groups, others) -> dict:
    if not lion_groups:
        return {}
    lion_groups = sorted(lion_groups, key=lambda g: g[0].get("lion_fraction", 0))
    fig, axes = _figure(f"{tag}: Lion-SGD interpolation", 1, 2, height=4.2, width=11)
    data = {"kind": "l2o_lion_sgd", "series": [], "points": []}
    ax = axes[0, 0]
    for config, members in lion_groups + [g for g in others if str(g[0].get("method")).lower() in ("hf",
                                                                                                    "metaoptimize")]:
        _curve(ax, data, members, "train/loss", label(config), _smooth)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=6)
    ax = axes[0, 1]
    fractions, sums, devs = [], [], []
    for config, members in lion_groups:
        loss_sums = [sum(r.series("train/loss")[1]) for r in members]
        dev = [np.mean(np.abs(r.series("sym/translation/update")[1])) for r in members
               if r.series("sym/translation/update")[1]]
        fractions.append(config.get("lion_fraction"))
        sums.append(np.mean(loss_sums))
        devs.append(np.mean(dev) if dev else math.nan)
        data["points"].append({"lion_fraction": fractions[-1], "train/loss_sum": sums[-1],
                               "mean_abs_translation_update": devs[-1], "runs": [r.name for r in members]})
    ax.plot(fractions, sums, "o-", color="C0", label="summed training loss")
    for i, (config, members) in enumerate(g for g in others if str(g[0].get("method")).lower() in ("hf", "metaoptimize")):
        value = float(np.mean([sum(r.series("train/loss")[1]) for r in members]))
        ax.axhline(value, color=f"C{i + 4}", linestyle=":", label=f"{label(config)} (summed loss)")
        data["points"].append({"label": label(config), "train/loss_sum": value, "runs": [r.name for r in members]})
    ax.legend(fontsize=6, loc="upper center")
    ax.set_xlabel("λL (weight of Lion)")
    ax.set_ylabel("summed training loss", color="C0")
    twin = ax.twinx()
    twin.plot(fractions, devs, "s--", color="C3", label="mean |translation C(-u)|")
    twin.set_ylabel("mean |translation C(-u)|", color="C3")
    twin.set_yscale("log")
    return {f"l2o_lion_sgd_{tag}": (fig, data)}


def noise_figure(tag, groups) -> dict:
    if not any(r.series("noise/update/tail_index")[0] for _, m in groups for r in m):
        return {}
    fig, axes = _figure(f"{tag}: heavy tails (dashed: gradients) and update covariance", 3)
    data = {"kind": "l2o_noise", "series": []}
    for i, (config, members) in enumerate(groups):
        color = f"C{i % 10}"
        _curve(axes[0, 0], data, members, "noise/update/tail_index", label(config), color=color, marker="o", ms=3)
        _curve(axes[0, 0], data, members, "noise/grad/tail_index", None, color=color, linestyle="--")
        _curve(axes[1, 0], data, members, "noise/update/cov_trace", label(config), color=color, marker="o", ms=3)
        _curve(axes[2, 0], data, members, "noise/update/cov_top_eig", label(config), color=color, marker="o", ms=3)
    for ax, name in zip(axes[:, 0], ("tail index α (higher: lighter tails)", "update covariance trace",
                                     "update covariance top eigenvalue")):
        ax.set_ylabel(name, fontsize=8)
    axes[1, 0].set_yscale("log")
    axes[2, 0].set_yscale("log")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].legend(fontsize=6, ncol=2)
    return {f"l2o_noise_{tag}": (fig, data)}


def hist_figure(tag, groups) -> dict:
    steps = sorted({r["step"] for _, m in groups for run in m for r in run.metrics if "update_abs/hist" in r})
    if not steps:
        return {}
    cols = min(3, len(steps))
    rows = math.ceil(len(steps) / cols)
    fig, axes = _figure(f"{tag}: histograms of |u| (fraction of weights per bin)", rows, cols, height=3.0, width=12)
    data = {"kind": "l2o_hist", "steps": steps, "series": []}
    for ax, step in zip(axes.flat, steps):
        for config, members in groups:
            counts, edges = None, None
            for run in members:
                for r in run.metrics:
                    if r.get("step") == step and "update_abs/hist" in r:
                        c = np.array(r["update_abs/hist"], dtype=float)
                        counts = c if counts is None else counts + c
                        edges = r["update_abs/edges"]
            if counts is None:
                continue
            inner = counts[1:-1] / counts.sum()
            centres = np.sqrt(np.array(edges[:-1]) * np.array(edges[1:]))
            ax.plot(centres, inner, label=label(config))
            data["series"].append({"label": label(config), "step": step, "edges": edges,
                                   "counts": counts.tolist(), "runs": [r.name for r in members]})
        ax.set_xscale("log")
        ax.set_title(f"step {step}", fontsize=9)
        ax.set_xlabel("|u|", fontsize=8)
    for ax in list(axes.flat)[len(steps):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=6)
    return {f"l2o_hist_{tag}": (fig, data)}


# M-L2O's protocols (l2o.learned.protocol_of) in the order of the paper's figures; the references after them
PROTOCOLS = ("vanilla L2O", "direct transfer", "transfer learning", "M-L2O", "M-L2O without adaptation")


def problem_label(config: dict) -> str:
    return str(config.get("l2o_protocol") or "L2O") if config.get("method") == "L2O" else label(config)


def _problem_order(item):
    name = problem_label(item[0])
    return (PROTOCOLS.index(name) if name in PROTOCOLS else len(PROTOCOLS), name)


def problem_figures(groups) -> dict:
    """M-L2O's test: loss per step on each synthetic problem, seeds shaded, and the table of final losses."""
    by_problem = defaultdict(list)
    for config, members in groups:
        by_problem[config["problem"]].append((config, members))
    out = {}
    for problem, members in by_problem.items():
        members = sorted(members, key=_problem_order)
        import matplotlib.pyplot as plt

        fig, (ax, table) = plt.subplots(2, 1, figsize=(6.4, 4.6 + 0.25 * len(members)),
                                        gridspec_kw={"height_ratios": [4.2, 0.4 + 0.25 * len(members)]})
        fig.suptitle(f"{problem}: loss per step (mean over the fixed optimizees, shaded +- std)", fontsize=10)
        ax.grid(True, alpha=0.3)
        data = {"kind": "l2o_problem", "problem": problem, "series": [], "final": []}
        rows = []
        for config, runs in members:
            name = problem_label(config)
            _curve(ax, data, runs, "train/loss", name)
            finals = [r.series("train/final_loss")[1][-1] for r in runs if r.series("train/final_loss")[1]]
            if finals:
                mean, std = float(np.mean(finals)), float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0
                data["final"].append({"label": name, "metric": "train/final_loss", "mean": mean, "std": std,
                                      "runs": len(finals)})
                rows.append([name, f"{mean:.3g} ± {std:.2g}", str(len(finals))])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
        table.axis("off")
        if rows:
            table.table(cellText=rows, colLabels=["optimizer", "final loss (mean ± std)", "seeds"], loc="center",
                        cellLoc="left")
        out[f"l2o_problem_{problem}"] = (fig, data)
    return out


def eval_figures(exp: str, groups, keys) -> dict:
    """Figures 4, 5, 7, 8, 9 for every (dataset, optimizee) of l2o/evaluate.py runs; M-L2O's test for
    runs on synthetic problems."""
    out = problem_figures([g for g in groups if g[0].get("problem")])
    groups = [g for g in groups if not g[0].get("problem")]
    for (dataset, optimizee), members in _by_optimizee(groups).items():
        tag = f"{optimizee}_{dataset}" if len({d for d, _ in _by_optimizee(groups)}) > 1 else str(optimizee)
        parts = defaultdict(list)
        for g in sorted(members, key=_order):
            parts[_kind(g[0])].append(g)
        main = parts["main"]
        if main:
            out.update(sym_figure(tag, main))
            out.update(noise_figure(tag, main))
            out.update(hist_figure(tag, main))
        out.update(reg_figure(tag, main, parts["l2o_reg"]))
        out.update(lion_sgd_figure(tag, parts["lion_sgd"], main))
    return out


def meta_figures(exp: str, groups, keys) -> dict:
    """The meta-test loss of each l2o/meta_train.py configuration against epochs."""
    runs = [r for _, m in groups for r in m]
    if not any(r.series("meta_test/loss_sum")[0] for r in runs):
        return {}
    fig, axes = _figure("meta-training: meta-test summed training loss", height=4.2)
    ax = axes[0, 0]
    data = {"kind": "l2o_meta_test", "series": []}
    for config, members in groups:
        name = f"{config.get('optimizee')}" + (f" reg={config.get('reg')} β={config.get('reg_beta'):g}"
                                               if config.get("reg") not in (None, "none") else "")
        _curve(ax, data, _derived(members, "meta_test/loss_sum", lambda v: v, "meta_test/loss_sum"),
               "meta_test/loss_sum", name, marker="o", ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("meta-update")
    ax.set_ylabel("meta-test summed training loss")
    ax.legend(fontsize=6)
    return {"l2o_meta_test": (fig, data)}


MAKERS = {"l2o_eval": (eval_figures,), "l2o_meta": (meta_figures,)}
