"""Sutton's (1992) Experiment 1: LMS, IDBD and MetaOptimize on a drifting linear target.

    python3 idbd/train.py                                    # IDBD, theta 0.01, alpha0 0.05, 5 seeds side by side
    python3 idbd/train.py --method lms --alpha0 0.04          # LMS: fixed-step SGD
    python3 idbd/train.py --method metaoptimize --alg-meta Adam --meta-stepsize 0.01 --momentum-param-meta .9
    python3 idbd/train.py --method metaoptimize --hessian hvp --meta-stepsize 0.01   # the full H h in the trace
    python3 idbd/train.py --num-examples 250000 --meta-stepsize 0.001 --log-every 2500 --run-name long  # Figure 4

The task (spec section 9): 20 inputs x ~ N(0, 1), target y = s.x with no noise; 5 relevant weights
s_i = +-1 (inputs 0-4), the other 15 are 0; every 20 examples one relevant weight, chosen at random,
flips its sign. One example per step, loss 1/2 (y - w.x)^2, weights start at 0. A run trains
--num-seeds learners side by side in one batched model, learner i on the task of seed --seed + i:
they share nothing (each has its own stream, weights, step sizes and optimizer state), so a run
costs about what one learner costs and its metrics are per seed.

--method sets the algorithm (given flags that contradict it are an error):
  lms           fixed-step SGD with step --alpha0 (MetaOptimize with --alg-meta fixed);
  idbd          IDBD: SGD base and meta, a step size per weight, the Hessian's diagonal (x_i^2) and
                the rectifier (1 - alpha x^2)^+ in the trace, theta = --meta-stepsize; in MetaOptimize's
                order (alpha from before this step's meta update, spec section 6);
  metaoptimize  any --alg-base / --alg-meta, Hessian-free (--hessian none, default) or with the
                Hessian-vector product (--hessian hvp); --stepsize-groups weightwise or scalar (one
                step size per learner).

Metrics (metrics.jsonl, wandb): every --log-every examples `train/loss` (the mean squared error
(y - w.x)^2 of those examples, mean over the seeds; `train/loss/seed<k>` per seed) and
`alpha/relevant`, `alpha/irrelevant` (the mean step size of the relevant and irrelevant inputs;
`/seed<k>` per seed); at the end `asymptotic_mse` (Sutton's measure: the mean squared error over
the last --measure-last examples), per seed as well, in the last record and summary.json. Figures:
scripts/plot.py (scripts/plot_idbd.py). The stream of each seed is a function of the seed and the
example index only: a run resumed with --resume matches an uninterrupted one.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common` without installing the repo

import torch

from common import harness
from common.data import epoch_generator
from common.optim_flags import add_optimizer_args
from common.specs import build_optimizer, spec_from_args

EXPERIMENT = "idbd"
# Sutton's Experiment 1 (spec section 9); every one is a flag
NUM_INPUTS = 20
NUM_RELEVANT = 5
FLIP_EVERY = 20
NOISE_STD = 0.0
NUM_EXAMPLES = 30_000  # 20,000 to wash out the transient, then 10,000 measured (Sutton 1992)
MEASURE_LAST = 10_000
NUM_SEEDS = 5
LOG_EVERY = 500
CHECKPOINT_EVERY = 10_000
CHUNK = 1000  # examples drawn at once (a function of (seed, chunk index))
DTYPE = torch.float64
# the paper's optimizer flags for this task: alpha0 = 0.05 as in Sutton, no weight decay, gamma 1
OPTIMIZER_DEFAULTS = dict(optimizer="HF", alpha0=0.05, meta_stepsize=0.01, gamma=1.0, weight_decay_base=0.0,
                          weight_decay_meta=0.0, normalizer_param_meta=0.999)
# what each --method fixes (the other optimizer flags are free)
METHODS = {
    "lms": dict(alg_base="SGD", alg_meta="fixed", hessian="none", rectify=False),
    "idbd": dict(alg_base="SGD", alg_meta="SGD", stepsize_groups="weightwise", hessian="block_diagonal",
                 rectify=True),
    "metaoptimize": {},
}
METHOD_DEFAULTS = {"metaoptimize": dict(alg_base="SGD", alg_meta="SGD", stepsize_groups="weightwise",
                                        hessian="none", rectify=False),
                   "lms": dict(stepsize_groups="scalar")}
GROUPS = ("weightwise", "scalar")


def parse_args(argv=None) -> argparse.Namespace:
    def make_parser():
        parser = harness.ArgParser(
            description="Sutton's (1992) tracking task with LMS, IDBD and MetaOptimize (spec section 9). "
                        "Paper symbols are in brackets; -1 leaves a hyperparameter unset.")
        g = parser.add_argument_group("tracking task")
        g.add_argument("--method", default="idbd", choices=list(METHODS),
                       help="lms (fixed step --alpha0), idbd (theta = --meta-stepsize), or metaoptimize (any "
                            "--alg-base/--alg-meta, --hessian none or hvp)")
        g.add_argument("--rectify", action="store_true",
                       help="IDBD's (1 - alpha x^2)^+ in the trace (needs --hessian block_diagonal, weightwise); "
                            "set by --method idbd")
        g.add_argument("--num-examples", type=int, default=NUM_EXAMPLES, help="examples (= steps) per run")
        g.add_argument("--measure-last", type=int, default=MEASURE_LAST,
                       help="asymptotic error: the mean squared error over this many last examples")
        g.add_argument("--num-seeds", type=int, default=NUM_SEEDS,
                       help="learners trained side by side, on the tasks of seeds --seed .. --seed + N - 1")
        g.add_argument("--num-inputs", type=int, default=NUM_INPUTS, help="inputs per example")
        g.add_argument("--num-relevant", type=int, default=NUM_RELEVANT,
                       help="inputs with a target weight of +-1 (the first ones); the others have 0")
        g.add_argument("--flip-every", type=int, default=FLIP_EVERY,
                       help="every this many examples one relevant target weight flips its sign")
        g.add_argument("--noise-std", type=float, default=NOISE_STD, help="std of Gaussian noise added to y")
        g.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, help="examples between checkpoints")
        add_optimizer_args(parser)
        harness.add_run_args(parser)
        parser.set_defaults(log_every=LOG_EVERY, **OPTIMIZER_DEFAULTS)
        return parser

    parser = make_parser()
    known, _ = parser.parse_known_args(argv)  # --method first: it sets the defaults of the flags it fixes
    method = known.method if known.method in METHODS else "idbd"
    parser.set_defaults(**METHODS[method], **METHOD_DEFAULTS.get(method, {}))
    args = parser.parse_args(argv)
    for key, value in METHODS[args.method].items():
        if getattr(args, key) != value:
            flag = "--" + key.replace("_", "-")
            parser.error(f"{flag} {getattr(args, key)} contradicts --method {args.method} ({flag} {value}); "
                         f"use --method metaoptimize for other settings")
    harness.require_positive(parser, args, "num_examples", "measure_last", "num_seeds", "num_inputs", "flip_every",
                             "checkpoint_every")
    if not 0 <= args.num_relevant <= args.num_inputs:
        parser.error(f"--num-relevant must be in [0, --num-inputs {args.num_inputs}], got {args.num_relevant}")
    if args.measure_last > args.num_examples:
        parser.error(f"--measure-last {args.measure_last} is more than --num-examples {args.num_examples}")
    if not (math.isfinite(args.noise_std) and args.noise_std >= 0):
        parser.error(f"--noise-std must be a finite number >= 0, got {args.noise_std}")
    if str(args.optimizer).lower() not in ("hf", "metaoptimize"):
        parser.error(f"--optimizer {args.optimizer}: this experiment runs MetaOptimize (HF) only; LMS is --method lms")
    if str(args.stepsize_groups).strip().lower() not in GROUPS:
        parser.error(f"--stepsize-groups {args.stepsize_groups}: accepted here: {', '.join(GROUPS)} (scalar: one step "
                     f"size per learner)")
    if args.amp != "none" or args.compile:
        parser.error("--amp and --compile do not apply: the learners are a float64 linear model")
    return harness.check_args(args)


# --------------------------------------------------------------------------------------
# The task: a stream of (x, y) per seed, a function of (seed, example index) only
# --------------------------------------------------------------------------------------


class TrackingTask:
    """The examples of learners on the task seeds `seeds`, CHUNK at a time.

    Chunk c of seed s comes from the generator of (s, c + 1): first the relevant weight that may flip
    at each example, then x, then the noise; the starting signs come from the generator of (s, 0). The
    flip before example t (0-based) happens when t > 0 and t % flip_every == 0."""

    def __init__(self, seeds, num_inputs, num_relevant, flip_every, noise_std, device):
        self.seeds, self.n, self.k = list(seeds), num_inputs, num_relevant
        self.flip_every, self.noise_std, self.device = flip_every, noise_std, device
        self._signs, self._next = None, None  # the target signs at the start of chunk self._next

    def _flips(self, g: torch.Generator, chunk: int) -> torch.Tensor:
        """(CHUNK, k) factors +-1: the sign changes before each example of the chunk."""
        which = torch.randint(0, max(self.k, 1), (CHUNK,), generator=g)
        t = torch.arange(chunk * CHUNK, (chunk + 1) * CHUNK)
        flip = (t > 0) & (t % self.flip_every == 0)
        factors = torch.ones(CHUNK, self.k, dtype=DTYPE)
        if self.k:
            factors[flip, which[flip]] = -1.0
        return factors

    def _signs_at(self, c: int) -> list[torch.Tensor]:
        if self._next != c:  # a fresh start or a resume: replay the flips before chunk c (one small draw each)
            self._signs = [torch.randint(0, 2, (self.k,), generator=epoch_generator(s, 0)).to(DTYPE) * 2 - 1
                           for s in self.seeds]
            for earlier in range(c):
                self._signs = [signs * self._flips(epoch_generator(s, earlier + 1), earlier).prod(0)
                               for s, signs in zip(self.seeds, self._signs)]
        return self._signs

    def chunk(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [CHUNK, seeds, inputs], y [CHUNK, seeds]) of examples c * CHUNK .. (c + 1) * CHUNK - 1."""
        xs, ys, after = [], [], []
        for seed, signs in zip(self.seeds, self._signs_at(c)):
            g = epoch_generator(seed, c + 1)
            signs_t = signs * torch.cumprod(self._flips(g, c), 0)  # [CHUNK, k]: the target at each example
            x = torch.randn(CHUNK, self.n, generator=g, dtype=DTYPE)
            y = (x[:, :self.k] * signs_t).sum(1)
            if self.noise_std:
                y = y + self.noise_std * torch.randn(CHUNK, generator=g, dtype=DTYPE)
            xs.append(x)
            ys.append(y)
            after.append(signs_t[-1])
        self._signs, self._next = after, c + 1
        return torch.stack(xs, 1).to(self.device), torch.stack(ys, 1).to(self.device)


