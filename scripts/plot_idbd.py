"""The figures of Sutton's (1992) tracking task (idbd/train.py runs, experiment "idbd").

Drawn by scripts/plot.py (automatically for idbd runs, or with --kind idbd-error / idbd-step-sizes):
- idbd_asymptotic_error (Sutton's Figure 3): the asymptotic mean squared error (the mean over the last
  --measure-last examples) against the step-size parameter: alpha for LMS, theta = the meta step
  size for IDBD and MetaOptimize; one line per method, the mean over seeds shaded +- std, the best
  LMS as a dashed line;
- idbd_step_sizes (Sutton's Figure 4): the mean step size of the relevant (solid) and irrelevant
  (dashed) inputs against examples, one panel per method that learns its step sizes, each at its
  best parameter (lowest asymptotic error), the mean over seeds shaded +- std.
A run of idbd/train.py holds several seeds (learners side by side, metrics `<name>/seed<k>`); the
seeds of every run of a configuration are pooled. Diverged runs are left out and counted in the legend.
"""

from __future__ import annotations

import math
import re
import textwrap

import numpy as np
import plotting
from summarize import InputError, Run, final_value, group_runs

EXPERIMENT = "idbd"
# config keys that only name or count seeds: seeds are pooled over them
SEED_KEYS = ("seed", "num_seeds")
# config keys a method's name already says
NAMED_BY = {"lms": ("method", "alg_base", "alg_meta", "hessian", "rectify", "stepsize_groups", "alpha0",
                    "meta_stepsize", "momentum_param_meta", "normalizer_param_meta", "lion_beta2_meta",
                    "weight_decay_meta", "gamma"),
            "idbd": ("method", "alg_base", "alg_meta", "hessian", "rectify", "stepsize_groups", "meta_stepsize"),
            "metaoptimize": ("method", "alg_base", "alg_meta", "hessian", "rectify", "meta_stepsize")}
PER_SEED = re.compile(r"^(?P<name>.+)/seed(?P<seed>\d+)$")
CLIP = 4.0  # the error axis ends at this many times the best LMS error (diverged: an x at the top edge)
MARKERS = "os^vDPX*h<>"



def parameter(config: dict) -> str:
    """The step-size parameter of a configuration's method: alpha0 for LMS, the meta step size otherwise."""
    return "alpha0" if config.get("method") == "lms" or str(config.get("alg_meta")).lower() == "fixed" \
        else "meta_stepsize"


def label(config: dict, keys=()) -> str:
    """"LMS", "IDBD", "MetaOptimize SGD+Adam hvp", plus the keys in `keys` the name does not say."""
    method = str(config.get("method", "metaoptimize"))
    if method == "lms":
        text = "LMS"
    elif method == "idbd":
        text = "IDBD"
    else:
        hessian = {"none": "Hessian-free", "hvp": "hvp", "block_diagonal": "block-diagonal"}.get(
            str(config.get("hessian")), str(config.get("hessian")))
        text = f"MetaOptimize {config.get('alg_base')}+{config.get('alg_meta')} {hessian}"
        if config.get("rectify"):
            text += " rectified"
    for k in keys:
        if k in NAMED_BY.get(method, ()) or k in SEED_KEYS:
            continue
        value = config.get(k)
        text += f" {k}={value:g}" if isinstance(value, float) else f" {k}={value}"
    return text


def _families(groups):
    """{family label: [(parameter value, config, runs)]}: configurations that differ only in their parameter."""
    by_method: dict[str, list] = {}
    for config, members in groups:
        by_method.setdefault(str(config.get("method")), []).append((config, members))
    # per method, the keys that tell configurations of one base and meta apart
    keys = {method: plotting.label_keys(members) for method, members in by_method.items()}
    out: dict[str, list] = {}
    for config, members in groups:
        value = config.get(parameter(config))
        if isinstance(value, (int, float)) and value > 0:
            out.setdefault(label(config, keys[str(config.get("method"))]), []).append((float(value), config, members))
    order = {"lms": 0, "idbd": 1}  # then MetaOptimize with the Hessian term, then Hessian-free

    def rank(item):
        config = item[1][0][1]
        return order.get(config.get("method"), 2 + (config.get("hessian") == "none")), item[0]

    return {name: sorted(points, key=lambda p: p[0]) for name, points in sorted(out.items(), key=rank)}


