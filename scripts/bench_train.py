"""Training throughput of the CIFAR-10 setting: MetaOptimize (AdamW, Lion) against torch AdamW (fused).

    python3 scripts/bench_train.py --device cuda --steps 200 --repeats 5
    python3 scripts/bench_train.py --device cpu --steps 20 --repeats 3 --batch-size 100

Both optimizers train their own ResNet-18 (same initial weights) on synthetic CIFAR-shaped
uint8 tensors kept on the device and batched by `DeviceBatches`, exactly as cifar10/train.py
does (forward, backward, optimizer step, scheduler step, device-side loss/accuracy sums).
The repetitions are interleaved (A B, B A, A B, ...) in one process so that clock changes and
other load hit both alike. Prints images/s per optimizer (median over repetitions), the ratio
MetaOptimize / AdamW (median over adjacent pairs, target >= 0.97), and the projected time of
the paper's 60-epoch run. On a shared, noisy machine prefer many short repetitions.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from common import harness
from common.benchmark import environment, interleaved, markdown_table, sync, write_results
from common.data import DeviceBatches
from common.models import cifar_resnet18
from common.specs import build_optimizer, build_scheduler

TRAIN_IMAGES, TEST_IMAGES, EPOCHS = 50_000, 10_000, 60  # the paper's CIFAR-10 run


def parse_args(argv=None):
    parser = harness.ArgParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per repetition")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per optimizer (interleaved)")
    parser.add_argument("--step-repeats", type=int, default=20, help="timings of the optimizer step alone")
    parser.add_argument("--batch-size", type=int, default=100, help="mini-batch size (paper: 100)")
    parser.add_argument("--stepsize-groups", default="scalar", help="MetaOptimize blocks: scalar, resnet18_blocks")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast precision")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the initial weights")
    parser.add_argument("--record", default=None, metavar="STEM",
                        help="also write STEM.md and STEM.json (date, machine, command, table, raw rates)")
    args = parser.parse_args(argv)
    for flag in ("steps", "repeats", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    for flag in ("warmup", "step_repeats"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    return args


def optimizer_spec(name: str, groups: str) -> dict:
    """The paper's default flags (cifar10/train.py with no arguments) as a spec, for --optimizer `name`."""
    return {"optimizer": name, **({"stepsize_groups": groups} if name == "HF" else {})}


class Trainer:
    """One model + optimizer, stepping through the synthetic epoch like cifar10/train.py."""

    def __init__(self, name, opt_name, args, device, state):
        self.name = name
        self.model = cifar_resnet18().to(device)
        self.model.load_state_dict(state)
        spec = optimizer_spec(opt_name, args.stepsize_groups)
        self.opt = build_optimizer(self.model, spec)
        self.sched = build_scheduler(self.opt, spec, total_steps=10**9)
        self.scaler = harness.grad_scaler(args, device)
        self.net = harness.maybe_compile(self.model, args)
        self.args, self.device = args, device
        self.sums = torch.zeros(3, device=device)
        self.epoch = 0
        self.batches = None
        self.rates = []

    def run(self, data: DeviceBatches, steps: int) -> float:
        done = 0
        while done < steps:
            if self.batches is None:
                self.batches = data.epoch(self.epoch)
            for x, y in self.batches:
                with harness.amp_context(self.args, self.device):
                    out = self.net(x)
                    loss = F.cross_entropy(out, y)
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
                if self.sched is not None:
                    self.sched.step()
                with torch.no_grad():
                    self.sums[0] += loss.detach().float() * len(y)
                    self.sums[1] += (out.argmax(1) == y).sum()
                    self.sums[2] += len(y)
                done += 1
                if done == steps:
                    return done
            self.batches, self.epoch = None, self.epoch + 1
        return done


