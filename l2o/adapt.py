"""Test-time adaptation of a learned optimizer to one fixed optimizee (M-L2O; spec l2o.md, section 2).

    python3 l2o/adapt.py --problem lasso_ood --checkpoint outputs/ml2o_meta/ml2o      # M-L2O
    python3 l2o/adapt.py --problem lasso_ood --checkpoint outputs/ml2o_meta/l2o       # transfer learning
    python3 l2o/adapt.py --problem lasso_ood                                          # vanilla L2O (from scratch)

The network of --checkpoint (a run folder of meta_train.py or of this script; without one, a fresh
--network seeded by --seed) is trained on one fixed instance of --problem (--optimizee-seed): every
epoch restarts that optimizee and runs --unrolls windows of --unroll steps, each followed by one
Adam step of --meta-lr on the meta-loss of the window (truncated BPTT, l2o.meta.TruncatedBPTT).
The authors' setting is the default: 10 epochs x 5 unrolls of 20 steps, Adam 1e-3, summed loss.

Metrics: meta/objective and train/loss per unroll; after every epoch (and at step 0, before any
adaptation) adapt/loss_sum and adapt/final_loss, the network (not trained) on the fixed optimizee
for --unrolls x --unroll steps. The run folder's checkpoint.pt holds the adapted network, so
evaluate.py --checkpoint and `LearnedOptimizer.from_checkpoint` take the run folder; config.json
records the pretraining's method, which names the protocol in figures (l2o.learned.protocol_of).
Checkpoints after every epoch; SIGTERM/SIGUSR1/--max-time stop at the next unroll with a checkpoint,
and --resume continues bit for bit.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common`, `l2o` without installing the repo

import torch

from common import harness
from l2o.flags import NETWORK_FLAGS, add_network_args, network_config
from l2o.learned import load_network, protocol_of
from l2o.meta import META_LOSSES, Trajectory, TruncatedBPTT, meta_test
from l2o.networks import build_network, network_record
from l2o.problems import PROBLEMS, problem_tasks

# the authors' adaptation (Meta_Adapt/train_rnnprop.py); every one is a flag
EPOCHS, UNROLLS, UNROLL = 10, 5, 20
META_LR = 1e-3
OPTIMIZEE_SEED = 0  # the fixed optimizee adapted on; evaluate.py tests on seeds 1-10
THREADS = 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.ArgParser(description="Adapt a learned optimizer to one fixed optimizee (M-L2O's test-time "
                                           "adaptation).")
    g = parser.add_argument_group("adaptation")
    g.add_argument("--problem", required=True, choices=list(PROBLEMS), help="the target problem")
    g.add_argument("--checkpoint", default=None,
                   help="the pretrained network: a run folder of l2o/meta_train.py (or its checkpoint.pt); "
                        "none: a fresh network (vanilla L2O)")
    g.add_argument("--network-weights", default="best", choices=("best", "last"),
                   help="the pretraining's best (by its meta-test) or last network")
    g.add_argument("--optimizee-seed", type=int, default=OPTIMIZEE_SEED,
                   help="seed of the fixed instance of --problem adapted on")
    g.add_argument("--epochs", type=int, default=EPOCHS, help="adaptation epochs (the optimizee restarts each)")
    g.add_argument("--unrolls", type=int, default=UNROLLS, help="unroll windows (meta-updates) per epoch")
    g.add_argument("--unroll", type=int, default=UNROLL, help="optimizee steps per window")
    g.add_argument("--meta-lr", type=float, default=META_LR, help="Adam's learning rate on the network's weights")
    g.add_argument("--meta-loss", default="sum", choices=sorted(META_LOSSES), help="objective of a window's losses")
    g.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (0: torch's default)")
    g.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # tests
    add_network_args(parser, default="rnnprop")
    harness.add_run_args(parser)
    parser.set_defaults(log_every=1)
    args = parser.parse_args(argv)
    harness.require_positive(parser, args, "epochs", "unrolls", "unroll")
    if not (math.isfinite(args.meta_lr) and args.meta_lr > 0):
        parser.error(f"--meta-lr must be a positive number, got {args.meta_lr}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.checkpoint is not None and args.checkpoint.strip().lower() == "none":
        args.checkpoint = None
    given = [f"--{k.replace('_', '-')}" for k in NETWORK_FLAGS if getattr(args, k) is not None]
    if args.checkpoint is not None and given:
        parser.error(f"{', '.join(given)}: the network comes from --checkpoint {args.checkpoint}")
    args.network_config = network_config(parser, args) if args.checkpoint is None else None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = harness.start_run(args, "l2o_adapt")
    device = run.device
    if args.checkpoint is None:
        network = build_network(args.network, args.network_config)  # seeded by start_run
        args.pretrained_method = None
    else:
        network, pretrained = load_network(args.checkpoint, args.network_weights)
        args.network = network.name
        args.pretrained_method = pretrained.get("method", "l2o")
        args.pretrained_problem = pretrained.get("problem")
    args.adapted = True
    args.protocol = protocol_of(vars(args))  # recorded in config.json
    network.to(device)
    meta_optimizer = torch.optim.Adam(network.parameters(), lr=args.meta_lr)
    method = TruncatedBPTT(network, meta_optimizer, args.meta_loss)
    tasks = problem_tasks(args.problem, args.optimizee_seed, device)
    horizon = args.unrolls * args.unroll

    def tested(epoch: int) -> dict:
        result = meta_test(network, tasks, horizon)
        return {"epoch": epoch, "adapt/loss_sum": result["meta_test/loss_sum"],
                "adapt/final_loss": result["meta_test/final_loss"]}

    epoch, meta_step, trajectories, history, initial = 0, 0, None, [], None
    state = run.load_checkpoint()
    if state is not None:
        network.load_state_dict(state["network"]["state_dict"])
        meta_optimizer.load_state_dict(state["meta_optimizer"])
        epoch, meta_step, history, initial = state["epoch"], state["meta_step"], state["history"], state["initial"]
        if state["trajectory"] is not None:
            trajectories = [Trajectory.from_state_dict(t, device) for t in state["trajectory"]]
        print(f"resumed {run.dir} at epoch {epoch + 1} (meta-step {meta_step})", file=sys.stderr)
    else:
        initial = tested(0)
        run.log(initial, 0)

    def checkpoint():
        run.save_checkpoint({
            "network": network_record(network), "best_network": None, "meta_optimizer": meta_optimizer.state_dict(),
            "epoch": epoch, "meta_step": meta_step, "history": history, "initial": initial,
            "trajectory": [t.state_dict() for t in trajectories] if trajectories is not None else None,
            "config": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
        })

    bar = run.progress(args.epochs * horizon, desc=f"adapting to {args.problem}", unit="step",
                       initial=epoch * horizon + (trajectories[0].step if trajectories is not None else 0))
    steps_here = 0
    while epoch < args.epochs:
        if trajectories is None:  # the fixed optimizee, from its start
            trajectories = [Trajectory.start(network, task) for task in tasks]
        while trajectories[0].step < horizon:
            trajectories, metrics = method.meta_step(tasks, trajectories, args.unroll)
            metrics = {k: float(v) for k, v in metrics.items()}
            meta_step, steps_here = meta_step + 1, steps_here + 1
            bar.update(args.unroll)
            if not math.isfinite(metrics["meta/objective"]):
                bar.close()
                run.close()
                print(f"error: adaptation diverged at meta-step {meta_step} (epoch {epoch + 1}): meta-objective "
                      f"{metrics['meta/objective']}; the last checkpoint is in {run.dir}", file=sys.stderr)
                return 1
            if meta_step % run.log_every == 0:
                run.log({"epoch": epoch + trajectories[0].step / horizon, **metrics}, meta_step)
            if run.should_stop() or steps_here == args.stop_after_steps:
                bar.close()
                checkpoint()
                run.close()
                why = run.stop_reason or f"--stop-after-steps {args.stop_after_steps}"
                print(f"stopped ({why}) at epoch {epoch + 1}, step {trajectories[0].step}; checkpoint saved in "
                      f"{run.dir}; continue with the same command plus --resume", file=sys.stderr)
                return 0
        epoch, trajectories = epoch + 1, None
        history.append(tested(epoch))
        run.log(history[-1], meta_step)
        checkpoint()
    bar.close()
    run.finish({"final": history[-1] if history else initial, "initial": initial, "meta_steps": meta_step})
    final = history[-1] if history else initial
    print(f"{args.protocol} on {args.problem} (optimizee seed {args.optimizee_seed}): final loss of the fixed "
          f"optimizee {initial['adapt/final_loss']:.4g} -> {final['adapt/final_loss']:.4g} after {epoch} epochs; "
          f"network in {run.dir / 'checkpoint.pt'}")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
