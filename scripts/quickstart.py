"""Offline quick start: MetaOptimize's robustness to the initial step size alpha0, beside the
learning-rate-free baselines.

A small MLP learns scikit-learn's 8x8 handwritten digits (1,797 real images shipped with
scikit-learn, so nothing is downloaded). For every initial step size in the grid and every seed it
trains one network per method (--methods):
  - fixed: the base update (AdamW) with its step held at alpha0 (--alg-meta fixed);
  - metaoptimize: the same base update whose step size starts at alpha0 and is tuned online by
    the meta update (AdamW base, Adam meta, eta 1e-3, gamma 1, one scalar step size);
  - the paper's learning-rate-free baselines, each from its authors' package, with the grid value
    as its own initial step size: dog (DoG, r_eps relative to 1 + |x0|, with its polynomial-decay
    averaging, evaluated on the averaged weights), prodigy (d0), mechanic (s_init, Adam base),
    gdtuo (the Adam base's initial alpha, Adam hyper-optimizer as in the paper);
  - two more: dadapt (D-Adaptation Adam, d0) and schedulefree (Schedule-Free AdamW: its learning
    rate, which it does not tune; its "schedule-free" is the averaging).
It prints a table of test accuracy per method and initial step size (mean +- std over seeds) and
writes, to --save-directory, a figure (quickstart.png and .pdf: accuracy against the initial step
size; the step size each method ends with against the one it started from; MetaOptimize's step
size against steps) and the numbers (quickstart.csv, quickstart.json, table.txt).

The paper's claim to see: fixed-step AdamW is good only near the right alpha, while MetaOptimize
reaches about the best fixed-step accuracy from every alpha0, even 1e-6. The baselines' rows show
how much each depends on its own initial value on this task.
Note: this project's AdamW momentum is a sum (spec section 3), so a fixed alpha here is
comparable to torch.optim.AdamW with lr ~ alpha / (1 - rho) = 10 alpha.

    python3 scripts/quickstart.py                       # the full default grid, every method
    python3 scripts/quickstart.py --alphas 1e-6,1e-3 --seeds 1 --num-epochs 5 --methods fixed,metaoptimize,dog
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.optim_flags import eval_weights
from common.specs import STATE_DTYPES, build_optimizer, resolve_spec
from common.step_metrics import effective_step_sizes

# ---- defaults (every one is a flag below) ----------------------------------------------
ALPHAS = "1e-6,1e-5,1e-4,1e-3,1e-2"  # alpha0 grid
SEEDS = "3"  # a count (seeds 0..n-1) or a comma list
NUM_EPOCHS = 20
BATCH_SIZE = 64  # 0 = full batch
HIDDEN_SIZE = 32  # MLP 64 -> HIDDEN_SIZE -> 10, ReLU
TEST_FRACTION = 0.25  # of the 1,797 images, held out with a fixed, stratified split
SPLIT_SEED = 0  # the train/test split never changes with --seeds
SAVE_DIRECTORY = "outputs/quickstart"
THREADS = 1  # torch CPU threads; the model is tiny, so one thread is fastest
# Optimizer: the paper's (AdamW, Adam) configuration (spec section 7); -1 = unset.
ALG_BASE, ALG_META = "AdamW", "Adam"
META_STEPSIZE, GAMMA, STEPSIZE_GROUPS = 1e-3, 1.0, "scalar"
WEIGHT_DECAY_BASE, NORMALIZER_PARAM_BASE, MOMENTUM_PARAM_BASE, LION_BETA2_BASE = 0.1, 0.999, 0.9, -1.0
WEIGHT_DECAY_META, NORMALIZER_PARAM_META, MOMENTUM_PARAM_META, LION_BETA2_META = 0.0, 0.999, 0.9, -1.0

# method -> (label, what the grid value sets, the --optimizer flags of a baseline ({a}: the grid value))
METHODS = {
    "fixed": ("fixed-step {base}", "alpha", None),
    "metaoptimize": ("MetaOptimize ({base}, {meta})", "alpha0", None),
    "dog": ("DoG", "r_eps (relative)", ({"optimizer": "DoG"}, "dog_reps_rel")),
    "prodigy": ("Prodigy", "d0", ({"optimizer": "Prodigy"}, "prodigy_d0")),
    "mechanic": ("Mechanic (Adam)", "s_init", ({"optimizer": "Mechanic", "mechanic_base": "Adam"}, "mechanic_s_init")),
    "gdtuo": ("gdtuo (Adam, Adam)", "alpha of Adam",
              ({"optimizer": "gdtuo", "gdtuo_base": "Adam", "gdtuo_hyper": "Adam"}, "gdtuo_alpha")),
    "dadapt": ("D-Adaptation Adam", "d0", ({"optimizer": "DAdaptAdam"}, "dadapt_d0")),
    "schedulefree": ("Schedule-Free AdamW", "lr", ({"optimizer": "ScheduleFree"}, "sf_lr")),
}
# the MetaOptimize flags below: the options of the two MetaOptimize arms' spec
HF_KEYS = ("alg_base", "alg_meta", "meta_stepsize", "gamma", "stepsize_groups", "weight_decay_base",
           "normalizer_param_base", "momentum_param_base", "Lion_beta2_base", "weight_decay_meta",
           "normalizer_param_meta", "momentum_param_meta", "Lion_beta2_meta", "state_dtype")


# ---- command line ------------------------------------------------------------------------


def alpha_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers like 1e-6,1e-3, got {text!r}") from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive step sizes, got {text!r}")
    return sorted(set(values))


def seed_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 3 or a comma list like 0,1,2, got {text!r}") from None
    if "," not in text:  # a count
        if len(values) != 1 or values[0] < 1:
            raise argparse.ArgumentTypeError(f"a seed count must be >= 1, got {text!r}")
        return list(range(values[0]))
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative seeds, got {text!r}")
    return values


def method_list(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none)'}; "
                                         f"accepted: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--alphas", type=alpha_list, default=ALPHAS, help="comma list of initial step sizes alpha0")
    p.add_argument("--seeds", type=seed_list, default=SEEDS, help="seed count (0..n-1) or comma list of seeds")
    p.add_argument("--methods", type=method_list, default=",".join(METHODS),
                   help="comma list of the methods to train (each over every initial step size)")
    p.add_argument("--num-epochs", type=at_least(1), default=NUM_EPOCHS, help="passes over the training set")
    p.add_argument("--batch-size", type=at_least(0), default=BATCH_SIZE, help="mini-batch size (split into near-equal batches of at most this); 0 = full batch")
    p.add_argument("--hidden-size", type=at_least(1), default=HIDDEN_SIZE, help="width of the MLP's hidden layer")
    p.add_argument("--save-directory", default=SAVE_DIRECTORY, help="folder for the figure, CSV, JSON and table")
    p.add_argument("--threads", type=at_least(1), default=THREADS, help="torch CPU threads")
    p.add_argument("--record", default=None, metavar="STEM",
                   help="also record the table and timings as STEM.md + STEM.json, with date, command and machine "
                        "(e.g. results/quickstart)")
    # the same names, meanings and -1 = unset convention as common.optim_flags.add_optimizer_args
    g = p.add_argument_group("optimizer (the MetaOptimize arm; the fixed arm uses the same base with --alg-meta fixed)")
    g.add_argument("--alg-base", default=ALG_BASE, help="base update: SGD, SGDm, RMSProp, AdamW, Lion")
    g.add_argument("--alg-meta", default=ALG_META, help="meta update: fixed, SGD, RMSProp, Adam, Lion")
    g.add_argument("--meta-stepsize", type=float, default=META_STEPSIZE, help="[eta] meta step size")
    g.add_argument("--gamma", type=float, default=GAMMA, help="[gamma] discount, in [0, 1]")
    g.add_argument("--stepsize-groups", default=STEPSIZE_GROUPS, help="scalar, layerwise, nodewise, weightwise, ...")
    g.add_argument("--weight-decay-base", type=float, default=WEIGHT_DECAY_BASE, help="[kappa]")
    g.add_argument("--normalizer-param-base", type=float, default=NORMALIZER_PARAM_BASE, help="[lambda]")
    g.add_argument("--momentum-param-base", type=float, default=MOMENTUM_PARAM_BASE, help="[rho]")
    g.add_argument("--Lion-beta2-base", type=float, default=LION_BETA2_BASE, help="[c]")
    g.add_argument("--weight-decay-meta", type=float, default=WEIGHT_DECAY_META, help="[kappa_bar]")
    g.add_argument("--normalizer-param-meta", type=float, default=NORMALIZER_PARAM_META, help="[lambda_bar]")
    g.add_argument("--momentum-param-meta", type=float, default=MOMENTUM_PARAM_META, help="[rho_bar]")
    g.add_argument("--Lion-beta2-meta", type=float, default=LION_BETA2_META, help="[c_bar]")
    g.add_argument("--state-dtype", default="param", choices=list(STATE_DTYPES),
                   help="dtype of MetaOptimize's base state and trace (bfloat16: half their memory)")
    return p


def method_spec(args, method: str, alpha0: float) -> dict:
    """The optimizer spec of one arm (common/specs.py): MetaOptimize as configured, its base with alpha
    fixed at alpha0, or a baseline whose own initial step size is alpha0."""
    spec, key = METHODS[method][2] or ({"optimizer": "HF", **{k: getattr(args, k) for k in HF_KEYS}}, "alpha0")
    if method == "fixed":
        spec = {**spec, "alg_meta": "fixed"}
    return {**spec, key: alpha0}


def make_optimizer(params, args, method: str, alpha0: float) -> torch.optim.Optimizer:
    return build_optimizer(params, method_spec(args, method, alpha0))


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in quickstart.json
    # check the optimizer flags now, so bad input fails before any training, naming its flag
    for method in args.methods:
        try:
            resolve_spec(method_spec(args, method, args.alphas[0]))
        except ValueError as e:
            parser.error(str(e))
    return args


# ---- data, model, one run ----------------------------------------------------------------


def load_data(test_fraction: float = TEST_FRACTION, split_seed: int = SPLIT_SEED):
    """Digits as tensors: (x_train, y_train, x_test, y_test), features standardised on the train split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8  # some corner pixels are always 0
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def make_model(hidden_size: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden_size), torch.nn.ReLU(), torch.nn.Linear(hidden_size, 10))


