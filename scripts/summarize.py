#!/usr/bin/env python3
"""Result table of run folders: final and best metrics per configuration, mean +- std over seeds.

    python scripts/summarize.py outputs/cifar10_combinations                  # markdown on stdout
    python scripts/summarize.py outputs/a outputs/b --csv table.csv --metrics test/acc,train/loss
    python scripts/summarize.py --wandb-project me/metaoptimize               # runs read from wandb

A RUN_DIR is a run folder (with config.json) or any folder above run folders. A configuration is
a run's config.json without the keys that do not change the result (IGNORED_KEYS: seed, run name,
paths, device, logging); runs that agree on everything else are the seeds of one configuration.
Columns: the configuration keys that differ between rows, the number of runs (finished/all), then
"final" (the last logged value) and "best" (highest accuracy, lowest loss) of each metric as
mean +- std over the runs (sample std; blank for one run). Unfinished runs count with what they
logged so far. Diverged runs (summary.json says so, or a loss or step size they logged is not
finite) are left out of the statistics, and every cell of their configuration says how many.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common` (cli, runfolder: no torch)
from common import runfolder  # noqa: E402
from common.cli import ArgParser, UsageError, error_line  # noqa: E402

# config.json keys that are not part of a configuration (besides any *_dir/_directory/_path/_file key)
IGNORED_KEYS = {
    "seed", "run_name", "save_directory", "data_dir", "command", "start_time", "resume", "max_time",
    "device", "log_every", "wandb", "wandb_project", "wandb_entity", "workers", "num_workers",
    "stop_at_step", "start_over", "weights_checksum", "compile",
    "optimizer_spec",  # the optimizer flags again, resolved (common/specs.py): the flags are compared one by one
}
# shared configuration keys named above the table (the others are in config.json)
SHARED_SHOWN = ["experiment", "optimizer", "alg_base", "alg_meta", "alpha0", "stepsize_groups", "gamma",
                "meta_stepsize", "num_epochs", "epochs", "max_iters", "batch_size"]
# metrics shown by default (those the runs have), in this order
DEFAULT_METRICS = ["test/acc", "test/acc5", "test/loss", "val/loss", "train/loss", "online/acc",
                   "task/test_acc", "task/test_acc_mean"]


@dataclass
class Run:
    name: str  # folder path or wandb path
    config: dict
    metrics: list = field(default_factory=list)  # the metrics.jsonl records
    summary: dict | None = None

    @property
    def finished(self) -> bool:
        return runfolder.summary_state(self.summary) == "finished"

    @property
    def diverged(self) -> bool:
        """summary.json says so, or a loss or step size it logged is not finite (runs from before the
        harness checked this)."""
        if runfolder.summary_state(self.summary) == "diverged":
            return True
        return any(isinstance(v, float) and not math.isfinite(v) and ("loss" in k or k.startswith("step_size/"))
                   for r in self.metrics for k, v in r.items())

    @property
    def experiment(self) -> str:
        return str(self.config.get("experiment", ""))

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x values, values) of every record holding `key` (and `x`)."""
        xs, ys = [], []
        for r in self.metrics:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and x in r:
                xs.append(float(r[x]))
                ys.append(float(v))
        return xs, ys


class InputError(UsageError):
    """Bad input: printed as one `error: ...` line, exit code 2."""


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def find_run_dirs(paths) -> list[Path]:
    """Run folders (holding config.json) at or below each path, sorted, without duplicates."""
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"{p}: no such folder")
        if (p / "config.json").is_file():
            found.append(p)
            continue
        below = sorted(c.parent for c in p.rglob("config.json"))
        if not below:
            raise InputError(f"{p}: no run folders (folders with config.json) in it")
        found += below
    return list(dict.fromkeys(found))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None


def load_run(run_dir) -> Run:
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    if not isinstance(config, dict):
        raise InputError(f"{run_dir / 'config.json'}: expected a JSON object")
    metrics = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line being written right now
                continue
            if isinstance(record, dict):
                metrics.append(record)
    try:
        summary = _read_json(run_dir / "summary.json")
    except InputError:
        summary = None
    return Run(name=str(run_dir), config=config, metrics=metrics, summary=summary)


