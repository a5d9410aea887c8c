"""The league: every optimizer of the project on CPU-sized workloads, scored as AlgoPerf scores.

    python3 league/run.py                              # the full league (both rulesets, 3 seeds), 2 workers
    python3 league/run.py --quick                      # 2 workloads, 3 methods, 1 seed (the tests)
    python3 league/run.py --calibrate                  # the AdamW grid -> league/targets.json
    python3 league/run.py --train-networks             # meta-train the learned optimizers -> league/networks/
    python3 league/run.py --record results/league      # also record the result with date, machine, command

Each run trains one method (a spec, league/methods.py) at one grid value and seed on one workload
(league/workloads.py) for the workload's full budget, and writes a run folder (config.json,
metrics.jsonl with the validation metric every eval_every steps, summary.json) through
common/harness.py, so `scripts/plot.py` draws its curve. Its steps to target are read back from its
metrics log: the first evaluated step whose metric meets the target; its wall time to target is the
training time up to there (evaluation excluded). A diverged run misses. A run whose folder already
holds a finished or diverged run is not run again (resume after a stop); a run that runs under both
rulesets (the self-tuning spec is also the grid's middle point) runs once. Outputs, in
<save-directory>/league (league_quick with --quick): league.json, league.md, profile_<ruleset>.png,
runs/<workload>/<method>/<grid>-s<seed>/.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common` and `league` without installing

import torch

from common import runfolder
from common.cli import ArgParser
from league import scoring
from league.methods import METHODS, NETWORK_COMMANDS, NETWORKS, QUICK_METHODS, build, method
from league.workloads import WORKLOADS, workload

RULESETS = ("self_tuning", "external_tuning")
QUICK_WORKLOADS = ("digits_mlp", "lasso")
TARGETS = Path(__file__).resolve().parent / "targets.json"
CALIBRATION_FRACTION = 0.8  # the target: what tuned AdamW reaches at this share of the budget
CALIBRATION_METHOD = "AdamW"
SEEDS = 3
WORKERS = 2


# ---- one run ---------------------------------------------------------------------------------


def run_dir(root: Path, workload_name: str, method_name: str, grid, seed: int) -> Path:
    label = "default" if grid is None else f"g{grid:g}"
    return root / "runs" / workload_name / method_name.replace("(", "_").replace(")", "").replace(",", "_") / \
        f"{label}-s{seed}"


def train(job: dict) -> str:
    """Run one job (unless its folder holds a finished or diverged run); returns the folder's state."""
    folder = Path(job["dir"])
    state = runfolder.run_state(folder)
    if state in ("finished", "diverged"):
        return state
    from common import harness
    from common.optim_flags import eval_weights

    torch.set_num_threads(1)
    wl, m = workload(job["workload"]), method(job["method"])
    spec = m.spec_at(job["grid"])
    args = argparse.Namespace(
        save_directory=str(folder.parent), run_name=folder.name, seed=job["seed"], start_over=True, resume=False,
        device="cpu", log_every=wl.eval_every, workload=wl.name, method=m.name, grid=job["grid"], spec=spec,
        metric=wl.metric, budget=wl.budget, eval_every=wl.eval_every)
    run = harness.Run(args, "league")
    try:
        inst = wl.make(job["seed"])
        opt = build(spec, inst.model)
        train_time, start = 0.0, time.perf_counter()
        for step in range(1, wl.budget + 1):
            loss = inst.loss(step - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % wl.eval_every == 0:
                train_time += time.perf_counter() - start
                with torch.no_grad(), eval_weights(opt):  # DoG: its averaged weights; Schedule-Free: its x
                    value = inst.evaluate()
                # the step sizes are logged (and the weights checked finite) with the metrics
                run.log_step(opt, step, {"train/loss": loss.item(), wl.metric: value,
                                         "train_time": round(train_time, 4)})
                start = time.perf_counter()
        run.finish({"final": {wl.metric: value}, "train_time": train_time})
    except harness.Diverged:
        return "diverged"
    finally:
        run.close()
    return "finished"


def result(folder: Path, wl, target: float | None) -> dict:
    """steps_to_target, wall_to_target_s and final_metric of a run, from its summary and metrics log."""
    state = runfolder.run_state(folder)
    if state != "finished":  # diverged (or missing): a miss
        return {"steps_to_target": None, "wall_to_target_s": None, "final_metric": None, "state": state}
    records = [r for r in read_metrics(folder) if wl.metric in r]
    hit = next((r for r in records if target is not None and wl.reached(r[wl.metric], target)), None)
    return {"steps_to_target": None if hit is None else int(hit["step"]),
            "wall_to_target_s": None if hit is None else hit["train_time"],
            "final_metric": records[-1][wl.metric] if records else None, "state": state}


def read_metrics(folder: Path) -> list[dict]:
    with open(Path(folder) / runfolder.METRICS) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_jobs(jobs: list[dict], workers: int) -> None:
    todo = [j for j in {j["dir"]: j for j in jobs}.values()
            if runfolder.run_state(j["dir"]) not in ("finished", "diverged")]
    done = len({j["dir"] for j in jobs}) - len(todo)
    print(f"{len(todo)} runs to do ({done} already done)", file=sys.stderr, flush=True)
    start = time.time()
    if workers <= 1:
        results = map(train, todo)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap_unordered(train, todo)
    try:
        for i, _ in enumerate(results, 1):
            if i % 50 == 0 or i == len(todo):
                print(f"  {i}/{len(todo)} runs, {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()


# ---- the league --------------------------------------------------------------------------------


def grid_points(m, ruleset: str) -> list:
    if ruleset == "self_tuning" or m.knob is None:
        return [None]
    return m.grid()


def point_dir(root, wl_name, m, grid, seed):
    """The self-tuning spec and the grid value equal to it share one run."""
    same = grid is not None and m.default() is not None and math.isclose(grid, m.default(), rel_tol=1e-9)
    return run_dir(root, wl_name, m.name, None if same else grid, seed)


def plan(root: Path, workloads, methods, seeds, rulesets=RULESETS) -> list[dict]:
    jobs = []
    for wl_name in workloads:
        for name in methods:
            m = method(name)
            if not m.applies_to(workload(wl_name)):
                continue
            for ruleset in rulesets:
                for grid in grid_points(m, ruleset):
                    for seed in seeds:
                        jobs.append({"workload": wl_name, "method": name, "ruleset": ruleset, "grid": grid,
                                     "seed": seed, "dir": str(point_dir(root, wl_name, m, grid, seed))})
    return jobs


def load_targets(path=TARGETS) -> dict:
    try:
        return json.loads(Path(path).read_text())["targets"]
    except (OSError, ValueError, KeyError):
        raise ValueError(f"targets: cannot read {path}; run python3 league/run.py --calibrate first") from None


def league_record(jobs, workloads, methods, targets) -> dict:
    runs = []
    for j in jobs:
        wl = workload(j["workload"])
        r = result(Path(j["dir"]), wl, targets[wl.name]["target"])
        runs.append({k: j[k] for k in ("method", "ruleset", "workload", "seed", "grid")}
                    | {k: r[k] for k in ("steps_to_target", "wall_to_target_s", "final_metric")})
    scores = {}
    for ruleset in RULESETS:
        of = [r for r in runs if r["ruleset"] == ruleset]
        scores[ruleset] = {key: scoring.scores(of, workloads, methods, field) for key, field in
                           (("steps", "steps_to_target"), ("wall", "wall_to_target_s"))}
    return {"workloads": {w: {"metric": workload(w).metric, "target": targets[w]["target"],
                              "budget": workload(w).budget} for w in workloads},
            "runs": runs, "scores": scores}


def markdown(record: dict, methods) -> str:
    workloads = list(record["workloads"])
    out = []
    for ruleset in RULESETS:
        of = [r for r in record["runs"] if r["ruleset"] == ruleset]
        times = scoring.method_times(of)
        head = ["method", *workloads, "score (steps)", "score (wall)"]
        rows = []
        for m in sorted(methods, key=lambda m: -record["scores"][ruleset]["steps"][m]):
            cells = []
            for w in workloads:
                t = times.get(m, {}).get(w)
                cells.append("n/a" if t is None else "—" if not math.isfinite(t) else f"{t:g}")
            rows.append([m, *cells, f"{record['scores'][ruleset]['steps'][m]:.3f}",
                         f"{record['scores'][ruleset]['wall'][m]:.3f}"])
        out.append(f"### {ruleset.replace('_', '-')}: steps to target (median over seeds"
                   + (", best grid value" if ruleset == "external_tuning" else "") + ")\n")
        out.append("| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|")
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
    budgets = ", ".join(f"{w} {v['metric']} {'>=' if workload(w).higher_is_better else '<='} {v['target']:.4g} "
                        f"in {v['budget']}" for w, v in record["workloads"].items())
    out.append(f"—: misses the target (median over seeds); n/a: does not apply (counts as a miss). "
               f"Targets and budgets: {budgets}.")
    return "\n".join(out) + "\n"


def plot_profiles(record: dict, methods, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import matplotlib.pyplot as plt
    from plotting import DPI, figure

    workloads = list(record["workloads"])
    taus = [1 + 3 * i / 300 for i in range(301)]
    paths = []
    for ruleset in RULESETS:
        of = [r for r in record["runs"] if r["ruleset"] == ruleset]
        times = scoring.method_times(of)
        for m in methods:
            times.setdefault(m, {})
        ratios = scoring.ratios(times, workloads)
        fig, ax = figure(f"performance profiles, {ruleset.replace('_', '-')} ({len(workloads)} workloads)",
                         "tau (time / fastest time)", "share of workloads with ratio <= tau")
        order = sorted(methods, key=lambda m: -record["scores"][ruleset]["steps"][m])
        for i, m in enumerate(order):
            ax.step(taus, [scoring.profile(ratios[m], workloads, t) for t in taus], where="post",
                    ls="-" if i < 10 else "--", label=f"{m} ({record['scores'][ruleset]['steps'][m]:.3f})")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), title="method (score)",
                  title_fontsize=7)
        fig.set_size_inches(9, 4.2)  # room for the legend beside the curves
        path = folder / f"profile_{ruleset}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


# ---- calibration -----------------------------------------------------------------------------------


def calibrate(root: Path, workloads, seeds, workers: int, targets_file: Path, argv) -> dict:
    """Tuned fixed-step AdamW's metric at CALIBRATION_FRACTION of the budget (median over seeds, best lr)."""
    m = method(CALIBRATION_METHOD)
    jobs = plan(root, workloads, [m.name], seeds, rulesets=("external_tuning",))
    run_jobs(jobs, workers)
    found = {}
    for w in workloads:
        wl = workload(w)
        at = round(CALIBRATION_FRACTION * wl.budget)
        if at % wl.eval_every:
            raise ValueError(f"workload {w}: {CALIBRATION_FRACTION} of its budget is not an evaluated step")
        medians = {}
        for grid in m.grid():
            values = []
            for seed in seeds:
                folder = point_dir(root, w, m, grid, seed)
                rec = [r for r in read_metrics(folder) if r["step"] == at] \
                    if runfolder.run_state(folder) == "finished" else []
                ok = rec and math.isfinite(rec[0][wl.metric])
                values.append(rec[0][wl.metric] if ok else (-math.inf if wl.higher_is_better else math.inf))
            medians[grid] = statistics.median(values)
        best = (max if wl.higher_is_better else min)(medians, key=medians.get)
        found[w] = {"target": medians[best], "lr": best, "metric": wl.metric, "at_step": at, "budget": wl.budget,
                    "medians": {f"{g:g}": v for g, v in medians.items()}}
    old = {}
    if targets_file.exists():
        old = json.loads(targets_file.read_text()).get("targets", {})
    doc = {"command": "python3 league/run.py " + " ".join(argv), "method": CALIBRATION_METHOD,
           "rule": f"the best (median over seeds) of the {m.name} lr grid at {CALIBRATION_FRACTION:g} of the budget",
           "seeds": list(seeds), "targets": {**old, **found}}
    targets_file.parent.mkdir(parents=True, exist_ok=True)
    targets_file.write_text(json.dumps(doc, indent=1) + "\n")
    return found


def train_networks() -> None:
    from l2o import meta_train

    for name, argv in NETWORK_COMMANDS.items():
        if runfolder.is_finished(NETWORKS / name):
            print(f"{NETWORKS / name} is trained", file=sys.stderr)
            continue
        meta_train.main([*argv, "--save-directory", str(NETWORKS), "--run-name", name, "--start-over"])


# ---- command line ----------------------------------------------------------------------------------


def name_list(table, what):
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in table]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or '(none)'}; accepted: {', '.join(table)}")
        return list(dict.fromkeys(names))

    return parse