def _style(config: dict) -> dict:
    """Hessian-free MetaOptimize dashed; LMS, IDBD and the Hessian traces solid."""
    return {"linestyle": "--" if config.get("method") == "metaoptimize" and config.get("hessian") == "none" else "-"}


def _runs_note(n: int) -> str:
    return f" ({n} run{'s' if n > 1 else ''} diverged)" if n else ""


def seed_values(run: Run, name: str) -> list[float]:
    """The final `<name>/seed<k>` of every seed of a run (its one value when it logged no seeds)."""
    last = {}
    for record in run.metrics:
        for key, value in record.items():
            m = PER_SEED.match(key)
            if m and m.group("name") == name and isinstance(value, (int, float)):
                last[int(m.group("seed"))] = float(value)
    if not last and (value := final_value(run, name)) is not None:
        return [value]
    return [v for _, v in sorted(last.items()) if math.isfinite(v)]


def seed_runs(runs: list[Run], name: str) -> list[Run]:
    """One Run per seed of each run, whose metrics are {step, "value": <name>/seed<k>}."""
    out = []
    for run in runs:
        per: dict[int, list] = {}
        for record in run.metrics:
            for key, value in record.items():
                m = PER_SEED.match(key)
                if m and m.group("name") == name and "step" in record:
                    per.setdefault(int(m.group("seed")), []).append({"step": record["step"], "value": value})
        if not per and run.series(name)[0]:
            per[0] = [{"step": x, "value": y} for x, y in zip(*run.series(name))]
        out += [Run(f"{run.name}#seed{s}", run.config, records) for s, records in sorted(per.items())]
    return out


def error_figure(name: str, groups, keys=None, metric=None) -> dict:
    """Sutton's Figure 3: asymptotic error against the step-size parameter, on a linear axis up to
    CLIP x the best LMS (points above it, learners whose weights blew up without diverging, are marked
    at the top edge with their value)."""
    data = {"kind": "idbd_error", "metric": "asymptotic_mse", "series": []}
    drawn, best_lms = [], None
    for family, points in _families(groups).items():
        xs, means, stds, used, diverged = [], [], [], [], {}
        for value, config, members in points:
            values = [v for r in members if not r.diverged for v in seed_values(r, "asymptotic_mse")]
            if n := sum(r.diverged for r in members):
                diverged[f"{value:g}"] = n  # runs left out at this parameter value
            if not values:
                continue
            xs.append(value)
            means.append(float(np.mean(values)))
            stds.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
            used += [r for r in members if not r.diverged]
            if config.get("method") == "lms" and (best_lms is None or means[-1] < best_lms[1]):
                best_lms = (value, means[-1])
        if xs:
            record = plotting.series_record(family + _runs_note(sum(diverged.values())), np.array(xs),
                                         np.array(means), np.array(stds), used)
            record["diverged"] = diverged
            data["series"].append(record)
            drawn.append((record, points[0][1]))
    if not drawn:
        return {}
    values = [v for record in data["series"] for v in record["mean"]]
    top = min(CLIP * (best_lms[1] if best_lms else float(np.median(values))), 1.05 * max(values))
    fig, ax = plotting.figure(name, "step-size parameter: α (LMS), θ = meta step size (the others)",
                           "asymptotic mean squared error")
    fig.set_size_inches(9.0, 4.6)
    for i, (record, config) in enumerate(drawn):
        x, mean, std = (np.array(record[k]) for k in ("x", "mean", "std"))
        over = mean > top
        (line,) = ax.plot(x, np.minimum(mean, top), marker=MARKERS[i % len(MARKERS)], markersize=4,
                          label=record["label"], **_style(config))
        band = np.where(over, np.nan, std)
        if np.any(band > 0):
            ax.fill_between(x, np.maximum(mean - band, 0), np.minimum(mean + band, top), color=line.get_color(),
                            alpha=0.15, linewidth=0)
        for value in (float(v) for v in record["diverged"] if float(v) not in record["x"]):  # every seed diverged
            ax.plot(value, top, marker="x", color=line.get_color(), markersize=8, clip_on=False)
        for xi, v in zip(x[over], mean[over]):
            ax.plot(xi, top, marker="^", color=line.get_color(), markersize=8, clip_on=False)
            ax.annotate(f"{v:.2g}", (xi, top), textcoords="offset points", xytext=(0, -13), fontsize=6,
                        ha="center", color=line.get_color())
    if best_lms is not None:
        ax.axhline(best_lms[1], color="black", linestyle=":", linewidth=0.8,
                   label=f"best LMS (α={best_lms[0]:g}): {best_lms[1]:.3g}")
        data["best_lms"] = {"alpha0": best_lms[0], "asymptotic_mse": best_lms[1]}
    ax.set_xscale("log")
    ax.set_ylim(0, top)
    data["y_max"] = top
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return {name: (fig, data)}