def load_runs(paths) -> list[Run]:
    return [load_run(p) for p in find_run_dirs(paths)]


def load_wandb_runs(project: str, api=None) -> list[Run]:
    """Runs of a wandb project ("entity/project" or "project") through the wandb API."""
    if api is None:
        try:
            import wandb
        except ImportError:
            raise InputError("--wandb-project: the wandb package is not installed (pip install wandb)") from None
        api = wandb.Api()
    try:
        wandb_runs = list(api.runs(project))
    except Exception as e:  # wandb raises its own error types (auth, not found, network)
        raise InputError(f"--wandb-project {project}: {type(e).__name__}: {e}") from None
    runs = []
    for r in wandb_runs:
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        config.setdefault("run_name", r.name)
        metrics = [{k: v for k, v in row.items() if not k.startswith("_")} for row in r.scan_history()]
        for row in metrics:
            row.setdefault("step", row.get("step"))
        summary = dict(r.summary) if r.summary is not None else {}
        finished = getattr(r, "state", "") == "finished"
        runs.append(Run(name=f"{project}/{r.id}", config=config, metrics=metrics,
                        summary={"finished": finished and summary.get("diverged") is not True,
                                 "diverged": summary.get("diverged") is True,
                                 "final": {k: v for k, v in summary.items() if not k.startswith(("_", "best/"))},
                                 "best": {k[5:]: v for k, v in summary.items() if k.startswith("best/")}}))
    if not runs:
        raise InputError(f"--wandb-project {project}: no runs")
    return runs


# --------------------------------------------------------------------------------------
# Configurations and statistics
# --------------------------------------------------------------------------------------


def ignored(key: str, extra=()) -> bool:
    return key in IGNORED_KEYS or key in extra or key.endswith(("_dir", "_directory", "_path", "_file"))


def configuration(run: Run, extra_ignored=()) -> dict:
    return {k: v for k, v in run.config.items() if not ignored(k, extra_ignored)}


def _hashable(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def group_runs(runs: list[Run], extra_ignored=()) -> list[tuple[dict, list[Run]]]:
    """[(configuration, its runs)] in order of first appearance."""
    groups: dict[str, tuple[dict, list[Run]]] = {}
    for run in runs:
        config = configuration(run, extra_ignored)
        groups.setdefault(_hashable(config), (config, []))[1].append(run)
    return list(groups.values())


def varying_keys(configs: list[dict]) -> list[str]:
    """Keys whose value differs between configurations (a key missing somewhere counts), in order."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]


def higher_is_better(metric: str) -> bool:
    return "acc" in metric or "per_s" in metric


def _number(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def final_value(run: Run, metric: str) -> float | None:
    values = [v for r in run.metrics if (v := _number(r.get(metric))) is not None]
    if values:
        return values[-1]
    return _number(((run.summary or {}).get("final") or {}).get(metric))


def best_value(run: Run, metric: str) -> float | None:
    values = [v for r in run.metrics if (v := _number(r.get(metric))) is not None]
    if values:
        return max(values) if higher_is_better(metric) else min(values)
    return _number(((run.summary or {}).get("best") or {}).get(metric))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def available_metrics(runs: list[Run]) -> list[str]:
    present = set()
    for run in runs:
        for r in run.metrics:
            present.update(r)
        present.update((run.summary or {}).get("final") or {})
    return [m for m in DEFAULT_METRICS if m in present]


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def summarize(runs: list[Run], metrics: list[str] | None = None, extra_ignored=()) -> tuple[list[str], list[dict], dict]:
    """(column keys, rows, configuration shared by every row). Each row: the varying configuration
    keys, runs, finished, diverged, and per metric `final <m>` / `best <m>` as (mean, std, n) over
    the runs that did not diverge."""
    groups = group_runs(runs, extra_ignored)
    metrics = metrics or available_metrics(runs)
    keys = varying_keys([c for c, _ in groups])
    common = {k: v for k, v in groups[0][0].items() if k not in keys} if groups else {}
    rows = []
    for config, members in groups:
        row = {k: config.get(k) for k in keys}
        row["runs"] = len(members)
        row["finished"] = sum(r.finished for r in members)
        row["diverged"] = sum(r.diverged for r in members)
        for m in metrics:
            for kind, fn in (("final", final_value), ("best", best_value)):
                values = [v for r in members if not r.diverged and (v := fn(r, m)) is not None]
                row[f"{kind} {m}"] = (*mean_std(values), len(values))
        rows.append(row)
    return keys, rows, common


def _fmt(x: float | None, scale: float | None = None) -> str:
    """A number with decimals chosen by `scale` (the mean's magnitude): 2 from 1 up, 4 below 1, then %.3g."""
    if x is None:
        return ""
    scale = abs(x) if scale is None else abs(scale)
    if scale >= 1e5 or (scale < 1e-3 and scale != 0):
        return f"{x:.3g}"
    return f"{x:.2f}" if scale >= 1 else f"{x:.4f}"


def _cell(value, diverged: int = 0) -> str:
    """A statistic's cell; with `diverged` runs in its configuration it says how many were left out."""
    if isinstance(value, tuple):
        mean, std, n = value
        text = "" if mean is None else _fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std, mean)}"
        if diverged:
            text = f"{text} (n={n}; {diverged} diverged)" if text else f"diverged ({diverged})"
        return text
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else str(value)


