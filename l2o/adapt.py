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
Run control as for every experiment (docs/CONTRACTS.md): checkpoints after every epoch;
SIGTERM/SIGUSR1/Ctrl-C/--max-time stop at the next unroll with a checkpoint, and --resume continues
bit for bit; a non-finite meta-objective, loss or network weight ends the run as diverged (exit
code 3, the last finite checkpoint kept).
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
from l2o.learned import check_resumed_network, load_network, network_checkpoint, protocol_of
from l2o.meta import META_LOSSES, Trajectory, TruncatedBPTT, meta_test
from l2o.networks import build_network
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

    epoch, step, trajectories, history, initial = 0, 0, None, [], None  # step: meta-updates done
    state = run.resume(network, meta_optimizer)
    if state is not None:
        check_resumed_network(state, network)
        epoch, step, history, initial = state["epoch"], state["step"], state["history"], state["initial"]
        if state["trajectory"] is not None:
            trajectories = [Trajectory.from_state_dict(t, device) for t in state["trajectory"]]
        print(f"resumed {run.dir} at epoch {epoch + 1} (meta-step {step})", file=sys.stderr)
    else:
        initial = tested(0)
        run.log(initial, 0)

    def progress():  # a checkpoint's entries besides the network's weights and the meta-optimizer
        return {**network_checkpoint(network, None, args), "step": step, "epoch": epoch, "history": history,
                "initial": initial,
                "trajectory": [t.state_dict() for t in trajectories] if trajectories is not None else None}

    bar = run.progress(args.epochs * horizon, desc=f"adapting to {args.problem}", unit="step",
                       initial=epoch * horizon + (trajectories[0].step if trajectories is not None else 0))
    while epoch < args.epochs:
        if trajectories is None:  # the fixed optimizee, from its start
            trajectories = [Trajectory.start(network, task) for task in tasks]
        while trajectories[0].step < horizon:
            trajectories, metrics = method.meta_step(tasks, trajectories, args.unroll)
            metrics = {k: float(v) for k, v in metrics.items()}
            step += 1
            bar.update(args.unroll)
            run.check_finite(metrics, step)  # read anyway: a non-finite meta-objective ends the run at once
            if step % run.log_every == 0:
                run.log({"epoch": epoch + trajectories[0].step / horizon, **metrics}, step)
            if run.should_stop(step):
                return run.stop(progress(), f"at epoch {epoch + 1}, optimizee step {trajectories[0].step}")
        epoch, trajectories = epoch + 1, None
        history.append(tested(epoch))
        run.log(history[-1], step)
        run.checkpoint(progress())
    bar.close()
    final = history[-1] if history else initial
    run.finish({"final": final, "initial": initial, "meta_steps": step})
    print(f"{args.protocol} on {args.problem} (optimizee seed {args.optimizee_seed}): final loss of the fixed "
          f"optimizee {initial['adapt/final_loss']:.4g} -> {final['adapt/final_loss']:.4g} after {epoch} epochs; "
          f"network in {run.dir / 'checkpoint.pt'}")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
