"""Meta-train a learned optimizer (Sobotka et al. 2023; spec l2o.md, section 1).

    python3 l2o/meta_train.py --optimizee relu                       # the paper's preset (MNIST if present)
    python3 l2o/meta_train.py --preset cpu --run-name l2o-cpu        # a few minutes on a laptop CPU (digits)
    python3 l2o/meta_train.py --preset cpu --reg rescale --reg-beta 0.1 --run-name reg-rescale-0.1

Every epoch runs --runs-per-epoch fresh optimizees (default initialisation, their own seed) for
--steps-per-run steps; every --unroll steps the meta-loss of the window (log of the summed training
loss, plus the symmetry penalty with --reg) is backpropagated through the window's functional
optimizee updates and Adam updates the network. After each epoch the network is meta-tested on
--meta-test-runs fixed optimizees, and the weights with the lowest summed training loss are kept as
"best" (what `LearnedOptimizer.from_checkpoint` and evaluate.py load). The meta-test of the
untrained network is logged at step 0 and kept in summary.json as "initial".

Run folder as for every experiment (config.json, metrics.jsonl, checkpoint.pt, summary.json);
checkpoints after every optimizee run; SIGTERM/SIGUSR1/--max-time stop at the next unroll
boundary with a checkpoint, and --resume continues bit for bit.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common`, `l2o` without installing the repo

import torch

from common import harness
from common.diagnostics import find_symmetries
from l2o.data import DATASETS, StepBatches, load_dataset, resolve_dataset
from l2o.meta import META_LOSSES, METHODS, REG_TARGETS, SymmetryPenalty, Trajectory, TruncatedBPTT, meta_test
from l2o.networks import NETWORKS, PREPROC_P, build_network, network_record
from l2o.tasks import OPTIMIZEES, MLPTask, derived_seed, seeded_optimizee

# the presets; every value is a flag. "paper": the authors' notebook; "cpu": digits, minutes on a CPU
PRESETS = {
    "paper": {"data": "auto", "epochs": 50, "runs_per_epoch": 20, "steps_per_run": 200, "unroll": 20,
              "meta_test_runs": 3, "meta_test_steps": 200},
    "cpu": {"data": "digits", "epochs": 12, "runs_per_epoch": 10, "steps_per_run": 100, "unroll": 20,
            "meta_test_runs": 3, "meta_test_steps": 100},
}
OPTIMIZEE = "relu"
BATCH_SIZE = 128
META_LR = 1e-3
DATA_DIR = "./data"
META_TEST_SEED = 1_000_003  # meta-test optimizees: fixed per --seed, never used for training
THREADS = 1  # torch CPU threads: the nets are tiny, and more threads only contend on a shared CPU


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.ArgParser(description="Meta-train a coordinate-wise LSTM optimizer (Sobotka et al. 2023).")
    g = parser.add_argument_group("meta-training")
    g.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="defaults of the flags below: " + "; ".join(
                       f"{k}: " + ", ".join(f"{n.replace('_', '-')} {v}" for n, v in p.items())
                       for k, p in PRESETS.items()))
    g.add_argument("--method", default=TruncatedBPTT.name, choices=sorted(METHODS),
                   help="meta-gradient method (l2o: truncated BPTT over optimizee runs)")
    g.add_argument("--epochs", type=int, help="meta-training epochs")
    g.add_argument("--runs-per-epoch", type=int, help="optimizee runs per epoch")
    g.add_argument("--steps-per-run", type=int, help="optimizee steps per run")
    g.add_argument("--unroll", type=int, help="optimizee steps per meta-update (truncation length)")
    g.add_argument("--meta-lr", type=float, default=META_LR, help="Adam's learning rate on the network's weights")
    g.add_argument("--meta-loss", default="log_sum", choices=sorted(META_LOSSES),
                   help="objective of an unroll's losses: log_sum (the paper) or sum")
    g.add_argument("--reg", default="none", choices=REG_TARGETS,
                   help="symmetry regularisation: add beta * sum_t |C(-u_t)| of this constraint (all: their mean)")
    g.add_argument("--reg-beta", type=float, default=0.1, help="[beta] weight of the symmetry regularisation")
    g.add_argument("--meta-test-runs", type=int, help="fixed optimizee runs of the meta-test after each epoch")
    g.add_argument("--meta-test-steps", type=int, help="steps of each meta-test run")
    n = parser.add_argument_group("network")
    n.add_argument("--network", default="lstm", choices=sorted(NETWORKS), help="learned-optimizer network")
    n.add_argument("--hidden-size", type=int, default=20, help="LSTM hidden units")
    n.add_argument("--output-scale", type=float, default=0.1, help="update = output-scale * network output")
    n.add_argument("--preproc-p", type=float, default=PREPROC_P, help="[p] of the gradient preprocessing")
    o = parser.add_argument_group("optimizee and data")
    o.add_argument("--optimizee", default=OPTIMIZEE, choices=list(OPTIMIZEES), help="MLP trained by the optimizer")
    o.add_argument("--data", choices=DATASETS,
                   help="auto: MNIST when in --data-dir, else digits28; mnist (downloaded when missing); "
                        "digits (8x8); digits28 (upsampled to 28x28)")
    o.add_argument("--data-dir", default=DATA_DIR, help="folder holding MNIST/raw/ (torchvision's layout)")
    o.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing MNIST")
    o.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="optimizee mini-batch size")
    o.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (0: torch's default)")
    # for tests: stop as if SIGTERM arrived after this many meta-updates of this process
    g.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    harness.add_run_args(parser)
    parser.set_defaults(log_every=10)
    known, _ = parser.parse_known_args(argv)
    preset = known.preset if known.preset in PRESETS else "paper"
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    harness.require_positive(parser, args, "epochs", "runs_per_epoch", "steps_per_run", "unroll", "meta_test_runs",
                             "meta_test_steps", "batch_size", "hidden_size")
    for name in ("meta_lr", "reg_beta", "output_scale", "preproc_p"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    return args


def make_task(args, data, seed: int, device) -> MLPTask:
    """A fresh optimizee run: default initialisation and batch order drawn from `seed`."""
    model = seeded_optimizee(args.optimizee, data.train_x[0].numel(), derived_seed(seed, 0), device)
    batches = StepBatches(data.train_x, data.train_y, args.batch_size, seed=derived_seed(seed, 1), device=device)
    return MLPTask(model, batches, (data.test_x, data.test_y))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = harness.start_run(args, "l2o_meta")
    if run.world_size > 1:
        raise harness.UsageError("l2o/meta_train.py runs on one device; start it with python3, not torchrun")
    device = run.device
    args.dataset = resolve_dataset(args.data, args.data_dir)  # recorded in config.json
    data = load_dataset(args.dataset, args.data_dir, download=not args.no_download, device=device,
                        batch_size=args.batch_size)

    network = build_network(args.network, {"hidden_size": args.hidden_size, "output_scale": args.output_scale,
                                           "preproc_p": args.preproc_p}).to(device)  # seeded by start_run
    meta_optimizer = torch.optim.Adam(network.parameters(), lr=args.meta_lr)
    penalty = None
    if args.reg != "none":
        penalty = SymmetryPenalty(find_symmetries(make_task(args, data, 0, device).model), args.reg, args.reg_beta)
    method = TruncatedBPTT(network, meta_optimizer, args.meta_loss, penalty)
    test_tasks = [make_task(args, data, derived_seed(args.seed, META_TEST_SEED, i), device)
                  for i in range(args.meta_test_runs)]
    steps, runs = args.steps_per_run, args.runs_per_epoch

    def task_of(epoch: int, index: int) -> MLPTask:
        return make_task(args, data, derived_seed(args.seed, epoch, index), device)

    epoch, index, meta_step = 0, 0, 0  # next epoch, next optimizee run in it, meta-updates done
    trajectory, run_loss, run_sums = None, 0.0, []  # the optimizee run in progress; this epoch's run losses
    history, best, best_network, initial = [], None, None, None
    state = run.load_checkpoint()
    if state is not None:
        if state["network"]["config"] != network.config() or state["network"]["name"] != network.name:
            raise harness.UsageError(f"--resume: the checkpoint's network is {state['network']['name']} "
                                     f"{state['network']['config']}; resume with the same network flags")
        network.load_state_dict(state["network"]["state_dict"])
        meta_optimizer.load_state_dict(state["meta_optimizer"])
        epoch, index, meta_step = state["epoch"], state["run"], state["meta_step"]
        if state["trajectory"] is not None:
            trajectory = Trajectory.from_state_dict(state["trajectory"], device)
        run_loss, run_sums = state["run_loss"], list(state["run_sums"])
        history, best, best_network, initial = state["history"], state["best"], state["best_network"], state["initial"]
        print(f"resumed {run.dir} at epoch {epoch + 1}, run {index + 1}/{runs} (meta-step {meta_step})",
              file=sys.stderr)
    else:
        initial = {"epoch": 0, **meta_test(network, test_tasks, args.meta_test_steps)}
        run.log(initial, 0)

    def checkpoint():
        run.save_checkpoint({
            "network": network_record(network), "best_network": best_network,
            "meta_optimizer": meta_optimizer.state_dict(), "epoch": epoch, "run": index, "meta_step": meta_step,
            "trajectory": trajectory.state_dict() if trajectory is not None else None, "run_loss": run_loss,
            "run_sums": run_sums, "history": history, "best": best, "initial": initial,
            "config": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
        })

    steps_here = 0
    while epoch < args.epochs:
        bar = run.progress(runs * steps, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", leave=False,
                           initial=index * steps + (trajectory.step if trajectory is not None else 0))
        while index < runs:
            task = task_of(epoch, index)
            if trajectory is None:
                trajectory = Trajectory.start(network, task)
            while trajectory.step < steps:
                n = min(args.unroll, steps - trajectory.step)
                trajectory, metrics = method.meta_step(task, trajectory, n)
                metrics = {k: float(v) for k, v in metrics.items()}  # one host sync per unroll
                meta_step, steps_here, run_loss = meta_step + 1, steps_here + 1, run_loss + metrics["train/loss"] * n
                bar.update(n)
                if not math.isfinite(metrics["meta/objective"]):
                    bar.close()
                    run.close()
                    print(f"error: meta-training diverged at meta-step {meta_step} (epoch {epoch + 1}, run {index + 1}): "
                          f"meta-objective {metrics['meta/objective']}; the last checkpoint is in {run.dir}",
                          file=sys.stderr)
                    return 1
                if meta_step % run.log_every == 0:
                    run.log({"epoch": epoch + trajectory.step / steps / runs + index / runs, **metrics}, meta_step)
                if run.should_stop() or steps_here == args.stop_after_steps:
                    bar.close()
                    checkpoint()
                    run.close()
                    why = run.stop_reason or f"--stop-after-steps {args.stop_after_steps}"
                    print(f"stopped ({why}) at epoch {epoch + 1}, run {index + 1}/{runs}, step {trajectory.step}; "
                          f"checkpoint saved in {run.dir}; continue with the same command plus --resume",
                          file=sys.stderr)
                    return 0
            run_sums.append(run_loss)
            trajectory, run_loss, index = None, 0.0, index + 1
            checkpoint()
        bar.close()

        record = {"epoch": epoch + 1, "meta_train/loss_sum": sum(run_sums) / len(run_sums),
                  **meta_test(network, test_tasks, args.meta_test_steps)}
        epoch, index, run_sums = epoch + 1, 0, []
        history.append(record)
        if best is None or record["meta_test/loss_sum"] < best["meta_test/loss_sum"]:
            best = dict(record)
            best_network = {k: v.detach().clone() for k, v in network.state_dict().items()}
        run.log(record, meta_step)
        if run.is_main:
            bar.write(f"epoch {epoch}/{args.epochs}  meta-train loss sum {record['meta_train/loss_sum']:.2f}  "
                      f"meta-test loss sum {record['meta_test/loss_sum']:.2f} (untrained "
                      f"{initial['meta_test/loss_sum']:.2f}, best {best['meta_test/loss_sum']:.2f})  "
                      f"test acc {record.get('meta_test/test_acc', float('nan')):.1f}%")
        checkpoint()

    run.finish({"final": history[-1] if history else {}, "best": best or {}, "initial": initial,
                "meta_steps": meta_step})
    print(f"best meta-test loss sum {best['meta_test/loss_sum']:.3f} (epoch {best['epoch']}), untrained "
          f"{initial['meta_test/loss_sum']:.3f}; network in {run.dir / 'checkpoint.pt'}")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