def markdown_table(keys: list[str], rows: list[dict], metrics: list[str]) -> str:
    columns = [*keys, "runs"] + [f"{kind} {m}" for m in metrics for kind in ("final", "best")]
    header = [*keys, "runs (finished)"] + [f"{kind} {m}" for m in metrics for kind in ("final", "best")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            if c == "runs":
                diverged = f"; {row['diverged']} diverged" if row["diverged"] else ""
                cells.append(f"{row['runs']} ({row['finished']}{diverged})")
            else:
                cells.append(_cell(row[c], row["diverged"]).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(keys: list[str], rows: list[dict], metrics: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    stats = [f"{kind} {m}" for m in metrics for kind in ("final", "best")]
    writer.writerow([*keys, "runs", "finished", "diverged"] + [f"{s} {part}" for s in stats
                                                                for part in ("mean", "std", "n")])
    for row in rows:
        cells = [_cell(row[k]) for k in keys] + [row["runs"], row["finished"], row["diverged"]]
        for s in stats:
            mean, std, n = row[s]
            cells += ["" if mean is None else repr(mean), "" if std is None else repr(std), n]
        writer.writerow(cells)
    return out.getvalue()


def main(argv=None) -> int:
    parser = ArgParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folders, or folders holding them")
    parser.add_argument("--metrics", help=f"comma-separated metric keys (default: those of {','.join(DEFAULT_METRICS)} "
                                          "that the runs logged)")
    parser.add_argument("--csv", help="also write the table as CSV to this file ('-': stdout, after the markdown)")
    parser.add_argument("--markdown", help="also write the markdown table to this file")
    parser.add_argument("--ignore", default="", help="comma-separated config keys to leave out of the configuration")
    parser.add_argument("--wandb-project", help="also read the runs of this wandb project (entity/project)")
    args = parser.parse_args(argv)
    try:
        if not args.run_dirs and not args.wandb_project:
            raise InputError("give RUN_DIR folders and/or --wandb-project")
        runs = load_runs(args.run_dirs) if args.run_dirs else []
        if args.wandb_project:
            runs += load_wandb_runs(args.wandb_project)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else available_metrics(runs)
        if not metrics:
            raise InputError(f"the runs logged none of {', '.join(DEFAULT_METRICS)}; choose keys with --metrics")
        extra = {k.strip() for k in args.ignore.split(",") if k.strip()}
        keys, rows, common = summarize(runs, metrics, extra)
    except InputError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    text = markdown_table(keys, rows, metrics)
    diverged = sum(r.diverged for r in runs)
    note = f"; {diverged} diverged (left out of the statistics)" if diverged else ""
    print(f"{len(runs)} runs, {len(rows)} configurations; mean ± std over seeds{note}")
    shown = [f"{k}={_cell(common[k])}" for k in SHARED_SHOWN if k in common]
    if shown:
        print("shared: " + ", ".join(shown))
    print()
    print(text)
    table = csv_text(keys, rows, metrics)
    if args.csv == "-":
        print()
        print(table, end="")
    elif args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        Path(args.csv).write_text(table)
        print(f"\nCSV: {args.csv}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
