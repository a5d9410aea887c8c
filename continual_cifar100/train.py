"""Continual CIFAR-100 with MetaOptimize: the paper's non-stationary task (spec section 7).

    python3 continual_cifar100/train.py                             # (AdamW, Adam) scalar, gamma .999, alpha0 1e-4
    python3 continual_cifar100/train.py --stepsize-groups last_layer_and_others --run-name blocks
    python3 continual_cifar100/train.py --alg-meta fixed --run-name adamw-fixed   # fixed-step AdamW, alpha 1e-4
    python3 continual_cifar100/train.py --seeds 0,1,2,3,4 --run-name paper        # five seeds + mean/std summary

The 100 classes are permuted by the seed and cut into tasks of --classes-per-task classes. Each
task is one pass (--epochs-per-task) over its 5,000 training images at batch size 1, with
random crop (padding 4) + horizontal flip and no normalisation (pixels / 255). One shared
k-way head: the classes of every task are relabelled 0..k-1 (in split order), and nothing is
reset or signalled at a task switch.

Metrics (metrics.jsonl, wandb with --wandb): `online/acc` (%, predictions made before each
update, accumulated over every step since the first) every --acc-every steps and at each task
end; `task/train_acc` (the same over the task's steps) and `task/test_acc` (the task's test
images) at each task end; `step_size/block_i` every --log-every steps. Accuracies are percent.

Speed: each task's epoch is shuffled, augmented and scaled in one batched tensor op on the
device, so a step only slices a view; accuracy counts stay in device tensors and are read only
when logged. The order and augmentation depend only on (seed, task, epoch): a run resumed after
SIGTERM/SIGUSR1/--max-time (add --resume) matches an uninterrupted one. On a CPU, and above
all a shared one, set OMP_NUM_THREADS=1: at batch size 1 extra intra-op threads mostly wait
(`scripts/bench_continual.py --threads N` measures it on your machine).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common` without installing the repo

import torch
import torch.nn.functional as F

from common import harness, runfolder
from common.data import DatasetError, epoch_generator, load_cifar, normalize, random_crop_flip, split_classes
from common.models import ContinualCNN
from common.optim_flags import add_optimizer_args, build_optimizer, build_scheduler, eval_weights

EXPERIMENT = "continual_cifar100"
# the paper's continual setting (spec section 7); every one is a flag
CLASSES_PER_TASK = 10  # also 20
EPOCHS_PER_TASK = 1
BATCH_SIZE = 1
ACC_EVERY = 200  # online accuracy logged every 200 steps, as in the paper
LOG_EVERY = 200  # step sizes
EVAL_BATCH_SIZE = 1000
DATA_DIR = "./data"
MODELS = {"cnn": ContinualCNN}  # conv16-conv32-fc128-fc(k), spec section 7
# the paper's MetaOptimize run: AdamW (.9, .999, .1) base + Adam (.9, .999) meta, gamma .999, alpha0 1e-4
OPTIMIZER_DEFAULTS = dict(
    optimizer="HF", alg_base="AdamW", alg_meta="Adam", alpha0=1e-4, meta_stepsize=1e-3, gamma=0.999,
    stepsize_groups="scalar", weight_decay_base=0.1, momentum_param_base=0.9, normalizer_param_base=0.999,
    normalizer_param_meta=0.999, momentum_param_meta=0.9,
)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2,3,4, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers like 0,1,2,3,4, got {text!r}")
    return seeds


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.ArgParser(
        description="Continual CIFAR-100 (class-incremental tasks, batch size 1) with MetaOptimize "
                    "(Sharifnassab et al., ICML 2025). Paper symbols are in brackets; -1 leaves a "
                    "hyperparameter unset.")
    g = parser.add_argument_group("continual CIFAR-100")
    g.add_argument("--classes-per-task", type=int, default=CLASSES_PER_TASK,
                   help="classes per task (a divisor of 100: 10 tasks of 10 in the paper, also 20); the shared "
                        "head has this many outputs")
    g.add_argument("--num-tasks", type=int, default=None, help="train on the first N tasks only (default: all)")
    g.add_argument("--epochs-per-task", type=int, default=EPOCHS_PER_TASK, help="passes over each task's images")
    g.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="mini-batch size (1 in the paper)")
    g.add_argument("--model", default="cnn", choices=sorted(MODELS), help="network (cnn: the spec's small CNN)")
    g.add_argument("--data-dir", default=DATA_DIR, help="folder holding cifar-100-python/ (downloaded when missing)")
    g.add_argument("--seeds", type=parse_seeds, default=None,
                   help="run these seeds in turn (e.g. 0,1,2,3,4) into <run-name>/seed<k>/ and write "
                        "<run-name>/seeds_summary.json with mean and std; overrides --seed")
    g.add_argument("--acc-every", type=int, default=ACC_EVERY, help="log online accuracy every this many steps")
    g.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE, help="batch size of the test evaluation")
    add_optimizer_args(parser)
    harness.add_run_args(parser)
    parser.set_defaults(log_every=LOG_EVERY, **OPTIMIZER_DEFAULTS)
    args = parser.parse_args(argv)
    harness.require_positive(parser, args, "classes_per_task", "epochs_per_task", "batch_size", "acc_every", "eval_batch_size")
    if 100 % args.classes_per_task:
        parser.error(f"--classes-per-task must divide the 100 classes (e.g. 5, 10, 20, 25, 50), "
                     f"got {args.classes_per_task}")
    num_tasks = 100 // args.classes_per_task
    if args.num_tasks is not None and not 1 <= args.num_tasks <= num_tasks:
        parser.error(f"--num-tasks must be in [1, {num_tasks}] with --classes-per-task {args.classes_per_task}, "
                     f"got {args.num_tasks}")
    harness.check_args(args)
    harness.check_stepsize_groups(args, lambda: MODELS[args.model](num_classes=args.classes_per_task))
    return args


# --------------------------------------------------------------------------------------
# Tasks, labels and the per-task data stream
# --------------------------------------------------------------------------------------


def task_split(num_classes: int, classes_per_task: int, seed: int, num_tasks: int | None = None) -> list[list[int]]:
    """The classes of each task: a seeded permutation of the classes cut into tasks (first `num_tasks`)."""
    tasks = split_classes(num_classes, classes_per_task, seed)
    return tasks if num_tasks is None else tasks[:num_tasks]


def remap_labels(y: torch.Tensor, classes: list[int], num_classes: int = 100) -> torch.Tensor:
    """Label of the shared head: classes[j] -> j; -1 for a class outside the task."""
    lookup = torch.full((num_classes,), -1, dtype=torch.int64, device=y.device)
    lookup[torch.as_tensor(classes, device=y.device)] = torch.arange(len(classes), device=y.device)
    return lookup[y]


def task_subset(x: torch.Tensor, y: torch.Tensor, classes: list[int], num_classes: int = 100):
    """The images of the task's classes (in dataset order) and their labels remapped to 0..k-1."""
    labels = remap_labels(y, classes, num_classes)
    keep = labels >= 0
    return x[keep], labels[keep]