def weight_step_sizes(optimizer, num_seeds: int, num_inputs: int) -> torch.Tensor:
    """[seeds, inputs]: the step size of every weight (one per learner broadcast for scalar groups)."""
    alpha = optimizer.step_sizes().detach()
    if alpha.numel() == num_seeds * num_inputs:
        return alpha.reshape(num_seeds, num_inputs)
    return alpha.reshape(num_seeds, 1).expand(num_seeds, num_inputs)


def optimizer_spec(args) -> dict:
    """The optimizer spec (common/specs.py) for the [seeds, inputs] weight: a scalar step size per
    learner is one per row (nodewise); with one block per learner, and the learners' losses summed,
    the block-diagonal Hessian term is exactly the full product (hvp). --base-optimizer works too."""
    spec = spec_from_args(args)
    if str(spec["stepsize_groups"]).strip().lower() == "scalar":
        spec["stepsize_groups"] = "nodewise"
        if spec.get("hessian") == "block_diagonal":
            spec["hessian"] = "hvp"
    return spec


def step_size_record(alpha: torch.Tensor, seeds: list[int], num_relevant: int) -> dict:
    """alpha/relevant and alpha/irrelevant (means over the inputs), per seed and averaged over the seeds."""
    record = {}
    for name, part in (("relevant", alpha[:, :num_relevant]), ("irrelevant", alpha[:, num_relevant:])):
        if part.shape[1] == 0:
            continue
        per_seed = part.mean(1).tolist()
        record[f"alpha/{name}"] = sum(per_seed) / len(per_seed)
        record.update({f"alpha/{name}/seed{s}": v for s, v in zip(seeds, per_seed)})
    return record


