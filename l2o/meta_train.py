"""Meta-train a learned optimizer: Sobotka et al. (2023) and M-L2O (spec l2o.md, sections 1 and 2).

    python3 l2o/meta_train.py --optimizee relu                       # Sobotka et al.'s preset (MNIST if present)
    python3 l2o/meta_train.py --preset cpu --run-name l2o-cpu        # a few minutes on a laptop CPU (digits)
    python3 l2o/meta_train.py --preset cpu --reg rescale --reg-beta 0.1 --run-name reg-rescale-0.1
    python3 l2o/meta_train.py --preset ml2o --run-name ml2o           # M-L2O: RNNprop, MAML on LASSO, curriculum
    python3 l2o/meta_train.py --preset ml2o --method l2o --run-name pretrained    # its plain pretraining

Every epoch runs --runs-per-epoch fresh optimizees (default initialisation, their own seed) for
--steps-per-run steps; every --unroll steps the method (--method) updates the network once:
l2o backpropagates the meta-loss of the window (--meta-loss; plus the symmetry penalty with --reg)
through the window's functional optimizee updates; ml2o is M-L2O's first-order MAML (support window,
one SGD step of --inner-lr on the network's weights, query window with the adapted weights). With
--problem (M-L2O's synthetic families) an optimizee run is one instance of every family of the
problem, and the meta-gradient is the mean over them. After each epoch the network is meta-tested
on --meta-test-runs fixed optimizees, and the weights with the lowest --meta-test-metric are kept as
"best" (what `LearnedOptimizer.from_checkpoint`, evaluate.py and adapt.py load). The meta-test of
the untrained network is logged at step 0 and kept in summary.json as "initial".

--curriculum H1,H2,...: M-L2O's curriculum of horizons (l2o.meta.Curriculum): optimizee runs of H1
steps meta-tested for H2 steps, moving on to the next horizon (from the stage's best network) once
a meta-test fails to improve after at least --curriculum-min-evals of them, and stopping when a
stage has none that improves; --steps-per-run and --meta-test-steps are then unused, "best" is the
best network of the last stage, and --epochs caps the length.

Run folder and run control as for every experiment (config.json, metrics.jsonl, checkpoint.pt,
summary.json; docs/CONTRACTS.md): checkpoints after every optimizee run (the network's weights as
the harness's "model", Adam as its "optimizer"); SIGTERM/SIGUSR1/Ctrl-C/--max-time stop at the next
unroll boundary with a checkpoint, and --resume continues bit for bit; a non-finite meta-objective,
loss or network weight ends the run as diverged (exit code 3, the last finite checkpoint kept).
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
from l2o.data import DATASETS, StepBatches
from l2o.flags import (
    add_network_args,
    add_optimizee_args,
    check_optimizee_args,
    load_optimizee_data,
    network_config,
)
from l2o.learned import check_resumed_network, network_checkpoint
from l2o.meta import (
    META_LOSSES,
    METHODS,
    REG_TARGETS,
    Curriculum,
    FirstOrderMAML,
    SymmetryPenalty,
    Trajectory,
    TruncatedBPTT,
    meta_test,
)
from l2o.networks import build_network
from l2o.problems import problem_tasks
from l2o.tasks import MLPTask, derived_seed, seeded_optimizee

ML2O_CURRICULUM = "100,200,500,1000,1500,2000,2500,3000"
# the presets; every value is a flag. "paper": Sobotka et al.'s notebook; "cpu": digits, minutes on a CPU;
# "ml2o": the M-L2O authors' meta-training (their evaluation period of 10 runs is an epoch here, their
# 20 evaluation runs the meta-test); "ml2o_cpu": the same, reduced to fit a CPU (see l2o/README.md)
PRESETS = {
    "paper": {"data": "auto", "epochs": 50, "runs_per_epoch": 20, "steps_per_run": 200, "unroll": 20,
              "meta_test_runs": 3, "meta_test_steps": 200},
    "cpu": {"data": "digits", "epochs": 12, "runs_per_epoch": 10, "steps_per_run": 100, "unroll": 20,
            "meta_test_runs": 3, "meta_test_steps": 100},
    "ml2o": {"problem": "lasso_train", "network": "rnnprop", "method": "ml2o", "meta_loss": "sum",
             "meta_test_metric": "final_loss", "curriculum": ML2O_CURRICULUM, "epochs": 1000, "runs_per_epoch": 10,
             "steps_per_run": 100, "unroll": 20, "meta_test_runs": 20, "meta_test_steps": 200},
    "ml2o_cpu": {"problem": "lasso_train", "network": "rnnprop", "method": "ml2o", "meta_loss": "sum",
                 "meta_test_metric": "final_loss", "curriculum": "100,200,500", "epochs": 12, "runs_per_epoch": 5,
                 "steps_per_run": 100, "unroll": 20, "meta_test_runs": 4, "meta_test_steps": 200},
}
BATCH_SIZE = 128
META_LR = 1e-3
INNER_LR = 1e-3  # M-L2O's inner SGD step on the network's weights
DATA_DIR = "./data"
META_TEST_SEED = 1_000_003  # meta-test optimizees: fixed per --seed, never used for training
THREADS = 1  # torch CPU threads: the nets are tiny, and more threads only contend on a shared CPU
META_TEST_METRICS = ("loss_sum", "final_loss")


def horizons(text: str) -> list[int] | None:
    if str(text).strip().lower() in ("", "none"):
        return None
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'none' or a comma list of step counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive step counts, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.ArgParser(description="Meta-train a learned optimizer (Sobotka et al. 2023; M-L2O).")
    g = parser.add_argument_group("meta-training")
    g.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="defaults of the flags below: " + "; ".join(
                       f"{k}: " + ", ".join(f"{n.replace('_', '-')} {v}" for n, v in p.items())
                       for k, p in PRESETS.items()))
    g.add_argument("--method", default=TruncatedBPTT.name, choices=sorted(METHODS),
                   help="meta-gradient method: l2o (truncated BPTT; M-L2O's plain pretraining) or ml2o "
                        "(M-L2O's first-order MAML)")
    g.add_argument("--epochs", type=int, help="meta-training epochs")
    g.add_argument("--runs-per-epoch", type=int, help="optimizee runs per epoch")
    g.add_argument("--steps-per-run", type=int, help="optimizee steps per run")
    g.add_argument("--unroll", type=int, help="optimizee steps per meta-update (truncation length)")
    g.add_argument("--meta-lr", type=float, default=META_LR, help="Adam's learning rate on the network's weights")
    g.add_argument("--meta-loss", default="log_sum", choices=sorted(META_LOSSES),
                   help="objective of an unroll's losses: log_sum (Sobotka et al.) or sum (M-L2O)")
    g.add_argument("--inner-lr", type=float, default=INNER_LR, help="ml2o: the inner SGD step on the network's weights")
    g.add_argument("--curriculum", type=horizons, default=None,
                   help=f"comma list of optimizee horizons, e.g. M-L2O's {ML2O_CURRICULUM} (none: fixed "
                        f"--steps-per-run)")
    g.add_argument("--curriculum-min-evals", type=int, default=3, help="meta-tests per curriculum stage at least")
    g.add_argument("--reg", default="none", choices=REG_TARGETS,
                   help="symmetry regularisation: add beta * sum_t |C(-u_t)| of this constraint (all: their mean)")
    g.add_argument("--reg-beta", type=float, default=0.1, help="[beta] weight of the symmetry regularisation")
    g.add_argument("--meta-test-runs", type=int, help="fixed optimizee runs of the meta-test after each epoch")
    g.add_argument("--meta-test-steps", type=int, help="steps of each meta-test run")
    g.add_argument("--meta-test-metric", default="loss_sum", choices=META_TEST_METRICS,
                   help="what picks the best network: the summed training loss of the meta-test runs (Sobotka "
                        "et al.) or their final loss (M-L2O)")
    add_network_args(parser)
    o = parser.add_argument_group("optimizee and data")
    add_optimizee_args(o, "(lasso_train: M-L2O's meta-training tasks)")
    o.add_argument("--data", choices=DATASETS,
                   help="auto: MNIST when in --data-dir, else digits28; mnist (downloaded when missing); "
                        "digits (8x8); digits28 (upsampled to 28x28)")
    o.add_argument("--data-dir", default=DATA_DIR, help="folder holding MNIST/raw/ (torchvision's layout)")
    o.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing MNIST")
    o.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="optimizee mini-batch size")
    o.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (0: torch's default)")
    harness.add_run_args(parser)
    parser.set_defaults(log_every=10)
    known, _ = parser.parse_known_args(argv)
    preset = known.preset if known.preset in PRESETS else "paper"
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    harness.require_positive(parser, args, "epochs", "runs_per_epoch", "steps_per_run", "unroll", "meta_test_runs",
                             "meta_test_steps", "batch_size", "curriculum_min_evals")
    for name in ("meta_lr", "reg_beta", "inner_lr"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    check_optimizee_args(parser, args)
    if args.method == FirstOrderMAML.name and args.reg != "none":
        parser.error(f"--reg {args.reg}: the symmetry regularisation is for --method l2o only")
    if args.problem is not None and args.reg != "none":
        parser.error(f"--reg {args.reg}: the synthetic problem {args.problem} has no network symmetries")
    args.network_config = network_config(parser, args)
    return args


def make_task(args, data, seed: int, device) -> MLPTask:
    """A fresh MLP optimizee run: default initialisation and batch order drawn from `seed`."""
    model = seeded_optimizee(args.optimizee, data.train_x[0].numel(), derived_seed(seed, 0), device)
    batches = StepBatches(data.train_x, data.train_y, args.batch_size, seed=derived_seed(seed, 1), device=device)
    return MLPTask(model, batches, (data.test_x, data.test_y))


def make_tasks(args, data, seed: int, device) -> list:
    """The tasks of one optimizee run: the MLP, or one instance of every family of --problem."""
    if args.problem is not None:
        return problem_tasks(args.problem, seed, device)
    return [make_task(args, data, seed, device)]


def build_method(args, network, meta_optimizer, penalty):
    if args.method == FirstOrderMAML.name:
        return FirstOrderMAML(network, meta_optimizer, args.meta_loss, args.inner_lr)
    return TruncatedBPTT(network, meta_optimizer, args.meta_loss, penalty)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = harness.start_run(args, "l2o_meta")
    if run.world_size > 1:
        raise harness.UsageError("l2o/meta_train.py runs on one device; start it with python3, not torchrun")
    device = run.device
    data = load_optimizee_data(args, device)

    network = build_network(args.network, args.network_config).to(device)  # seeded by start_run
    meta_optimizer = torch.optim.Adam(network.parameters(), lr=args.meta_lr)
    penalty = None
    if args.reg != "none":
        penalty = SymmetryPenalty(find_symmetries(make_task(args, data, 0, device).model), args.reg, args.reg_beta)
    method = build_method(args, network, meta_optimizer, penalty)
    test_tasks = [task for i in range(args.meta_test_runs)
                  for task in make_tasks(args, data, derived_seed(args.seed, META_TEST_SEED, i), device)]
    curriculum = Curriculum(args.curriculum, args.curriculum_min_evals) if args.curriculum else None
    select = f"meta_test/{args.meta_test_metric}"
    runs = args.runs_per_epoch

    def horizon() -> tuple[int, int]:
        """(steps of a training run, steps of a meta-test run) now."""
        if curriculum is None:
            return args.steps_per_run, args.meta_test_steps
        return curriculum.steps, curriculum.test_steps

    def tested(epoch: int) -> dict:
        record = {"epoch": epoch, **meta_test(network, test_tasks, horizon()[1])}
        return record if curriculum is None else {**record, "curriculum/horizon": curriculum.steps}

    epoch, index, step = 0, 0, 0  # next epoch, next optimizee run in it, meta-updates done
    trajectories, run_loss, run_sums = None, 0.0, []  # the optimizee run in progress; this epoch's run losses
    history, best, best_network, initial, converged = [], None, None, None, False
    state = run.resume(network, meta_optimizer)
    if state is not None:
        check_resumed_network(state, network)
        epoch, index, step = state["epoch"], state["run"], state["step"]
        if state["trajectory"] is not None:  # one per task
            trajectories = [Trajectory.from_state_dict(t, device) for t in state["trajectory"]]
        run_loss, run_sums = state["run_loss"], list(state["run_sums"])
        history, best, best_network, initial = state["history"], state["best"], state["best_network"], state["initial"]
        converged = state["converged"]
        if curriculum is not None:
            curriculum.load_state_dict(state["curriculum"])
        print(f"resumed {run.dir} at epoch {epoch + 1}, run {index + 1}/{runs} (meta-step {step})", file=sys.stderr)
    else:
        initial = tested(0)
        run.log(initial, 0)

    def progress():  # a checkpoint's entries besides the network's weights and the meta-optimizer
        return {**network_checkpoint(network, best_network, args), "step": step, "epoch": epoch, "run": index,
                "trajectory": [t.state_dict() for t in trajectories] if trajectories is not None else None,
                "run_loss": run_loss, "run_sums": run_sums, "history": history, "best": best, "initial": initial,
                "converged": converged, "curriculum": curriculum.state_dict() if curriculum is not None else None}

    def keep_best(record: dict) -> None:
        nonlocal best, best_network
        best = dict(record)
        best_network = {k: v.detach().clone() for k, v in network.state_dict().items()}

    while epoch < args.epochs and not converged:
        steps = horizon()[0]
        bar = run.progress(runs * steps, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", leave=False,
                           initial=index * steps + (trajectories[0].step if trajectories is not None else 0))
        while index < runs:
            tasks = make_tasks(args, data, derived_seed(args.seed, epoch, index), device)
            if trajectories is None:
                trajectories = [Trajectory.start(network, task) for task in tasks]
            while trajectories[0].step < steps:
                n = min(args.unroll, steps - trajectories[0].step)
                trajectories, metrics = method.meta_step(tasks, trajectories, n)
                metrics = {k: float(v) for k, v in metrics.items()}  # one host sync per unroll
                step, run_loss = step + 1, run_loss + metrics["train/loss"] * n
                bar.update(n)
                run.check_finite(metrics, step)  # read anyway: a non-finite meta-objective ends the run at once
                if step % run.log_every == 0:
                    run.log({"epoch": epoch + trajectories[0].step / steps / runs + index / runs, **metrics}, step)
                if run.should_stop(step):
                    return run.stop(progress(), f"at epoch {epoch + 1}, run {index + 1}/{runs}, optimizee step "
                                                f"{trajectories[0].step}")
            run_sums.append(run_loss)
            trajectories, run_loss, index = None, 0.0, index + 1
            run.checkpoint(progress())
        bar.close()

        record = {**tested(epoch + 1), "meta_train/loss_sum": sum(run_sums) / len(run_sums)}
        epoch, index, run_sums = epoch + 1, 0, []
        history.append(record)
        run.log(record, step)
        note = ""
        if curriculum is None:
            if best is None or record[select] < best[select]:
                keep_best(record)
        else:
            action = curriculum.record(record[select])
            if action == "improved":
                keep_best(record)
            elif action == "advance":  # from the stage's best network to the next horizon
                network.load_state_dict(best_network)
                curriculum.advance()
                keep_best(tested(epoch))
                curriculum.start_stage(best[select])
                run.log(best, step)
                note = f"; next horizon {curriculum.steps} steps (meta-test {curriculum.test_steps})"
            elif action == "stop":
                converged = True
                note = f"; no improvement in {curriculum.evals} meta-tests: done"
        if run.is_main:
            bar.write(f"epoch {epoch}/{args.epochs}  meta-train loss sum {record['meta_train/loss_sum']:.4g}  "
                      f"meta-test {args.meta_test_metric} {record[select]:.4g} (untrained {initial[select]:.4g}, "
                      f"best {best[select]:.4g})" + (f"  test acc {record['meta_test/test_acc']:.1f}%"
                                                      if "meta_test/test_acc" in record else "") + note)
        run.checkpoint(progress())
        if epoch < args.epochs and not converged and run.should_stop(step):
            return run.stop(progress(), f"after epoch {epoch}")

    summary = {"final": history[-1] if history else {}, "best": best or {}, "initial": initial, "meta_steps": step,
               "converged": converged}
    if curriculum is not None:
        summary["curriculum"] = {"stage": curriculum.stage, "horizon": curriculum.steps}
    run.finish(summary)
    print(f"best meta-test {args.meta_test_metric} {best[select]:.4g} (epoch {best['epoch']}), untrained "
          f"{initial[select]:.4g}; network in {run.dir / 'checkpoint.pt'}")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