def epoch_stream(x_uint8: torch.Tensor, y: torch.Tensor, seed: int, key: int):
    """One epoch of a task, shuffled and augmented in one go: (float images in [0, 1], labels), on x's device.

    Depends only on (seed, key) (key = task * epochs_per_task + epoch): random order, random crop
    with padding 4 and horizontal flip, no normalisation (pixels / 255). A step slices a view.
    """
    g = epoch_generator(seed, key)
    order = torch.randperm(len(y), generator=g).to(y.device)
    x = random_crop_flip(x_uint8[order], g, padding=4)
    return normalize(x, 0.0, 1.0), y[order]


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def train_step(model, optimizer, scaler, x, y, hits, loss_sum, args) -> None:
    """One optimizer step on (x, y); adds the correct predictions (made before the update) to every
    entry of `hits` and the loss to `loss_sum`. Device tensors only: no host sync."""
    with harness.amp_context(args, x.device):
        out = model(x)
        loss = F.cross_entropy(out, y)
    harness.backward_and_step(loss, optimizer, scaler)
    with torch.no_grad():
        hits.add_((out.argmax(1) == y).sum())
        loss_sum.add_(loss.detach().float())


def accuracy(correct: float, count: int) -> float:
    """Percent correct; nan for no examples."""
    return 100.0 * correct / count if count else float("nan")


