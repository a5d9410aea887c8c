#!/usr/bin/env python3
"""The paper's figures and tables: the sweep files behind each one and the commands that rebuild it.

    python3 scripts/paper.py                 # the index: every figure and table, its sweeps, its command
    python3 scripts/paper.py --figure 2      # the commands of Figure 2: submit its sweeps, then plot
    python3 scripts/paper.py --table 2       # Table 2: its commands and the hyperparameters its sweeps run
    python3 scripts/paper.py --figure 1 --set slurm.partition=gpu --figures-dir paper_figures

Numbering follows the ICML 2025 version (Figures 1-11, Tables 1-5). The text in
shared/seeds/metaoptimize_paper.txt is the first arXiv version (Figures 1-5, Tables 1-3 in its
appendix); each entry's `source` says where its content is stated, and which numbers are inferred
rather than read from the ICML text.

Each sweep file's comments give the paper's values and every choice the paper leaves open. Submit
the sweeps (python3 scripts/sweep.py submit ...), wait for the runs, then run the plot and summarize
commands: they read the run folders under outputs/ (each sweep's save_directory) and write the
figures, named after the paper's figures, to --figures-dir.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "scripts" / "sweeps"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Item:
    kind: str  # "Figure" or "Table"
    number: int
    title: str
    sweeps: tuple[str, ...]  # sweep files (names in scripts/sweeps/) whose runs it shows
    commands: tuple[str, ...]  # what rebuilds it from the runs; {figures} is --figures-dir
    source: str  # where the paper states its content
    tuning: tuple[str, ...] = ()  # sweeps that chose its tuned values (not drawn)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.number}"


PLOT = "python3 scripts/plot.py"
SUMMARIZE = "python3 scripts/summarize.py"
LR_FREE_GRIDS = "lr,dog_reps_rel,mechanic_s_init"  # keys of the grids searched for one method

FIGURES = [
    Item("Figure", 1, "CIFAR-10, ResNet-18: test accuracy of (AdamW, Adam), (Lion, Lion), (RMSProp, Adam) and "
         "(SGDm, Adam), scalar and blockwise, against their bases with tuned fixed steps; a panel per base update",
         ("cifar10_combinations",),
         (f"{PLOT} outputs/cifar10_combinations --kind base-panels --metric test/acc "
          "--name figure1_cifar10_test_acc --title 'Figure 1: CIFAR-10, ResNet-18' --out {figures}",
          f"{SUMMARIZE} outputs/cifar10_combinations --metrics test/acc,train/loss"),
         "section 7.1.1 and Table 2; the issue's reading of the ICML figure (twelve lines, a panel per base)",
         tuning=("cifar10_baselines",)),
    Item("Figure", 2, "CIFAR-10: robustness of (Lion, Lion) scalar to alpha0 from 1e-9 to 1e-6: test accuracy per "
         "alpha0, final accuracy against alpha0 and the learned step sizes, the tuned fixed-step Lion as reference",
         ("cifar10_alpha0", "cifar10_combinations"),
         (f"{PLOT} outputs/cifar10_alpha0 outputs/cifar10_combinations/Lion-fixed-a0.0001-scalar-s* --kind alpha0 "
          "--metric test/acc --name figure2_cifar10_alpha0 --title 'Figure 2: CIFAR-10, (Lion, Lion) from several α0' --out {figures}",),
         "section 7.1.1; the alpha0 range (down to 1e-9) from the ICML figure as read in issue 19; the values "
         "between 1e-9 and 1e-6 are this project's choice (cifar10_alpha0.yaml)"),
    Item("Figure", 3, "CIFAR-10: blockwise step sizes of (SGDm, Adam), the six blocks on one axis",
         ("cifar10_combinations",),
         (f"{PLOT} outputs/cifar10_combinations --kind step-sizes --where alg_base=SGDm --where alg_meta=Adam "
          "--where stepsize_groups=resnet18_blocks --name figure3_cifar10_sgdm_adam_step_sizes --title 'Figure 3: CIFAR-10, (SGDm, Adam) blockwise step sizes' --out {figures}",),
         "Figure 3 and section 7.1.1 of the first arXiv version; its number in the ICML version is not confirmed"),
    Item("Figure", 4, "ImageNet, ResNet-18: test top-1 accuracy of (AdamW, Lion), (Lion, Lion) scalar and "
         "blockwise and (SGDm, Lion), against AdamW and Lion with tuned fixed steps and AdamW with a tuned cosine "
         "schedule (10k warm-up)",
         ("imagenet",),
         (f"{PLOT} outputs/imagenet --kind curves --metric test/acc --best-over lr "
          "--name figure4_imagenet_test_acc --title 'Figure 4: ImageNet, ResNet-18' --out {figures}",
          f"{SUMMARIZE} outputs/imagenet --metrics test/acc,test/acc5"),
         "section 7.1.2 and Table 3 (spec section 7)", tuning=("imagenet_baselines",)),
    Item("Figure", 5, "ImageNet: MetaOptimize (scalar) against the learning-rate-free baselines: DoG (best r_eps), "
         "Prodigy, Mechanic on SGDm, Lion and Adam (best s_init), gdtuo (Adam, Adam)",
         ("imagenet", "imagenet_lr_free"),
         (f"{PLOT} outputs/imagenet outputs/imagenet_lr_free --kind curves --metric test/acc "
          f"--where stepsize_groups=scalar --best-over {LR_FREE_GRIDS} --name figure5_imagenet_lr_free --title 'Figure 5: ImageNet, learning-rate-free baselines' --out {{figures}}",
          f"{SUMMARIZE} outputs/imagenet_lr_free --metrics test/acc,test/acc5"),
         "issue 19's reading of the ICML version (baselines and their protocols); spec section 7"),
    Item("Figure", 6, "TinyStories, llama2.c 15M: validation loss of (AdamW, Lion), (AdamW, Adam) and (Lion, Lion) "
         "against AdamW and Lion with tuned fixed steps, AdamW with a tuned cosine schedule (1k warm-up) and the "
         "learning-rate-free baselines (best of their grids)",
         ("tinystories", "tinystories_lr_free"),
         (f"{PLOT} outputs/tinystories outputs/tinystories_lr_free --kind curves --metric val/loss "
          f"--best-over {LR_FREE_GRIDS} --name figure6_tinystories_val_loss --title 'Figure 6: TinyStories, 15M model' --out {{figures}}",
          f"{SUMMARIZE} outputs/tinystories outputs/tinystories_lr_free --metrics val/loss,train/loss"),
         "section 7.2 and Table 5; the baselines as read in issue 19", tuning=("tinystories_baselines",)),
    Item("Figure", 7, "Continual CIFAR-100 (10 tasks, batch 1): accumulated online accuracy with the task switches, "
         "and the test accuracy at the end of each task; fixed-step AdamW against (AdamW, Adam), scalar and "
         "last layer / others",
         ("continual_cifar100",),
         (f"{PLOT} outputs/continual_cifar100 --kind task-end --name figure7_continual_cifar100 --title 'Figure 7: continual CIFAR-100' --out {{figures}}",
          f"{SUMMARIZE} outputs/continual_cifar100 --metrics online/acc,task/test_acc_mean,task/test_acc_last"),
         "spec section 7 (continual CIFAR-100); the end-of-task test accuracy as Figure 7 per issue 19",
         tuning=("continual_cifar100_baselines",)),
    Item("Figure", 8, "CIFAR-10: the blockwise step sizes of the four combinations, a panel per block",
         ("cifar10_combinations",),
         (f"{PLOT} outputs/cifar10_combinations --kind block-panels --where stepsize_groups=resnet18_blocks "
          "--name figure8_cifar10_block_step_sizes --title 'Figure 8: CIFAR-10, blockwise step sizes' --out {figures}",),
         "section 7.1.1 (the blocks' trends); per-block panels as read in issue 19"),
    Item("Figure", 9, "ImageNet: top-1 and top-5 accuracy, test and training",
         ("imagenet",),
         (f"{PLOT} outputs/imagenet --kind top1-top5 --best-over lr --name figure9_imagenet_top1_top5 --title 'Figure 9: ImageNet, top-1 and top-5' "
          "--out {figures}",),
         "issue 19's reading of the ICML version (train top-1 and top-5)"),
    Item("Figure", 10, "ImageNet and TinyStories: the learned step sizes of the MetaOptimize runs (every block "
         "on one axis, per run)",
         ("imagenet", "tinystories"),
         (f"{PLOT} outputs/imagenet --kind step-sizes --where optimizer=HF --name figure10_imagenet_step_sizes --title 'Figure 10: ImageNet step sizes' "
          "--out {figures}",
          f"{PLOT} outputs/tinystories --kind step-sizes --where optimizer=HF --name figure10_tinystories_step_sizes --title 'Figure 10: TinyStories step sizes' "
          "--out {figures}"),
         "not confirmed: the content of the ICML version's Figure 10 is not in the repository's seeds; "
         "the step-size trajectories of Figures 4 and 6 are this project's reading"),
    Item("Figure", 11, "TinyStories: training loss of every run, each learning-rate-free configuration of its "
         "grid on its own line (DoG per r_eps, Mechanic per base and s_init)",
         ("tinystories", "tinystories_lr_free"),
         (f"{PLOT} outputs/tinystories outputs/tinystories_lr_free --kind curves --metric train/loss "
          "--name figure11_tinystories_train_loss --title 'Figure 11: TinyStories, every learning-rate-free run' --out {figures}",),
         "TinyStories with the learning-rate-free baselines per issue 19 (Figures 6/11); that Figure 11 shows "
         "every grid point and the training loss is not confirmed"),
]

TABLES = [
    Item("Table", 1, "Overhead against AdamW: time per training iteration and peak memory of MetaOptimize and "
         "the learning-rate-free baselines on the ImageNet ResNet-18 and the TinyStories 15M model",
         (),
         ("python3 scripts/bench_overhead.py --device cuda",),
         "issue 19's reading of the ICML Table 1 (time per iteration and extra memory against AdamW)"),
    Item("Table", 2, "CIFAR-10 hyperparameters (and the fixed-step grid that tuned the baselines)",
         ("cifar10_combinations",),
         ("python3 scripts/paper.py --table 2", f"{SUMMARIZE} outputs/cifar10_baselines --metrics test/acc"),
         "Appendix C, Table 1 of the first arXiv version (Table 2 in the ICML version)",
         tuning=("cifar10_baselines",)),
    Item("Table", 3, "ImageNet hyperparameters (and the fixed-step grid that tuned the baselines)",
         ("imagenet",),
         ("python3 scripts/paper.py --table 3", f"{SUMMARIZE} outputs/imagenet_baselines --metrics test/acc"),
         "Appendix C, Table 2 of the first arXiv version (Table 3 in the ICML version)",
         tuning=("imagenet_baselines",)),
    Item("Table", 4, "Continual CIFAR-100 hyperparameters (and the fixed-step grid)",
         ("continual_cifar100",),
         ("python3 scripts/paper.py --table 4",
          f"{SUMMARIZE} outputs/continual_cifar100_baselines --metrics online/acc,task/test_acc_mean"),
         "spec section 7; that the ICML version's Table 4 is this one is not confirmed",
         tuning=("continual_cifar100_baselines",)),
    Item("Table", 5, "TinyStories hyperparameters (and the fixed-step grid); the table lists (AdamW, Adam), the "
         "text (AdamW, Lion): both are run",
         ("tinystories",),
         ("python3 scripts/paper.py --table 5", f"{SUMMARIZE} outputs/tinystories_baselines --metrics val/loss"),
         "Appendix C, Table 3 of the first arXiv version (Table 5 in the ICML version)",
         tuning=("tinystories_baselines",)),
]
ITEMS = FIGURES + TABLES

# hyperparameter columns of Tables 2-5: (header, flag)
HYPER_COLUMNS = [("optimizer", "optimizer"), ("base", "alg-base"), ("meta", "alg-meta"),
                 ("step sizes", "stepsize-groups"), ("rho", "momentum-param-base"), ("lambda", "normalizer-param-base"),
                 ("kappa", "weight-decay-base"), ("c", "Lion-beta2-base"), ("rho_bar", "momentum-param-meta"),
                 ("lambda_bar", "normalizer-param-meta"), ("c_bar", "Lion-beta2-meta"), ("alpha0", "alpha0"),
                 ("eta", "meta-stepsize"), ("gamma", "gamma"), ("peak lr", "lr"), ("warm-up", "warmup-steps")]


def sweep_path(name: str) -> Path:
    return SWEEPS / f"{name}.yaml"


def read(name: str, overrides=()):
    from sweep import read_sweep

    return read_sweep(sweep_path(name), list(overrides))


def hyperparameter_table(names, overrides=()) -> str:
    """The distinct configurations the sweep files run, in the paper's symbols (- : not set or not used)."""
    from common.benchmark import markdown_table

    rows, seen = [], set()
    for name in names:
        for job in read(name, overrides).jobs:
            f = dict(job.flags)
            hf = f.get("optimizer", "HF") == "HF"
            fixed = f.get("alg-meta") == "fixed"
            row = []
            for _, flag in HYPER_COLUMNS:
                value = f.get(flag)
                if not hf and flag not in ("optimizer", "lr", "warmup-steps", "weight-decay-base",
                                           "momentum-param-base", "normalizer-param-base"):
                    value = None
                if hf and (flag in ("lr", "warmup-steps") or (fixed and flag in (
                        "stepsize-groups", "momentum-param-meta", "normalizer-param-meta", "Lion-beta2-meta",
                        "meta-stepsize", "gamma"))):
                    value = None
                if hf and not fixed and flag == "stepsize-groups" and value is None:
                    value = "scalar"  # train.py's default
                row.append("-" if value is None or value == -1 else f"{value:g}" if isinstance(value, float)
                           else str(value))
            if tuple(row) not in seen:
                seen.add(tuple(row))
                rows.append(row)
    return markdown_table([h for h, _ in HYPER_COLUMNS], rows)


