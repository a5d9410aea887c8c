#!/usr/bin/env python3
"""The paper's figures from run folders (PNG and PDF); it draws the figures the runs support.

    python scripts/plot.py outputs/cifar10_combinations outputs/cifar10_baselines --out figures/
    python scripts/plot.py outputs/continual_cifar100 --out figures/ --formats png

Per experiment (config.json "experiment"), one line per configuration (mean over its seeds, shaded
+- std; configurations as in summarize.py):
- <exp>_test_acc, <exp>_val_loss, <exp>_train_loss: the metric against epochs (iterations when the
  runs log no epoch), one line per method (the paper's Figures 1, 4, 5);
- <exp>_step_sizes_<method>: the step size of every block against steps, log scale, for each
  configuration whose step sizes move (Figure 3);
- <exp>_alpha0_<metric>: the final test accuracy (or validation loss) against alpha0, log scale,
  one line per method that was run with several alpha0 (Figure 2, robustness);
- <exp>_online_acc: the accumulated online accuracy of the continual task against steps, with the
  task switches marked.
- l2o_*: the learned-optimizer figures (scripts/plot_l2o.py) for runs of l2o/evaluate.py and l2o/meta_train.py,
  instead of the figures above (the paper of Sobotka et al., Figures 4, 5, 7, 8, 9).
plot_data.json in the output folder holds the numbers behind every figure and the runs they come from.
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
import plot_l2o  # noqa: E402  (the learned-optimizer figures, experiments l2o_eval and l2o_meta)
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
DPI = 150
FIGSIZE = (6.4, 4.2)


# --------------------------------------------------------------------------------------
# Labels and averaging over seeds
# --------------------------------------------------------------------------------------


def _g(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def method_label(config: dict, keys: list[str]) -> str:
    """A short name for a configuration, e.g. "AdamW+Adam resnet18_blocks" or "Lion fixed α=1e-4"."""
    keys = list(keys)
    parts = []
    optimizer = str(config.get("optimizer", "")).lower()
    covered = {"optimizer"}
    if optimizer in ("hf", "metaoptimize") and "alg_base" in config:
        base, meta = config.get("alg_base"), config.get("alg_meta")
        covered |= {"alg_base", "alg_meta"}
        if str(meta).lower() == "fixed":
            alpha = config.get("alpha0")
            parts.append(f"{base} fixed" + (f" α={_g(alpha)}" if alpha is not None else ""))
            covered |= {"alpha0", "stepsize_groups"}
        else:
            parts.append(f"{base}+{meta}")
    elif optimizer == "adamw" and "lr" in config:
        parts.append(f"AdamW cosine lr={_g(config['lr'])}")
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
            parts.append(f"α0={_g(config.get(k))}")
        else:
            parts.append(f"{k}={_g(config.get(k))}")
    return " ".join(parts) or "all runs"


def slug(text: str) -> str:
    text = text.replace("α0", "alpha0").replace("α", "alpha").replace("+", "_")
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_") or "run"


def x_key(runs: list[Run], metric: str) -> str:
    """"epoch" when every record holding the metric also has an epoch, else "step"."""
    records = [r for run in runs for r in run.metrics if metric in r]
    return "epoch" if records and all("epoch" in r for r in records) else "step"


def mean_curve(runs: list[Run], metric: str, x: str = "step"):
    """(x, mean, std, used runs) of a metric over runs: on the x values every run logged, or, when the
    runs logged at different points, interpolated onto them over the range they share."""
    series = [(run, *run.series(metric, x)) for run in runs]
    series = [(run, xs, ys) for run, xs, ys in series if xs]
    if not series:
        return None
    tables = [dict(zip(xs, ys)) for _, xs, ys in series]
    common = sorted(set.intersection(*(set(t) for t in tables)))
    shortest = min(len(t) for t in tables)
    if len(common) >= max(1, shortest // 2):
        grid = np.array(common)
        values = np.array([[t[v] for v in common] for t in tables])
    else:
        lo = max(min(xs) for _, xs, _ in series)
        hi = min(max(xs) for _, xs, _ in series)
        grid = np.array(sorted({v for _, xs, _ in series for v in xs if lo <= v <= hi}))
        if not len(grid):
            return None
        values = np.array([np.interp(grid, xs, ys) for _, xs, ys in series])
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(grid))
    return grid, values.mean(axis=0), std, [run for run, _, _ in series]


def _series_record(label, grid, mean, std, runs) -> dict:
    return {"label": label, "runs": [r.name for r in runs], "x": [float(v) for v in grid],
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _add_curve(ax, data: dict, label: str, curve) -> None:
    """Draw a mean_curve result (mean line, +-1 std band) and record it in the figure's data."""
    grid, mean, std, _ = curve
    (line,) = ax.plot(grid, mean, label=label, marker="o" if len(grid) <= 20 else None, markersize=3)
    if np.any(std > 0):
        ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    data["series"].append(_series_record(label, *curve))


