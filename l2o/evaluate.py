"""Train one optimizee with one optimizer and measure how the updates treat the network's symmetries.

    python3 l2o/evaluate.py --optimizer L2O --checkpoint outputs/l2o_meta/l2o-cpu --optimizee relu
    python3 l2o/evaluate.py --optimizer Adam --lr grid --optimizee relu_bn          # lr from the paper's grid
    python3 l2o/evaluate.py --optimizer SGD --momentum 0.9 --lr 0.1
    python3 l2o/evaluate.py --optimizer Lion --lr 1e-3
    python3 l2o/evaluate.py --optimizer LionSGD --lion-fraction 0.25 --optimizee sigmoid_100x100
    python3 l2o/evaluate.py --optimizer HF --alg-base AdamW --alg-meta Adam --alpha0 1e-4 --weight-decay-base 0
    python3 l2o/evaluate.py --optimizer L2O --checkpoint outputs/ml2o_adapt/ml2o-lasso --problem lasso_ood --seed 1

--optimizer: L2O (a meta-trained network, `--checkpoint` a run folder of l2o/meta_train.py), Adam,
SGD (with --momentum), Lion (betas 0.9, 0.99), LionSGD (the Lion-SGD interpolation), or any
--optimizer of the paper's experiments: HF (MetaOptimize with the --alg-base/--alg-meta/... flags),
AdamW, DoG, Prodigy, ... For Adam, SGD, Lion and AdamW, `--lr grid` picks the learning rate of the
paper's grid with the lowest summed training loss over --grid-runs runs of --grid-steps steps
(fixed optimizees, the same for every --seed).

--problem (M-L2O's synthetic problems, l2o/problems.py) replaces the MLP: --seed picks the fixed
instance (M-L2O tests on seeds 1-10; adapt.py adapts on seed 0), the loss is the problem's own
(no data, test split or symmetry probe; train/final_loss is the loss after the last step), and
config.json records the protocol of an L2O network (l2o_protocol: vanilla L2O, direct transfer,
transfer learning or M-L2O).

Metrics (metrics.jsonl, wandb): train/loss every step (the mini-batch loss before the update),
test/loss and test/acc every --eval-every steps, and from `common.diagnostics.SymmetryProbe`
the deviations sym/<kind>/grad and sym/<kind>/update every --probe-every steps, the tail index and
covariance of gradients and updates (noise/...) every --noise-every steps, and histograms of |u|
at --hist-steps. scripts/plot.py draws the paper's Figures 4, 5, 7, 8 and 9 from these runs.

Run control as for every experiment (docs/CONTRACTS.md): SIGTERM/SIGUSR1/Ctrl-C/--max-time stop
with a checkpoint and --resume continues bit for bit; a non-finite training loss, weight or step
size ends the run as diverged (exit code 3).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common`, `l2o` without installing the repo

import torch
import torch.nn.functional as F

from common import harness, runfolder
from common.diagnostics import HIST_STEPS, SymmetryProbe
from common.optim_flags import add_optimizer_args, check_hessian_args
from common.specs import build_optimizer, resolve_spec, spec_from_args
from l2o.data import DATASETS, StepBatches, as_float
from l2o.flags import add_optimizee_args, check_optimizee_args, load_optimizee_data
from l2o.learned import LearnedOptimizer, load_network, protocol_of
from l2o.lion_sgd import LionSGD
from l2o.problems import ProblemModel, problem_families, problem_tasks
from l2o.tasks import derived_seed, seeded_optimizee

# the paper's evaluation (spec l2o.md, section 1); every one is a flag
NUM_STEPS = 1000
BATCH_SIZE = 128
LR_GRID = "1e-4,5e-4,1e-3,5e-3,1e-2,5e-2,0.1,0.5,1,3"
GRID_RUNS, GRID_STEPS = 3, 500
GRID_SEED = 2_000_003  # the grid's optimizees: the same for every --seed, never an evaluation run
MOMENTUM = 0.9
LION_BETAS = (0.9, 0.99)
LION_SGD = {"lion_fraction": 0.5, "sgd_lr": 0.5, "lion_lr": 0.005}
EVAL_EVERY, PROBE_EVERY, NOISE_EVERY, NOISE_SAMPLES = 50, 10, 100, 16
THREADS = 1
# optimizers built here; any other --optimizer goes to common.specs.build_optimizer
OWN = {"l2o": "L2O", "adam": "Adam", "sgd": "SGD", "lion": "Lion", "lionsgd": "LionSGD"}
GRID_METHODS = {"Adam", "SGD", "Lion", "AdamW"}  # the ones with a learning rate to tune
GRID_CACHE = ".lr_grid"  # in --save-directory: grid results shared by the seeds of a configuration
# flags that do not change the grid's result
NOT_IN_GRID_KEY = {"seed", "run_name", "save_directory", "resume", "max_time", "device", "log_every", "wandb",
                   "wandb_project", "wandb_entity", "num_steps", "eval_every", "probe_every", "noise_every",
                   "noise_samples", "hist_steps", "threads", "stop_at_step", "start_over", "network_weights", "lr",
                   "data", "data_dir", "no_download", "compile", "amp"}


def lr_value(text: str):
    if str(text).strip().lower() == "grid":
        return "grid"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'grid' or a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected 'grid' or a positive number, got {text!r}")
    return value


def number_list(text: str, kind=float) -> list:
    try:
        values = [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def optimizer_spec(args, lr: float | None) -> dict:
    """The spec (common/specs.py) of a --optimizer of the paper's experiments, with this script's --lr
    (1e-3 while the grid has not chosen one); --base-optimizer and --base-args come with it."""
    return spec_from_args(args, optimizer=args.method, lr=lr if lr is not None else 1e-3)


def parse_args(argv=None) -> argparse.Namespace:
    # "resolve": the paper's optimizer flags are reused, with --optimizer and --lr redefined here
    parser = harness.ArgParser(description="Evaluate an optimizer (learned or not) on an MLP optimizee, with "
                                           "symmetry diagnostics (Sobotka et al. 2023), or on a synthetic problem "
                                           "(M-L2O).", conflict_handler="resolve")
    add_optimizer_args(parser)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--optimizer", dest="method", default="L2O",
                   help="L2O, Adam, SGD, Lion, LionSGD, or a --optimizer of the paper's experiments (HF = "
                        "MetaOptimize, AdamW, DoG, Prodigy, ...)")
    g.add_argument("--checkpoint", default=None, help="L2O: a run folder of l2o/meta_train.py (or its checkpoint.pt)")
    g.add_argument("--network-weights", default="best", choices=("best", "last"),
                   help="L2O: the meta-training's best (lowest meta-test loss) or last network")
    g.add_argument("--lr", type=lr_value, default="grid",
                   help="learning rate of Adam, SGD, Lion, AdamW, or 'grid' (the paper's grid search)")
    g.add_argument("--momentum", type=float, default=MOMENTUM, help="SGD and LionSGD momentum")
    g.add_argument("--lion-beta1", type=float, default=LION_BETAS[0], help="Lion and LionSGD beta1")
    g.add_argument("--lion-beta2", type=float, default=LION_BETAS[1], help="Lion and LionSGD beta2")
    g.add_argument("--lion-fraction", type=float, default=LION_SGD["lion_fraction"],
                   help="[lambda_L] LionSGD: weight of the Lion update (the SGD update gets 1 - lambda_L)")
    g.add_argument("--sgd-lr", type=float, default=LION_SGD["sgd_lr"], help="LionSGD: learning rate of the SGD part")
    g.add_argument("--lion-lr", type=float, default=LION_SGD["lion_lr"], help="LionSGD: learning rate of the Lion part")
    g.add_argument("--lr-grid", type=number_list, default=LR_GRID, help="learning rates tried by --lr grid")
    g.add_argument("--grid-runs", type=int, default=GRID_RUNS, help="--lr grid: runs per learning rate")
    g.add_argument("--grid-steps", type=int, default=GRID_STEPS, help="--lr grid: steps per run")
    o = parser.add_argument_group("optimizee and data")
    add_optimizee_args(o, "(lasso_ood, quadratic_ood, rosenbrock: M-L2O's targets)")
    o.add_argument("--data", default="auto", choices=DATASETS,
                   help="auto: MNIST when in --data-dir, else digits28; mnist (downloaded when missing); "
                        "digits (8x8); digits28 (upsampled to 28x28)")
    o.add_argument("--data-dir", default="./data", help="folder holding MNIST/raw/ (torchvision's layout)")
    o.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing MNIST")
    o.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="mini-batch size")
    o.add_argument("--num-steps", type=int, default=NUM_STEPS, help="optimizer steps")
    o.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="test loss and accuracy every this many steps")
    o.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (0: torch's default)")
    d = parser.add_argument_group("diagnostics")
    d.add_argument("--probe-every", type=int, default=PROBE_EVERY, help="symmetry deviations every this many steps")
    d.add_argument("--noise-every", type=int, default=NOISE_EVERY,
                   help="tail index and covariance every this many steps (0: never)")
    d.add_argument("--noise-samples", type=int, default=NOISE_SAMPLES, help="mini-batches per noise measurement")
    d.add_argument("--hist-steps", type=lambda t: number_list(t, int), default=",".join(map(str, HIST_STEPS)),
                   help="steps with a histogram of |u|")
    harness.add_run_args(parser)
    args = parser.parse_args(argv)
    harness.require_positive(parser, args, "batch_size", "num_steps", "eval_every", "probe_every", "grid_runs",
                             "grid_steps")
    if args.noise_every < 0 or args.noise_samples < 2 or args.threads < 0:
        parser.error("--noise-every must be >= 0, --noise-samples >= 2 and --threads >= 0")
    for name in ("momentum", "lion_beta1", "lion_beta2"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if not (0 <= args.lion_fraction <= 1 and args.sgd_lr > 0 and args.lion_lr > 0):
        parser.error("--lion-fraction must be in [0, 1] and --sgd-lr, --lion-lr > 0")
    check_optimizee_args(parser, args)
    if args.problem is not None and len(problem_families(args.problem)) > 1:
        parser.error(f"--problem {args.problem} is a training mix of {len(problem_families(args.problem))} families; "
                     f"evaluate on one problem")
    args.method = OWN.get(args.method.lower(), args.method)
    if args.method == "L2O" and not args.checkpoint:
        parser.error("--optimizer L2O needs --checkpoint (a run folder of l2o/meta_train.py)")
    if args.method not in OWN.values():
        try:
            check_hessian_args(args)
            spec = resolve_spec(optimizer_spec(args, args.lr if args.lr != "grid" else None))
        except ValueError as e:
            own = f" (or one of this script's own: {', '.join(OWN.values())})" if "--optimizer" in str(e) else ""
            parser.error(f"{e}{own}")
        if args.lr != "grid" or args.method not in GRID_METHODS:
            args.optimizer_spec = spec  # recorded in config.json (a grid's lr is chosen later)
    return args


def make_optimizer(args, params, lr, network=None) -> torch.optim.Optimizer:
    params = list(params)
    betas = (args.lion_beta1, args.lion_beta2)
    if args.method == "L2O":
        return LearnedOptimizer(params, network)
    if args.method == "Adam":
        return torch.optim.Adam(params, lr=lr)
    if args.method == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum)
    if args.method == "Lion":
        from lion_pytorch import Lion

        return Lion(params, lr=lr, betas=betas)
    if args.method == "LionSGD":
        return LionSGD(params, lion_fraction=args.lion_fraction, sgd_lr=args.sgd_lr, lion_lr=args.lion_lr,
                       momentum=args.momentum, betas=betas)
    return build_optimizer(params, optimizer_spec(args, lr))


def make_optimizee(args, data, seed: int, device):
    """(model, loss_fn): the optimizee of `seed` and its training loss at step t, `loss_fn(t)`."""
    if args.problem is not None:
        model = ProblemModel(problem_tasks(args.problem, seed, device)[0])
        return model, model
    model = seeded_optimizee(args.optimizee, data.train_x[0].numel(), derived_seed(seed, 0), device)
    batches = StepBatches(data.train_x, data.train_y, args.batch_size, seed=derived_seed(seed, 1), device=device)

    def loss_fn(t: int):
        x, y = batches(t)
        return F.nll_loss(model(x), y)

    return model, loss_fn


def train_loss_sum(args, data, lr, seed: int, num_steps: int, network, device) -> float:
    """Summed training loss of one short run (the grid search's score); inf when it diverges."""
    model, loss_fn = make_optimizee(args, data, seed, device)
    optimizer = make_optimizer(args, model.parameters(), lr, network)
    total = torch.zeros((), device=device)
    for t in range(num_steps):
        loss = loss_fn(t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    value = total.item()
    return value if math.isfinite(value) else math.inf


def grid_cache(args) -> tuple[dict, Path]:
    """The --lr grid's cache entry for these flags: (the flags that decide its result, its file)."""
    key = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in NOT_IN_GRID_KEY}, default=str))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return key, Path(args.save_directory) / GRID_CACHE / f"{args.method}-{args.problem or args.optimizee}-{digest}.json"