def submit_command(name: str, overrides=()) -> str:
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    return f"python3 scripts/sweep.py submit scripts/sweeps/{name}.yaml{sets}"


def item_commands(item: Item, figures_dir: str, overrides=()) -> list[str]:
    """The shell lines that rebuild an item: submit its sweeps (tuning sweeps first), then its commands."""
    lines = [f"# {item.label}: {item.title}", f"# source: {item.source}"]
    for name in (*item.tuning, *item.sweeps):
        note = "  # tunes the fixed steps / schedule peaks (not drawn)" if name in item.tuning else ""
        lines.append(submit_command(name, overrides) + note)
    if item.sweeps or item.tuning:
        lines.append("# ... when the runs have finished:")
    lines += [c.replace("{figures}", shlex.quote(figures_dir)) for c in item.commands]
    return lines


def index_text(figures_dir: str) -> str:
    lines = ["The paper's figures and tables (ICML 2025 numbering), the sweep files behind each and the command "
             "that rebuilds it.", "python3 scripts/paper.py --figure N (or --table N) prints every command of one.", ""]
    for item in ITEMS:
        lines.append(f"{item.label}: {item.title}")
        counts = [f"{n}.yaml ({len(read(n).jobs)} runs)" for n in item.sweeps]
        if counts:
            lines.append("  sweeps:  " + ", ".join(counts))
        if item.tuning:
            lines.append("  tuning:  " + ", ".join(f"{n}.yaml ({len(read(n).jobs)} runs)" for n in item.tuning))
        lines.append("  rebuild: " + item.commands[0].replace("{figures}", shlex.quote(figures_dir)))
        for c in item.commands[1:]:
            lines.append("           " + c.replace("{figures}", shlex.quote(figures_dir)))
        lines.append(f"  source:  {item.source}")
        lines.append("")
    return "\n".join(lines)