def step_size_figure(name: str, groups, keys=None, metric=None) -> dict:
    """Sutton's Figure 4: the step sizes of relevant and irrelevant inputs against examples, per method
    at its best parameter."""
    panels = []
    for family, points in _families(groups).items():  # in the order of the error figure
        if all(p[1].get("method") == "lms" for p in points):
            continue

        def score(point):
            values = [v for r in point[2] if not r.diverged for v in seed_values(r, "asymptotic_mse")]
            return float(np.mean(values)) if values else math.inf

        value, config, members = min(points, key=score)
        runs = [r for r in members if not r.diverged]
        if any(r.series("alpha/relevant")[0] for r in runs):
            panels.append((f"{family}, {'θ' if parameter(config) == 'meta_stepsize' else 'α'}={value:g}", runs))
    if not panels:
        return {}
    fig, axes = plotting.panel_grid(len(panels), name, ncols=min(len(panels), 3), sharey=False)
    data = {"kind": "idbd_step_sizes", "x": "step", "panels": []}
    for ax, (title, runs) in zip(axes, panels):
        panel = {"title": title, "series": []}
        for part, style in (("relevant", "-"), ("irrelevant", "--")):
            curve = plotting.mean_curve(seed_runs(runs, f"alpha/{part}"), "value", "step")
            if curve is None or np.any(curve[1] <= 0):
                continue
            grid, mean, std, used = curve
            (line,) = ax.plot(grid, mean, linestyle=style, color="C0" if part == "relevant" else "C3",
                              label=f"{part} inputs")
            if np.any(std > 0):
                ax.fill_between(grid, np.maximum(mean - std, mean / 10), mean + std, color=line.get_color(),
                                alpha=0.2, linewidth=0)
            panel["series"].append(plotting.series_record(f"{part} inputs", grid, mean, std, used))
        ax.set(title=textwrap.fill(title, 45), xlabel="examples", ylabel="step size α", yscale="log")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
        data["panels"].append(panel)
    return {name: (fig, data)}


def figures(exp: str, groups, keys) -> dict:
    """Every idbd figure the runs support (plot.py without --kind)."""
    groups = group_runs([r for _, m in groups for r in m], SEED_KEYS)
    return {**error_figure(f"{exp}_asymptotic_error", groups), **step_size_figure(f"{exp}_step_sizes", groups)}


def _kind(maker, needs: str):
    """A --kind maker of plot.py: the figure from the chosen runs, or an error naming what is missing."""
    def make(name, groups, keys, metric=None):
        out = maker(name, group_runs([r for _, m in groups for r in m], SEED_KEYS))
        if not out:
            raise InputError(f"the runs logged no {needs} (runs of idbd/train.py)")
        return out
    return make


MAKERS = {EXPERIMENT: (figures,)}
KIND_MAKERS = {"idbd-error": _kind(error_figure, "asymptotic_mse"),
               "idbd-step-sizes": _kind(step_size_figure, "alpha/relevant of a method that learns its step sizes")}
