"""The plotting helpers every figure maker shares (scripts/plot.py, plot_idbd.py, plot_l2o.py).

The makers import this module; scripts/plot.py, the command line, imports the makers. Runs come from
summarize.py (`Run`); matplotlib is imported when a figure is drawn, so the numbers work without it.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
from summarize import Run, varying_keys

DPI = 150
FIGSIZE = (6.4, 4.2)


def value_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# each --optimizer's own flags (config keys) start with its prefix; a label shows only its own

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



def series_record(label, grid, mean, std, runs) -> dict:
    return {"label": label, "runs": [r.name for r in runs], "x": [float(v) for v in grid],
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}



def add_curve(ax, data: dict, label: str, curve, **style) -> None:
    """Draw a mean_curve result (mean line, +-1 std band) and record it in the figure's data.
    `style`: matplotlib line properties (color, linestyle)."""
    grid, mean, std, _ = curve
    (line,) = ax.plot(grid, mean, label=label, marker="o" if len(grid) <= 20 else None, markersize=3, **style)
    if np.any(std > 0):
        ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    data["series"].append(series_record(label, *curve))



def diverged_note(members) -> str:
    n = sum(r.diverged for r in members)
    return f" ({n}/{len(members)} diverged)" if n else ""



def figure(title: str, xlabel: str, ylabel: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax



def panel_grid(n: int, title: str, ncols: int | None = None, sharey: bool = True):
    import matplotlib.pyplot as plt

    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.7 * ncols, 3.1 * nrows + 0.5), sharey=sharey, squeeze=False)
    for ax in axes.flat[n:]:
        fig.delaxes(ax)
    fig.suptitle(title, fontsize=10)
    axes = list(axes.flat[:n])
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def label_keys(groups) -> list[str]:
    """The keys that tell configurations apart beyond their method: varying keys, less those that
    one (optimizer, base, meta) always has the same value of (e.g. the base's rho)."""
    configs = [c for c, _ in groups]
    keys = varying_keys(configs)
    method = ("optimizer", "alg_base", "alg_meta")
    out = []
    for k in keys:
        values: dict[str, set] = {}
        for c in configs:
            values.setdefault(json.dumps([c.get(m) for m in method], default=str), set()).add(
                json.dumps(c.get(k), default=str))
        if k in method or any(len(v) > 1 for v in values.values()):
            out.append(k)
    return out