def per_seed(name: str, values: list[float], seeds: list[int]) -> dict:
    return {name: sum(values) / len(values), **{f"{name}/seed{s}": v for s, v in zip(seeds, values)}}


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    run = harness.start_run(args, EXPERIMENT)
    if run.world_size > 1:
        raise harness.UsageError("idbd/train.py trains on one process; start it with python3, not torchrun")
    device = run.device
    seeds = [args.seed + i for i in range(args.num_seeds)]
    task = TrackingTask(seeds, args.num_inputs, args.num_relevant, args.flip_every, args.noise_std, device)

    model = torch.nn.Linear(args.num_inputs, args.num_seeds, bias=False).to(device=device, dtype=DTYPE)
    torch.nn.init.zeros_(model.weight)  # row i: the weights of learner i
    w = model.weight
    optimizer = build_optimizer(model, optimizer_spec(args))
    scaler = harness.grad_scaler(args, device)  # disabled (no --amp): its calls pass through

    step = 0
    sq_window = torch.zeros(args.num_seeds, dtype=DTYPE, device=device)  # squared errors since the last log
    sq_measured = torch.zeros(args.num_seeds, dtype=DTYPE, device=device)  # ... of the last --measure-last
    window = 0
    state = run.resume(model, optimizer, None, scaler)
    if state is not None:
        step, window = state["step"], state["window"]
        sq_window.copy_(state["sq_window"])
        sq_measured.copy_(state["sq_measured"])
        print(f"resumed {run.dir} at example {step}/{args.num_examples}", file=sys.stderr)

    def progress():
        return {"step": step, "window": window, "sq_window": sq_window, "sq_measured": sq_measured}

    def final_metrics():  # Sutton's asymptotic error, and where the step sizes ended
        alpha = weight_step_sizes(optimizer, args.num_seeds, args.num_inputs)
        return {**per_seed("asymptotic_mse", (sq_measured / args.measure_last).tolist(), seeds),
                **step_size_record(alpha, seeds, args.num_relevant)}

    if state is None:  # the step sizes at the start (alpha0), so that their curves begin there
        alpha = weight_step_sizes(optimizer, args.num_seeds, args.num_inputs)
        run.log_step(optimizer, 0, step_size_record(alpha, seeds, args.num_relevant))
    measure_from = args.num_examples - args.measure_last  # examples with index >= this are measured
    bar = run.progress(args.num_examples, desc=f"{args.method} ({args.num_seeds} seeds)", initial=step)
    xs = ys = None
    while step < args.num_examples:
        c, i = divmod(step, CHUNK)
        if xs is None or i == 0:
            xs, ys = task.chunk(c)
        delta = ys[i] - (xs[i] * w).sum(1)  # [seeds]
        loss = 0.5 * delta.pow(2).sum()  # the learners' losses summed: each weight sees only its own
        harness.backward_and_step(loss, optimizer, scaler)
        with torch.no_grad():
            sq = delta.detach().square()
            sq_window += sq
            if step >= measure_from:
                sq_measured += sq
        step, window = step + 1, window + 1

        last = step == args.num_examples
        if step % args.log_every == 0 or last:
            record = {**per_seed("train/loss", (sq_window / window).tolist(), seeds),
                      **step_size_record(weight_step_sizes(optimizer, args.num_seeds, args.num_inputs), seeds,
                                         args.num_relevant)}
            if last:
                record.update(final_metrics())
            sq_window.zero_()
            window = 0
            if run.is_log_step(step):
                run.log_step(optimizer, step, record)
            else:
                run.log(record, step)
            bar.update(step - bar.n)
            bar.set_postfix_str(f"mse {record['train/loss']:.3g}", refresh=False)
        if step % args.checkpoint_every == 0 and not last:
            run.checkpoint(progress())
        if not last and run.should_stop(step):
            bar.close()
            return run.stop(progress(), f"at example {step}/{args.num_examples}")
    bar.close()

    run.checkpoint(progress())
    final = final_metrics()
    run.finish({"final": final, "seeds": seeds})
    spread = ""
    if len(seeds) > 1:
        values = [final[f"asymptotic_mse/seed{s}"] for s in seeds]
        mean = final["asymptotic_mse"]
        spread = f" +- {math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)):.4g} (std over seeds)"
    print(f"{args.method}: asymptotic MSE {final['asymptotic_mse']:.4g}{spread} over the last {args.measure_last} "
          f"of {args.num_examples} examples, {len(seeds)} seeds; step size of relevant inputs "
          f"{final.get('alpha/relevant', float('nan')):.3g}, irrelevant {final.get('alpha/irrelevant', float('nan')):.3g}")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
