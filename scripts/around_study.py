"""MetaOptimize around torch's optimizers: robustness to the learning rate on scikit-learn's digits.

The quick start's MLP and data split (scripts/quickstart.py: 64 -> 32 -> 10, a fixed stratified 75/25
split of the 1,797 bundled images, mini-batches of 64). For each base optimizer (torch's Adam, AdamW,
NAdam, Adafactor, SGD with momentum 0.9, and Muon for the 2-D weights + AdamW for the rest), at its
own typical learning rate times each factor of --factors, and each seed, it trains two networks:
  - bare: the optimizer as constructed;
  - around: MetaOptimize.around(the same optimizer, alg_meta="Adam", alpha0=1, meta_stepsize=1e-3,
    gamma=1, one scalar step size), which multiplies the base's lr by a tuned alpha.
It prints a markdown table of test accuracy (mean ± std over seeds) and writes results.json,
table.md and figure.png (accuracy against the lr factor, one panel per optimizer) to --out.

    python3 scripts/around_study.py                 # the full study (180 runs, about 1 min on 2 cores)
    python3 scripts/around_study.py --quick --out /tmp/around
    python3 scripts/around_study.py --stream        # the continual stream (below)

--stream: the same grid on a continual stream instead of epochs: the training images in a random
order, cycled, --stream-batch at a time, in --tasks tasks of --task-steps steps; each task maps
the ten labels through a new random permutation (a label-permuted stream: the optimizer must keep
learning). The score is the online accuracy: each batch predicted before the step on it, averaged
over the whole stream (as the continual experiments of the project measure it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common` and `scripts` without installing the repo

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.optimizers import MetaOptimize  # noqa: E402
from scripts.quickstart import BATCH_SIZE, HIDDEN_SIZE, at_least, load_data, make_model, seed_list

FACTORS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
EPOCHS = 20
OUT = "outputs/around_study"
# the meta update: the paper's Adam meta with the defaults (alpha0 = 1: the bare base at the start)
META = dict(alg_meta="Adam", alpha0=1.0, meta_stepsize=1e-3, gamma=1.0, stepsize_groups="scalar")


def _muon_adamw(model, factor):
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    return [torch.optim.Muon(matrices, lr=0.02 * factor), torch.optim.AdamW(rest, lr=1e-3 * factor)]


# name -> (label with its typical lr, builder(model, factor) -> an optimizer or a list of them)
OPTIMIZERS = {
    "Adam": ("Adam (lr 1e-3)", lambda m, f: torch.optim.Adam(m.parameters(), lr=1e-3 * f)),
    "AdamW": ("AdamW (lr 1e-3)", lambda m, f: torch.optim.AdamW(m.parameters(), lr=1e-3 * f)),
    "NAdam": ("NAdam (lr 1e-3)", lambda m, f: torch.optim.NAdam(m.parameters(), lr=1e-3 * f)),
    "Adafactor": ("Adafactor (lr 1e-2)", lambda m, f: torch.optim.Adafactor(m.parameters(), lr=1e-2 * f)),
    "SGDm": ("SGD m=0.9 (lr 0.1)", lambda m, f: torch.optim.SGD(m.parameters(), lr=0.1 * f, momentum=0.9)),
    "Muon+AdamW": ("Muon 0.02 + AdamW 1e-3", _muon_adamw),
}
ARMS = ("bare", "around")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=seed_list, default="3", help="seed count (0..n-1) or comma list")
    p.add_argument("--epochs", type=at_least(1), default=EPOCHS, help="passes over the training set")
    p.add_argument("--out", default=OUT, help="folder for results.json, table.md, figure.png")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of: " + ", ".join(OPTIMIZERS))
    p.add_argument("--record", default=None, metavar="STEM",
                   help="also record the table as STEM.md + STEM.json with date, command and machine "
                        "(e.g. results/around_study)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 factors, 2 optimizers, 2 epochs")
    p.add_argument("--stream", action="store_true", help="the label-permuted continual stream (online accuracy)")
    p.add_argument("--tasks", type=at_least(1), default=10, help="--stream: tasks (label permutations)")
    p.add_argument("--task-steps", type=at_least(1), default=200, help="--stream: steps per task")
    p.add_argument("--stream-batch", type=at_least(1), default=8, help="--stream: images per step")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown or not args.optimizers:
        parser.error(f"--optimizers: unknown {', '.join(unknown) or '(none)'}; accepted: {', '.join(OPTIMIZERS)}")
    args.factors = list(FACTORS)
    if args.quick:
        args.seeds, args.factors, args.epochs = [0], [1e-2, 1.0], min(args.epochs, 2)
        args.optimizers = args.optimizers[:1] + (["Muon+AdamW"] if "Muon+AdamW" not in args.optimizers[:1] else [])
        args.tasks, args.task_steps = min(args.tasks, 2), min(args.task_steps, 20)
    args.metric = "online_acc" if args.stream else "test_acc"
    return args


def train_one(data, name: str, arm: str, factor: float, seed: int, epochs: int) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)  # the same initial weights and batch order for both arms and every factor
    order = torch.Generator().manual_seed(seed)
    model = make_model(HIDDEN_SIZE)
    base = OPTIMIZERS[name][1](model, factor)
    opt = MetaOptimize.around(base, model=model, **META) if arm == "around" else None
    bases = base if isinstance(base, list) else [base]
    n = len(x_train)
    num_batches = math.ceil(n / BATCH_SIZE)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=order).tensor_split(num_batches):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            for b in ([opt] if opt else bases):
                b.zero_grad(set_to_none=True)
            loss.backward()
            for b in ([opt] if opt else bases):
                b.step()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    alpha = opt.step_sizes().max().item() if opt else 1.0
    return {"optimizer": name, "arm": arm, "factor": factor, "seed": seed, "test_acc": acc, "final_alpha": alpha}


def train_one_stream(data, name: str, arm: str, factor: float, seed: int, tasks: int, task_steps: int,
                     batch: int) -> dict:
    """The label-permuted stream: online accuracy (each batch predicted before its step)."""
    x_train, y_train = data[0], data[1]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_model(HIDDEN_SIZE)
    base = OPTIMIZERS[name][1](model, factor)
    opt = MetaOptimize.around(base, model=model, **META) if arm == "around" else None
    steppers = [opt] if opt else (base if isinstance(base, list) else [base])
    order = torch.randperm(len(x_train), generator=gen)
    correct, seen, at = 0.0, 0, 0
    for _ in range(tasks):
        relabel = torch.randperm(10, generator=gen)
        for _ in range(task_steps):
            idx = order[(at + torch.arange(batch)) % len(order)]
            at += batch
            logits = model(x_train[idx])
            y = relabel[y_train[idx]]
            correct += (logits.detach().argmax(1) == y).float().sum().item()
            seen += batch
            for b in steppers:
                b.zero_grad(set_to_none=True)
            F.cross_entropy(logits, y).backward()
            for b in steppers:
                b.step()
    alpha = opt.step_sizes().max().item() if opt else 1.0
    return {"optimizer": name, "arm": arm, "factor": factor, "seed": seed, "online_acc": correct / seen,
            "final_alpha": alpha}


def summarize(runs, args) -> dict:
    table = {}
    for name in args.optimizers:
        for arm in ARMS:
            rows = []
            for f in args.factors:
                accs = torch.tensor([r[args.metric] for r in runs if (r["optimizer"], r["arm"], r["factor"]) == (name, arm, f)])
                alphas = [r["final_alpha"] for r in runs if (r["optimizer"], r["arm"], r["factor"]) == (name, arm, f)]
                rows.append({"factor": f, "mean": accs.mean().item(), "std": accs.std().item() if len(accs) > 1 else 0.0,
                             "n": len(accs), "final_alpha_mean": sum(alphas) / len(alphas)})
            table[f"{name}/{arm}"] = rows
    return table


def format_table(table, args) -> str:
    head = "| optimizer | arm | " + " | ".join(f"x{f:g}" for f in args.factors) + " |"
    lines = [head, "|" + "---|" * (2 + len(args.factors))]
    for name in args.optimizers:
        for arm in ARMS:
            cells = " | ".join(f"{r['mean']:.3f} ± {r['std']:.3f}" for r in table[f"{name}/{arm}"])
            lines.append(f"| {OPTIMIZERS[name][0]} | {arm} | {cells} |")
    return "\n".join(lines)


def plot(table, args, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(args.optimizers)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, args.optimizers):
        for arm, style in zip(ARMS, ({"marker": "s", "ls": "--"}, {"marker": "o", "lw": 2.2})):
            r = table[f"{name}/{arm}"]
            label = "bare" if arm == "bare" else "MetaOptimize.around (Adam meta)"
            ax.errorbar([x["factor"] for x in r], [x["mean"] for x in r], yerr=[x["std"] for x in r],
                        capsize=3, label=label, **style)
        ax.axhline(0.1, color="grey", lw=0.8, ls=":")
        ax.set(xscale="log", ylim=(0, 1.02), title=OPTIMIZERS[name][0], xlabel="lr factor",
               ylabel="online accuracy" if args.stream else "test accuracy")
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    what = (f"label-permuted stream, {args.tasks} tasks x {args.task_steps} steps of {args.stream_batch}"
            if args.stream else f"{args.epochs} epochs")
    fig.suptitle(f"digits, MLP 64-{HIDDEN_SIZE}-10, {what}, {len(args.seeds)} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    from common.benchmark import environment, write_results

    env = environment("cpu", args.argv)
    start = time.time()
    data = load_data()
    grid = [(o, a, f, s) for o in args.optimizers for a in ARMS for f in args.factors for s in args.seeds]
    if args.stream:
        runs = [train_one_stream(data, o, a, f, s, args.tasks, args.task_steps, args.stream_batch)
                for o, a, f, s in tqdm(grid, desc="runs", unit="run")]
    else:
        runs = [train_one(data, o, a, f, s, args.epochs) for o, a, f, s in tqdm(grid, desc="runs", unit="run")]
    table = summarize(runs, args)
    text = format_table(table, args)
    wall = time.time() - start
    print(text)
    config = {"command": [sys.argv[0], *args.argv], "seeds": args.seeds, "epochs": args.epochs,
              "stream": {"tasks": args.tasks, "task_steps": args.task_steps, "batch": args.stream_batch}
              if args.stream else None, "metric": args.metric,
              "factors": args.factors, "optimizers": {o: OPTIMIZERS[o][0] for o in args.optimizers}, "meta": META,
              "batch_size": BATCH_SIZE, "hidden_size": HIDDEN_SIZE}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": config, "summary": table, "runs": runs, "wall_time_s": wall}, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    plot(table, args, os.path.join(args.out, "figure.png"))
    print(f"wrote {args.out}/{{results.json,table.md,figure.png}} ({len(runs)} runs, {wall:.1f} s)")
    if args.record:
        paths = write_results(
            args.record, title="MetaOptimize around torch's optimizers on digits (scripts/around_study.py)"
            + (": the label-permuted continual stream, online accuracy" if args.stream else ""),
            table=text, raw={"config": config, "summary": table, "runs": runs, "wall_time_s": wall}, argv=args.argv,
            notes=[f"{len(runs)} runs ({len(args.optimizers)} optimizers x 2 arms x {len(args.factors)} lr factors x "
                   f"{len(args.seeds)} seeds, "
                   + (f"{args.tasks} tasks x {args.task_steps} steps of {args.stream_batch} images each"
                      if args.stream else f"{args.epochs} epochs each")
                   + f") in {wall:.1f} s of wall time, 1 torch thread."],
            env=env)
        print(f"recorded {paths[0]} and {paths[1]}")
    return {"summary": table, "text": text, "wall_time_s": wall, "runs": runs}


if __name__ == "__main__":
    main()