def train_one(data, args, method: str, alpha0: float, seed: int) -> dict:
    """Train one MLP; returns its test accuracy and the step size after every optimizer step."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)  # initial weights: the same for both arms and every alpha0 of a seed
    order = torch.Generator().manual_seed(seed)  # mini-batch order: likewise
    model = make_model(args.hidden_size)
    opt = make_optimizer(model.parameters(), args, method, alpha0)
    n = len(x_train)
    num_batches = 1 if args.batch_size == 0 else math.ceil(n / args.batch_size)
    step_sizes = []
    for _ in range(args.num_epochs):
        for idx in torch.randperm(n, generator=order).tensor_split(num_batches):  # near-equal batches
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_sizes.append(effective_step_sizes(opt).float().cpu())
    with torch.no_grad(), eval_weights(opt):  # DoG: its averaged weights; Schedule-Free: its x
        test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        train_loss = F.cross_entropy(model(x_train), y_train).item()
    curve = torch.stack(step_sizes)  # steps x blocks; with more than one block, the largest is kept
    return {"method": method, "alpha0": alpha0, "seed": seed, "test_acc": test_acc, "train_loss": train_loss,
            "final_step_size": curve[-1].max().item(), "step_sizes": curve.max(dim=1).values.tolist()}


# ---- summary, table, outputs ---------------------------------------------------------------


def summarize(runs: list[dict], alphas: list[float], methods: list[str]) -> dict:
    """Mean and std (over seeds) of test accuracy per method and initial step size, plus worst/best."""
    table = {}
    for method in methods:
        rows = []
        for a in alphas:
            accs = torch.tensor([r["test_acc"] for r in runs if r["method"] == method and r["alpha0"] == a])
            std = accs.std().item() if len(accs) > 1 else 0.0
            rows.append({"alpha0": a, "mean": accs.mean().item(), "std": std, "n": len(accs)})
        means = [row["mean"] for row in rows]
        table[method] = {"rows": rows, "worst": min(means), "best": max(means)}
    return table


def method_label(method: str, args) -> str:
    return METHODS[method][0].format(base=args.alg_base, meta=args.alg_meta)


def format_table(table: dict, args) -> str:
    methods = list(table)
    label_width = max(len(method_label(m, args)) for m in methods)
    knob_width = max(len("initial"), *(len(METHODS[m][1]) for m in methods))
    cell = 13
    head = (f"{'method':<{label_width}} | {'initial':<{knob_width}} | "
            + " | ".join(f"{a:>{cell}.0e}" for a in args.alphas) + f" | {'worst':>6} | {'best':>6}")
    lines = ["test accuracy, mean +- std over seeds, per initial step size (the column)", head, "-" * len(head)]
    for m in methods:
        cells = " | ".join(f"{r['mean']:>6.3f}+-{r['std']:.3f}".rjust(cell) for r in table[m]["rows"])
        lines.append(f"{method_label(m, args):<{label_width}} | {METHODS[m][1]:<{knob_width}} | {cells} | "
                     f"{table[m]['worst']:>6.3f} | {table[m]['best']:>6.3f}")
    lines.append("-" * len(head))
    lines.append("worst, best: over the initial step sizes, of the mean over seeds")
    return "\n".join(lines)


def write_numbers(runs: list[dict], table: dict, text: str, args, wall_time: float) -> None:
    out = args.save_directory
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "quickstart.csv"), "w", newline="") as f:
        keys = ["method", "alpha0", "seed", "test_acc", "train_loss", "final_step_size"]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    config = {k: v for k, v in vars(args).items() if k != "argv"}
    config.update(command=[sys.argv[0], *args.argv], test_fraction=TEST_FRACTION, split_seed=SPLIT_SEED)
    with open(os.path.join(out, "quickstart.json"), "w") as f:
        json.dump({"config": config, "summary": table, "runs": runs, "wall_time": wall_time}, f)


def plot(runs: list[dict], table: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_final, ax_step) = plt.subplots(1, 3, figsize=(16, 4.6))
    markers = "so^vDP*Xh"
    for i, method in enumerate(table):
        rows = table[method]["rows"]
        style = {"lw": 2.2} if method in ("fixed", "metaoptimize") else {"lw": 1, "alpha": 0.85, "ls": "--"}
        ax_acc.errorbar([r["alpha0"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                        marker=markers[i % len(markers)], capsize=3, label=method_label(method, args), **style)
        finals = [statistics.fmean(r["final_step_size"] for r in runs if r["method"] == method and r["alpha0"] == a)
                  for a in args.alphas]
        ax_final.plot(args.alphas, finals, marker=markers[i % len(markers)], label=method_label(method, args), **style)
    ax_acc.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance")
    ax_acc.set(xscale="log", xlabel="initial step size (alpha0, r_eps, d0, s_init, lr)", ylabel="test accuracy",
               ylim=(0, 1.02), title=f"digits, MLP 64-{args.hidden_size}-10, {args.num_epochs} epochs")
    ax_acc.legend(fontsize=7, loc="lower right")
    ax_final.plot(args.alphas, args.alphas, color="grey", lw=0.8, ls=":", label="unchanged")
    ax_final.set(xscale="log", yscale="log", xlabel="initial step size", ylabel="step size at the end (mean)",
                 title="the step size each method ends with (its own units)")
    ax_final.legend(fontsize=7)

    if "metaoptimize" in table:
        colors = plt.cm.viridis([i / max(1, len(args.alphas) - 1) for i in range(len(args.alphas))])
        for a, color in zip(args.alphas, colors):
            curves = [r["step_sizes"] for r in runs if r["method"] == "metaoptimize" and r["alpha0"] == a]
            steps = range(1, len(curves[0]) + 1)
            for k, curve in enumerate(curves):  # one thin line per seed
                ax_step.plot(steps, curve, color=color, lw=1, alpha=0.8,
                             label=rf"$\alpha_0$={a:.0e}" if k == 0 else None)
            ax_step.axhline(a, color=color, lw=0.8, ls=":")
        if "fixed" in table:
            best_fixed = max(table["fixed"]["rows"], key=lambda r: r["mean"])["alpha0"]
            ax_step.axhline(best_fixed, color="black", lw=1, ls="--", label=f"best fixed ({best_fixed:.0e})")
        low = min(min(r["step_sizes"]) for r in runs if r["method"] == "metaoptimize")
        high = max(max(r["step_sizes"]) for r in runs if r["method"] == "metaoptimize")
        ax_step.set_ylim(min(low, min(args.alphas)) / 30, max(high, max(args.alphas)) * 3)  # room for the legend
        ax_step.set(yscale="log", xlabel="optimizer step", ylabel=r"step size $\alpha$",
                    title="MetaOptimize's learned step size (dotted: start)")
        ax_step.legend(fontsize=8, loc="lower right")
    else:
        ax_step.set_visible(False)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(os.path.join(args.save_directory, f"quickstart.{ext}"), dpi=120)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.save_directory, exist_ok=True)
    from common.benchmark import environment, write_results

    env = environment("cpu", args.argv)  # the date and commit of the start, for --record
    start, cpu_start = time.time(), time.process_time()
    data = load_data()
    grid = [(m, a, s) for m in args.methods for a in args.alphas for s in args.seeds]
    runs = [train_one(data, args, m, a, s) for m, a, s in tqdm(grid, desc="runs", unit="run")]
    table = summarize(runs, args.alphas, args.methods)
    text = format_table(table, args)
    print(text)
    wall_time, cpu_time = time.time() - start, time.process_time() - cpu_start
    write_numbers(runs, table, text, args, wall_time)
    plot(runs, table, args)
    print(f"wrote {args.save_directory}/quickstart.{{png,pdf,csv,json}} and table.txt ({wall_time:.1f} s for data and "
          f"training, {cpu_time:.1f} s of CPU)")
    if args.record:
        paths = write_results(
            args.record, title="Offline quick start (scripts/quickstart.py)", table=f"```\n{text}\n```",
            raw={"summary": table, "wall_time_s": wall_time, "cpu_time_s": cpu_time, "runs": len(runs)},
            argv=args.argv,
            notes=[f"{len(runs)} runs ({len(args.methods)} methods x {len(args.alphas)} initial step sizes x "
                   f"{len(args.seeds)} seeds, {args.num_epochs} epochs each) in {wall_time:.1f} s of wall time and "
                   f"{cpu_time:.1f} s of CPU time ({args.threads} torch thread(s)), data loading and training."],
            env=env)
        print(f"recorded {paths[0]} and {paths[1]}")
    return table


if __name__ == "__main__":
    main()