def find(kind: str, number: int) -> Item | None:
    return next((item for item in ITEMS if item.kind == kind and item.number == number), None)


def main(argv=None) -> int:
    from sweep import ArgParser, SweepError

    p = ArgParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--figure", type=int, metavar="N", help="print the commands that rebuild Figure N")
    which.add_argument("--table", type=int, metavar="N",
                       help="print the commands that rebuild Table N (and the hyperparameters its sweeps run)")
    p.add_argument("--figures-dir", default="figures", help="folder the plot commands write the figures to")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every `sweep.py submit` line, e.g. slurm.partition=gpu (repeatable)")
    args = p.parse_args(argv)

    try:
        if args.figure is None and args.table is None:
            print(index_text(args.figures_dir))
            return 0
        kind, number = ("Figure", args.figure) if args.figure is not None else ("Table", args.table)
        item = find(kind, number)
        if item is None:
            numbers = ", ".join(str(i.number) for i in ITEMS if i.kind == kind)
            p.error(f"--{kind.lower()} {number}: the paper has no {kind} {number}; its {kind.lower()}s: {numbers}")
        print("\n".join(item_commands(item, args.figures_dir, args.set)))
        if item.kind == "Table" and item.sweeps:
            print(f"\n# the hyperparameters {', '.join(n + '.yaml' for n in item.sweeps)} run:")
            print(hyperparameter_table(item.sweeps, args.set))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