def tune_lr(args, data, run, network, device) -> tuple[float, dict]:
    """The paper's grid search: the lr with the lowest mean summed training loss.

    Its result depends on the configuration, not on --seed, so it is kept in
    <save-directory>/.lr_grid/ and reused by the other seeds of a sweep, and by a resumed run. By
    the run-folder rules (common/runfolder.py): written atomically (never a partial file), and
    computed once while concurrent runs of the same configuration wait for it (a lock per entry,
    which also makes removing a killed writer's temp file safe).
    """
    key, cache = grid_cache(args)
    folder = cache.parent
    with contextlib.suppress(OSError):  # a cache: without it the grid only costs time
        folder.mkdir(exist_ok=True)
    with runfolder.waiting_lock(cache.with_suffix(".lock"), "the lr grid"):
        runfolder.remove_stale_temp_files(folder, of=cache.name)
        try:
            cached = json.loads(cache.read_text())
            if cached["key"] == key:
                return cached["lr"], cached["scores"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        scores = {}
        bar = run.progress(len(args.lr_grid) * args.grid_runs, desc=f"{args.method} lr grid", unit="run", leave=False)
        for lr in args.lr_grid:
            sums = []
            for r in range(args.grid_runs):
                sums.append(train_loss_sum(args, data, lr, derived_seed(GRID_SEED, r), args.grid_steps, network, device))
                bar.update()
            scores[f"{lr:g}"] = sum(sums) / len(sums)
        bar.close()
        best = min(args.lr_grid, key=lambda lr: scores[f"{lr:g}"])
        if not math.isfinite(scores[f"{best:g}"]):
            raise harness.UsageError(f"--lr grid: {args.method} diverged at every learning rate of {args.lr_grid}")
        try:
            runfolder.write_json(cache, {"key": key, "lr": best, "scores": scores})
        except runfolder.RunFolderError as e:
            print(f"note: --lr grid: result not kept for other runs ({e})", file=sys.stderr)
    return best, scores


@torch.no_grad()
def test_metrics(model, x, y) -> dict:
    model.eval()
    out = model(x)
    model.train()
    return {"test/loss": F.nll_loss(out, y).item(), "test/acc": 100.0 * (out.argmax(1) == y).float().mean().item()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = harness.start_run(args, "l2o_eval")
    device = run.device
    data = load_optimizee_data(args, device)
    network = None
    if args.method == "L2O":
        network, meta = load_network(args.checkpoint, args.network_weights)
        network.to(device)
        # what the network was meta-trained with, for tables and figures (config.json)
        if args.problem is None:
            args.l2o_optimizee, args.l2o_dataset = meta.get("optimizee"), meta.get("dataset")
            args.l2o_reg, args.l2o_reg_beta = meta.get("reg", "none"), meta.get("reg_beta")
        else:
            args.l2o_network, args.l2o_protocol = network.name, protocol_of(meta)
            args.l2o_problem = meta.get("problem") if not meta.get("adapted") else meta.get("pretrained_problem")

    lr, grid = (args.lr if args.lr != "grid" else None), None
    if args.method in GRID_METHODS and args.lr == "grid":
        lr, grid = tune_lr(args, data, run, network, device)
        print(f"{args.method}: lr {lr:g} from the grid (mean summed training loss of {args.grid_runs} x "
              f"{args.grid_steps} steps: " + ", ".join(f"{k}: {v:.1f}" for k, v in grid.items()) + ")",
              file=sys.stderr)
    args.lr_used = lr  # recorded in config.json

    model, loss_fn = make_optimizee(args, data, args.seed, device)
    optimizer = make_optimizer(args, model.parameters(), lr, network)
    optimizee = args.problem or args.optimizee
    probe = None
    if data is not None:  # the MLP: test split and symmetry probe
        test_x, test_y = as_float(data.test_x), data.test_y
        noise_batches = StepBatches(data.train_x, data.train_y, args.batch_size, seed=derived_seed(args.seed, 2),
                                    device=device)

        def sample_losses():
            first = probe.step * args.noise_samples
            return [F.nll_loss(model(x), y) for x, y in map(noise_batches, range(first, first + args.noise_samples))]

        probe = SymmetryProbe(model, optimizer, every=args.probe_every, noise_every=args.noise_every,
                              sample_losses=sample_losses if args.noise_every else None, hist_steps=args.hist_steps)

    def evaluation() -> dict:
        if probe is None:  # a synthetic problem: its loss after the last step (train/loss is before each step)
            with torch.no_grad():
                return {"train/final_loss": loss_fn(step).item()}
        return test_metrics(model, test_x, test_y)

    step, loss_sum, last = 0, 0.0, {}
    state = run.resume(model, optimizer)
    if state is not None:
        if state["lr"] != lr:
            raise harness.UsageError(f"--resume: the run trained with lr {state['lr']}, these flags give {lr}; resume "
                                     f"with the flags the run started with (see {run.dir / 'config.json'})")
        if probe is not None:
            probe.load_state_dict(state["probe"])
        step, loss_sum, last = state["step"], state["loss_sum"], state["last"]
        print(f"resumed {run.dir} at step {step}", file=sys.stderr)
    elif probe is not None:
        last = evaluation()
        run.log(last, 0)

    def progress():  # a checkpoint's entries besides the optimizee's weights and the optimizer
        return {"step": step, "probe": probe.state_dict() if probe is not None else None, "loss_sum": loss_sum,
                "last": last, "lr": lr, "lr_grid": grid}

    model.train()
    bar = run.progress(args.num_steps, desc=f"{args.method} on {optimizee}", initial=step, unit="step")
    while step < args.num_steps:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step, value = step + 1, loss.item()
        bar.update()
        run.check_finite({"train/loss": value}, step)  # before the probe and the test look at the weights
        loss_sum += value
        record = {"train/loss": value, **(probe.pop() if probe is not None else {})}
        if step == args.num_steps or (probe is not None and step % args.eval_every == 0):
            last = evaluation()
            record.update(last)
        # the paper's optimizers: their step sizes every --log-every steps
        if args.method not in OWN.values() and run.is_log_step(step):
            run.log_step(optimizer, step, record)
        else:
            run.log(record, step)
        if step < args.num_steps and run.should_stop(step):
            return run.stop(progress(), f"at step {step}")
    bar.close()
    run.checkpoint(progress())
    run.finish({"final": {"train/loss_sum": loss_sum, **last}, "lr": lr, "lr_grid": grid})
    if probe is None:
        print(f"{args.method} on {optimizee} (seed {args.seed}): summed training loss {loss_sum:.4g}, final loss "
              f"{last['train/final_loss']:.4g}")
    else:
        print(f"{args.method} on {optimizee} ({args.dataset}): summed training loss {loss_sum:.2f}, test loss "
              f"{last['test/loss']:.4f}, test acc {last['test/acc']:.2f}%")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