def _add_config_curves(ax, data: dict, groups, keys, metric: str, x: str) -> None:
    """One curve per configuration: its runs (seeds) averaged."""
    for config, members in groups:
        curve = mean_curve(members, metric, x)
        if curve is not None:
            _add_curve(ax, data, method_label(config, keys), curve)


# --------------------------------------------------------------------------------------
# Figures (each returns {name: (figure, data)})
# --------------------------------------------------------------------------------------


def _figure(title: str, xlabel: str, ylabel: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def curve_figures(exp: str, groups, keys) -> dict:
    out = {}
    for metric, ylabel in CURVE_METRICS.items():
        runs = [r for _, members in groups for r in members]
        if not any(run.series(metric)[0] for run in runs):
            continue
        x = x_key(runs, metric)
        fig, ax = _figure(f"{exp}: {ylabel}", "epoch" if x == "epoch" else "iteration", ylabel)
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
        label = method_label(config, keys)
        fig, ax = _figure(f"{exp}: step sizes, {label}", "iteration", "step size")
        data = {"kind": "step_sizes", "config": label, "x": "step", "series": []}
        for block in blocks:
            curve = mean_curve(members, block, "step")
            if curve is None or np.any(curve[1] <= 0):
                continue
            _add_curve(ax, data, block.removeprefix("step_size/").replace("block_", "block "), curve)
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
        finals = [v for r in members if (v := final_value(r, metric)) is not None]
        if finals:
            label = method_label({k: v for k, v in config.items() if k != "alpha0"} | {"alpha0": None}, others)
            lines.setdefault(label, []).append((float(alpha0), finals, members))
    lines = {label: sorted(points, key=lambda p: p[0]) for label, points in lines.items() if len(points) >= 2}
    if not lines:
        return {}
    ylabel = CURVE_METRICS.get(metric, metric)
    fig, ax = _figure(f"{exp}: final {ylabel} against initial step size", "α0 (initial step size)", f"final {ylabel}")
    data = {"kind": "alpha0", "metric": metric, "x": "alpha0", "series": []}
    for label, points in lines.items():
        grid = np.array([p[0] for p in points])
        mean = np.array([np.mean(p[1]) for p in points])
        std = np.array([np.std(p[1], ddof=1) if len(p[1]) > 1 else 0.0 for p in points])
        ax.errorbar(grid, mean, yerr=std, label=label, marker="o", markersize=4, capsize=3)
        data["series"].append(_series_record(label, grid, mean, std, [r for p in points for r in p[2]]))
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    return {f"{exp}_alpha0_{metric.replace('/', '_')}": (fig, data)}


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
    fig, ax = _figure(f"{exp}: accumulated online accuracy", "step", "online accuracy (%)")
    switches = task_switches(runs)
    for i, s in enumerate(switches):
        ax.axvline(s, color="gray", linestyle="--", linewidth=0.8, alpha=0.6, label="task switch" if i == 0 else None)
    data = {"kind": "online_acc", "metric": "online/acc", "x": "step", "task_switches": switches, "series": []}
    _add_config_curves(ax, data, groups, keys, "online/acc", "step")
    ax.legend(fontsize=7)
    return {f"{exp}_online_acc": (fig, data)}


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
        for make in plot_l2o.MAKERS.get(exp, (curve_figures, step_size_figures, robustness_figures, continual_figures)):
            figures.update(make(name, groups, keys))
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
    (out_dir / "plot_data.json").write_text(json.dumps(index, indent=1) + "\n")
    return written


def main(argv=None) -> int:
    parser = ArgParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folders, or folders holding them")
    parser.add_argument("--out", required=True, help="folder for the figures")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: png, pdf, svg")
    parser.add_argument("--ignore", default="", help="comma-separated config keys to leave out of the configuration")
    parser.add_argument("--wandb-project", help="also read the runs of this wandb project (entity/project)")
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
        figures = make_figures(runs, {k.strip() for k in args.ignore.split(",") if k.strip()})
        if not figures:
            raise InputError("the runs logged nothing to plot (no test/acc, val/loss, train/loss, step sizes or "
                             "online/acc in metrics.jsonl)")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = save_figures(figures, Path(args.out), formats)
    print(f"{len(figures)} figures from {len(runs)} runs in {args.out}:")
    for name in figures:
        print(f"  {name}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