def parse_args(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_WORKLOADS)} x {', '.join(QUICK_METHODS)}, "
                   "one seed")
    p.add_argument("--calibrate", action="store_true", help="run the AdamW grid and write the targets")
    p.add_argument("--train-networks", action="store_true", help="meta-train the learned optimizers' networks")
    p.add_argument("--save-directory", default="outputs", help="the league's folder goes under it")
    p.add_argument("--workloads", type=name_list(WORKLOADS, "workload(s)"), default=None, help="comma list")
    p.add_argument("--methods", type=name_list(METHODS, "method(s)"), default=None, help="comma list")
    p.add_argument("--seeds", type=int, default=None, help=f"seed count (0..n-1, odd); default {SEEDS} (1 --quick)")
    p.add_argument("--workers", type=int, default=WORKERS, help="runs at a time (processes)")
    p.add_argument("--targets", default=str(TARGETS), help="the targets file (read, or written by --calibrate)")
    p.add_argument("--record", default=None, metavar="STEM", help="also write STEM.md and STEM.json (results/league)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else SEEDS
    if args.seeds < 1 or args.seeds % 2 == 0:
        p.error(f"--seeds must be an odd count >= 1 (the median is one seed's time), got {args.seeds}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    args.workloads = args.workloads or list(QUICK_WORKLOADS if args.quick else WORKLOADS)
    args.methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    return p, args


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    root = Path(args.save_directory) / ("league_quick" if args.quick else "league")
    seeds = list(range(args.seeds))
    if args.train_networks:
        train_networks()
        return {}
    if args.calibrate:
        found = calibrate(root, args.workloads, seeds, args.workers, Path(args.targets), args.argv)
        for w, t in found.items():
            print(f"{w}: target {t['metric']} {t['target']:.6g} (AdamW lr {t['lr']:g})")
        return found
    try:
        targets = load_targets(args.targets)
    except ValueError as e:
        parser.error(str(e))
    missing = [w for w in args.workloads if w not in targets]
    if missing:
        parser.error(f"--workloads: no target for {', '.join(missing)} in {args.targets}; run --calibrate")
    learned = [m for m in args.methods if METHODS[m].family == "learned"
               and not runfolder.is_finished(NETWORKS / METHODS[m].spec["checkpoint"])]
    if learned:
        parser.error(f"--methods: {', '.join(learned)} need their networks; run python3 league/run.py --train-networks")
    from common.benchmark import environment, write_results

    env = environment("cpu", args.argv)
    start = time.time()
    jobs = plan(root, args.workloads, args.methods, seeds)
    run_jobs(jobs, args.workers)
    record = league_record(jobs, args.workloads, args.methods, targets)
    record["config"] = {"command": env["command"], "date": env["date"], "seeds": seeds, "workers": args.workers,
                        "wall_time_s": round(time.time() - start, 1)}
    root.mkdir(parents=True, exist_ok=True)
    (root / "league.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    text = markdown(record, args.methods)
    (root / "league.md").write_text(text)
    plot_profiles(record, args.methods, root)
    print(text)
    print(f"wrote {root}/league.json, league.md, profile_*.png ({time.time() - start:.0f} s)")
    if args.record:
        n = len({j['dir'] for j in jobs})
        write_results(args.record, title="The league (league/run.py)", table=text,
                      raw={k: record[k] for k in ("workloads", "scores", "config", "runs")}, argv=args.argv, env=env,
                      notes=[f"{n} runs ({len(args.workloads)} workloads, {len(args.methods)} methods, "
                             f"{len(seeds)} seeds, {args.workers} at a time) in {time.time() - start:.0f} s. "
                             "Wall-clock times are noisy: the machine's 2 cores are shared with other jobs."])
    return record


if __name__ == "__main__":
    main()