@torch.no_grad()
def eval_rate(model, data: DeviceBatches, device, args, batches: int) -> float:
    model.eval()
    sync(device)
    t, n = time.perf_counter(), 0
    for i, (x, _) in enumerate(data.epoch(0)):
        if i == batches:
            break
        with harness.amp_context(args, device):
            model(x)
        n += len(x)
    sync(device)
    model.train()
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.resolve_device(args.device)
    env = environment(device, argv)  # the date and commit of the start, for --record
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n = args.batch_size * (args.steps + args.warmup)
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    data = DeviceBatches(images, labels, args.batch_size, device=device, seed=args.seed)
    init = cifar_resnet18().state_dict()
    trainers = [Trainer("MetaOptimize (AdamW, Lion)", "HF", args, device, init),
                Trainer("torch AdamW", "AdamW", args, device, init)]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"batch {args.batch_size}, {args.steps} steps x {args.repeats} repetitions, amp {args.amp}, "
          f"compile {args.compile}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for t in trainers:  # warm-up: allocator, cudnn autotuning, compilation, optimizer state
        t.run(data, args.warmup)
    images = args.steps * args.batch_size
    timed = interleaved(
        {t.name: lambda t=t: t.run(data, args.steps) for t in trainers}, args.repeats, device,
        on_round=lambda r, timings: print(f"  repetition {r + 1}: " + ", ".join(
            f"{name} {images / v.wall[-1]:.1f} img/s" for name, v in timings.items())))
    for t in trainers:
        t.rates = [images / s for s in timed[t.name].wall]
    meta, adamw = (statistics.median(t.rates) for t in trainers)
    ratios = [a / b for a, b in zip(trainers[0].rates, trainers[1].rates)]
    for t in trainers:
        print(f"{t.name:28s} {statistics.median(t.rates):10.1f} img/s (median; min {min(t.rates):.1f}, "
              f"max {max(t.rates):.1f})")
    print(f"ratio MetaOptimize / AdamW: {statistics.median(ratios):.3f} (median of the {len(ratios)} paired "
          f"repetitions, range {min(ratios):.3f} to {max(ratios):.3f}; ratio of medians {meta / adamw:.3f}; "
          f"target >= 0.97)")
    def optimizer_step(t):
        t.scaler.step(t.opt)
        t.scaler.update()

    timed = interleaved({t.name: lambda t=t: optimizer_step(t) for t in trainers}, args.step_repeats, device)
    step_ms = {name: [1000 * s for s in v.wall] for name, v in timed.items()}  # the step alone, last gradients
    if args.step_repeats:
        print("optimizer step alone: " + ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in step_ms.items())
              + f"; a training step of batch {args.batch_size} takes {1000 * args.batch_size / adamw:.1f} ms with AdamW")
    ev = eval_rate(trainers[0].net, data, device, args, batches=min(len(data), 20))
    hours = EPOCHS * (TRAIN_IMAGES / meta + TEST_IMAGES / ev) / 3600
    print(f"projected {EPOCHS}-epoch CIFAR-10 run with MetaOptimize: {hours:.2f} h "
          f"({TRAIN_IMAGES / meta:.1f} s train + {TEST_IMAGES / ev:.1f} s test per epoch, eval {ev:.0f} img/s)")
    if args.record:
        rows = [[t.name, f"{statistics.median(t.rates):.1f}", f"{min(t.rates):.1f}", f"{max(t.rates):.1f}",
                 f"{statistics.median(step_ms[t.name]):.2f}" if args.step_repeats else "-"] for t in trainers]
        table = markdown_table(["optimizer", "images/s (median)", "min", "max", "step alone ms (median)"], rows)
        table += (f"\n\nratio MetaOptimize / torch AdamW (fused): {statistics.median(ratios):.3f} (median of "
                  f"{len(ratios)} paired repetitions, range {min(ratios):.3f} to {max(ratios):.3f}); projected "
                  f"{EPOCHS}-epoch run {hours:.2f} h")
        paths = write_results(args.record, title="CIFAR-10 training throughput (scripts/bench_train.py)", table=table,
                              raw={"rates": {t.name: t.rates for t in trainers}, "ratios": ratios,
                                   "step_ms": step_ms, "eval_images_per_s": ev, "projected_hours": hours},
                              device=device, env=env)
        print("recorded " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    harness.run_main(main)