@torch.no_grad()
def evaluate(model, optimizer, x_uint8, y, args) -> float:
    """Test accuracy (%) of the shared head on one task's images (labels already remapped)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    with eval_weights(optimizer):
        for lo in range(0, len(y), args.eval_batch_size):
            x = normalize(x_uint8[lo:lo + args.eval_batch_size], 0.0, 1.0)
            with harness.amp_context(args, x.device):
                out = model(x)
            correct += (out.argmax(1) == y[lo:lo + args.eval_batch_size]).sum()
    model.train()
    return accuracy(correct.item(), len(y))


def task_lengths(data, tasks, args) -> list[int]:
    """Optimizer steps of each task; checks that every task has training and test images."""
    train_count = torch.bincount(data.train_y, minlength=data.num_classes).tolist()
    test_count = torch.bincount(data.test_y, minlength=data.num_classes).tolist()
    steps = []
    for t, classes in enumerate(tasks):
        n_train, n_test = sum(train_count[c] for c in classes), sum(test_count[c] for c in classes)
        if not n_train or not n_test:
            raise DatasetError(f"cifar100: task {t} (classes {classes}) has {n_train} training and {n_test} test "
                               f"images; every task needs both (is {args.data_dir} the full CIFAR-100?)")
        steps.append(args.epochs_per_task * math.ceil(n_train / args.batch_size))
    return steps


def train(args) -> dict | None:
    """One run (one seed). Returns its final metrics, or None when it stopped early with a checkpoint."""
    run = harness.start_run(args, EXPERIMENT)
    if run.world_size > 1:
        raise harness.UsageError("continual_cifar100/train.py trains on one device; start it with python3")
    device = run.device

    data = load_cifar("cifar100", args.data_dir)
    tasks = task_split(data.num_classes, args.classes_per_task, args.seed, args.num_tasks)
    steps_per_task = task_lengths(data, tasks, args)
    total_steps = sum(steps_per_task)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)

    model = MODELS[args.model](num_classes=args.classes_per_task).to(device)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, total_steps=total_steps)
    scaler = harness.grad_scaler(args, device)
    fmodel = harness.maybe_compile(model, args)  # the forward pass; `model` is what we save

    step, seen, task_seen = 0, 0, 0  # optimizer steps, images since the start, images of this task
    hits = torch.zeros(2, dtype=torch.int64, device=device)  # correct since the start, in this task
    loss_sum = torch.zeros((), device=device)  # training loss summed since the last online/acc line
    window = 0  # steps in loss_sum
    history = []  # one record per finished task
    state = run.resume(model, optimizer, scheduler, scaler)
    if state is not None:
        step, seen, task_seen, window = state["step"], state["seen"], state["task_seen"], state["window"]
        hits.copy_(state["hits"])
        loss_sum.copy_(state["loss_sum"])
        history = state["history"]
        print(f"resumed {run.dir} at step {step}/{total_steps}", file=sys.stderr)
    else:
        print(f"{len(tasks)} tasks of {args.classes_per_task} classes (seed {args.seed}): {tasks}", file=sys.stderr)

    def progress():  # a checkpoint's entries besides the training state
        return {"step": step, "seen": seen, "task_seen": task_seen, "window": window, "hits": hits,
                "loss_sum": loss_sum, "history": history}

    def online_record(t):  # reads the device counters: once per log line
        nonlocal window
        record = {"task": t, "online/acc": accuracy(hits[0].item(), seen)}
        if window:  # mean training loss since the last line
            record["train/loss"] = loss_sum.item() / window
            loss_sum.zero_()
            window = 0
        return record

    model.train()
    bar = run.progress(total_steps, desc="steps", initial=step)
    t_log, start = time.monotonic(), 0  # `start`: first step of task t
    for t, classes in enumerate(tasks):
        end = start + steps_per_task[t]
        if t < len(history):  # finished before a resume
            start = end
            continue
        x_t, y_t = task_subset(train_x, train_y, classes, data.num_classes)
        per_epoch = math.ceil(len(y_t) / args.batch_size)
        for epoch in range((step - start) // per_epoch, args.epochs_per_task):
            xs, ys = epoch_stream(x_t, y_t, args.seed, t * args.epochs_per_task + epoch)
            first = (step - start) - epoch * per_epoch  # > 0 only right after a resume
            for b in range(first, per_epoch):
                lo, hi = b * args.batch_size, min((b + 1) * args.batch_size, len(ys))
                train_step(fmodel, optimizer, scaler, xs[lo:hi], ys[lo:hi], hits, loss_sum, args)
                if scheduler is not None:
                    scheduler.step()
                step, window = step + 1, window + 1
                seen, task_seen = seen + hi - lo, task_seen + hi - lo
                if step % args.acc_every == 0:
                    record = online_record(t)
                    now = time.monotonic()
                    record["images_per_s"] = args.acc_every * args.batch_size / max(now - t_log, 1e-9)
                    t_log = now
                    bar.update(step - bar.n)
                    bar.set_postfix_str(f"task {t + 1}/{len(tasks)} online acc {record['online/acc']:.1f}%",
                                        refresh=False)
                else:
                    record = None
                if run.is_log_step(step):
                    run.log_step(optimizer, step, record)
                elif record:
                    run.log(record, step)
                if step < end and run.should_stop(step):  # at a task's last step, stop after its evaluation
                    bar.close()
                    run.stop(progress(), f"at step {step}/{total_steps} (task {t + 1}/{len(tasks)})")
                    return None
            del xs, ys

        # end of task t: accuracy over its training steps and on its test images
        x_test, y_test = task_subset(test_x, test_y, classes, data.num_classes)
        test_acc = evaluate(fmodel, optimizer, x_test, y_test, args)
        record = online_record(t)
        record.update({"task/train_acc": accuracy(hits[1].item(), task_seen), "task/test_acc": test_acc})
        run.log(record, step)
        history.append(record)
        bar.update(step - bar.n)
        bar.write(f"task {t + 1}/{len(tasks)} (step {step}): train acc {record['task/train_acc']:.2f}%  test acc "
                  f"{test_acc:.2f}%  online acc {record['online/acc']:.2f}%")
        hits[1].zero_()
        task_seen = 0
        start = end
        run.checkpoint(progress())
        if t + 1 < len(tasks) and run.should_stop(step):
            bar.close()
            run.stop(progress(), f"after task {t + 1}/{len(tasks)}")
            return None
    bar.close()

    final = {
        "online/acc": history[-1]["online/acc"],  # the average over every step of the run
        "task/test_acc_mean": statistics.fmean(r["task/test_acc"] for r in history),
        "task/train_acc_mean": statistics.fmean(r["task/train_acc"] for r in history),
        "task/test_acc_last": history[-1]["task/test_acc"], "steps": step, "tasks": len(history),
    }
    best = max(history, key=lambda r: r["task/test_acc"])
    run.finish({"final": final, "best": {"task/test_acc": best["task/test_acc"], "task": best["task"]},
                "tasks": history, "task_classes": tasks})
    print(f"seed {args.seed}: average online accuracy {final['online/acc']:.2f}% over {step} steps, "
          f"average end-of-task test accuracy {final['task/test_acc_mean']:.2f}% over {len(history)} tasks")
    return final


# --------------------------------------------------------------------------------------
# Several seeds
# --------------------------------------------------------------------------------------


def seeds_summary(finals: dict[int, dict], diverged: dict[int, str] | None = None) -> dict:
    """Mean and standard deviation (n - 1; 0 for one seed) over the seeds that did not diverge, of
    every numeric final metric; `diverged` (seed -> why) is listed, never averaged in."""
    summary = {"seeds": list(finals), "diverged": {str(s): why for s, why in (diverged or {}).items()},
               "mean": {}, "std": {}, "per_seed": {str(s): f for s, f in finals.items()}}
    if finals:
        keys = [k for k, v in next(iter(finals.values())).items() if isinstance(v, (int, float))]
        summary["mean"] = {k: statistics.fmean(f[k] for f in finals.values()) for k in keys}
        summary["std"] = {k: statistics.stdev([f[k] for f in finals.values()]) if len(finals) > 1 else 0.0
                          for k in keys}
    return summary


def train_seeds(args) -> int:
    """--seeds: one run per seed in <save-directory>/<run-name>/seed<k>/, then seeds_summary.json there.

    A seed that diverges is recorded as such and the other seeds still run (exit code 3 at the end)."""
    if args.run_name is None:
        args.run_name = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parent = Path(args.save_directory) / args.run_name
    finals, diverged = {}, {}
    for seed in args.seeds:
        sub = copy.copy(args)
        sub.seed, sub.save_directory, sub.run_name = seed, str(parent), f"seed{seed}"
        if args.resume and runfolder.run_state(parent / sub.run_name) == "finished":
            finals[seed] = runfolder.read_summary(parent / sub.run_name)["final"]
            continue
        try:
            final = train(sub)
        except harness.Diverged as e:
            print(f"seed {seed}: {e}", file=sys.stderr)
            diverged[seed] = str(e)
            continue
        if final is None:
            return 0  # stopped with a checkpoint; rerun with --resume
        finals[seed] = final
    summary = seeds_summary(finals, diverged)
    runfolder.write_json(parent / "seeds_summary.json", summary)
    note = f"; diverged (left out): seeds {sorted(diverged)}" if diverged else ""
    if finals:
        m, s = summary["mean"], summary["std"]
        print(f"{len(finals)} seeds {list(finals)}: average online accuracy {m['online/acc']:.2f} +- "
              f"{s['online/acc']:.2f}%, average end-of-task test accuracy {m['task/test_acc_mean']:.2f} +- "
              f"{s['task/test_acc_mean']:.2f}% (mean +- std; {parent / 'seeds_summary.json'}){note}")
    else:
        print(f"every seed diverged: {sorted(diverged)} ({parent / 'seeds_summary.json'})")
    return harness.EXIT_DIVERGED if diverged else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.seeds is not None:
        return train_seeds(args)
    train(args)
    return 0


if __name__ == "__main__":
    harness.run_main(main)
