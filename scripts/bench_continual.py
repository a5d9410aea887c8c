"""Speed of the continual CIFAR-100 batch-1 loop: MetaOptimize (AdamW, Adam) scalar against fixed-step AdamW.

    python3 scripts/bench_continual.py                    # 2,000 steps each, on the default device
    python3 scripts/bench_continual.py --steps 500 --device cpu --threads 1

Both runs live in one process and use continual_cifar100/train.py's own pieces (`epoch_stream`,
`train_step`, the paper's optimizer defaults) on random images of the real size. They are timed
in interleaved chunks of --chunk steps (round-robin), so slow drifts of a shared machine hit both
alike. Prints the time per step, the ratio MetaOptimize / fixed (target <= 1.15) and the projected
wall time of the full run (--full-steps, 50,000 = 10 tasks x 5,000 images), which adds one
epoch_stream and one test evaluation per task. `--steps 50000` times every step of the full run
for both variants, interleaved, and reports the totals too.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from common import harness
from common.benchmark import interleaved, sync
from common.specs import build_optimizer, spec_from_args

ROOT = Path(__file__).resolve().parents[1]


def load_train_module():
    spec = importlib.util.spec_from_file_location("continual_train", ROOT / "continual_cifar100" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Loop:
    """One training run of the benchmark: model, optimizer and its place in the augmented stream.
    `flags` are train.py's run flags; the optimizer is train.py's spec with `options` replaced."""

    def __init__(self, ct, flags, options, x, y, device):
        self.ct, self.x, self.y = ct, x, y
        self.args = ct.parse_args(["--device", str(device), *flags])
        torch.manual_seed(0)
        model = ct.MODELS[self.args.model](num_classes=self.args.classes_per_task).to(device)
        self.optimizer = build_optimizer(model, {**spec_from_args(self.args), **options})
        self.model = harness.maybe_compile(model, self.args)
        self.scaler = harness.grad_scaler(self.args, device)
        self.hits = torch.zeros(2, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.epoch, self.pos = 0, 0
        self.xs, self.ys = ct.epoch_stream(x, y, 0, self.epoch)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.pos == len(self.ys):
                self.epoch, self.pos = self.epoch + 1, 0
                self.xs, self.ys = self.ct.epoch_stream(self.x, self.y, 0, self.epoch)
            i = self.pos
            self.ct.train_step(self.model, self.optimizer, self.scaler, self.xs[i:i + 1], self.ys[i:i + 1],
                               self.hits, self.loss_sum, self.args)
            self.pos += 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="timed steps per variant")
    p.add_argument("--chunk", type=int, default=100, help="steps per timed chunk (variants alternate)")
    p.add_argument("--full-steps", type=int, default=50_000, help="steps of the full run, for the projection")
    p.add_argument("--images", type=int, default=5000, help="images per task")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="train.py --compile: torch.compile the model and the "
                   "optimizer step (the first steps compile)")
    args = p.parse_args()
    if args.steps < 1 or args.chunk < 1:
        p.error("--steps and --chunk must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness.resolve_device(args.device)
    ct = load_train_module()

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 10, (args.images,), generator=g).to(device)
    extra = ["--compile"] if args.compile else []
    loops = {
        "MetaOptimize (AdamW, Adam) scalar": Loop(ct, extra, {}, x, y, device),
        "AdamW fixed step (--alg-meta fixed)": Loop(ct, extra, {"alg_meta": "fixed"}, x, y, device),
    }
    for loop in loops.values():  # warm-up
        loop.run(min(200, args.steps))
    chunks = max(1, round(args.steps / args.chunk))
    timed = interleaved({name: lambda loop=loop: loop.run(args.chunk) for name, loop in loops.items()}, chunks, device)
    times = {name: [s / args.chunk for s in t.wall] for name, t in timed.items()}  # seconds per step, per chunk
    cpu_times = {name: [s / args.chunk for s in t.cpu] for name, t in timed.items()}

    # the per-task extras of a real run: building the augmented epoch and the test evaluation
    meta = next(iter(loops.values()))
    sync(device)
    t0 = time.perf_counter()
    for k in range(3):
        ct.epoch_stream(x, y, 1, k)
    sync(device)
    t_stream = (time.perf_counter() - t0) / 3
    x_test, y_test = x[:1000], y[:1000]
    ct.evaluate(meta.model, meta.optimizer, x_test, y_test, meta.args)  # warm-up (compiles with --compile)
    t0 = time.perf_counter()
    ct.evaluate(meta.model, meta.optimizer, x_test, y_test, meta.args)
    t_eval = time.perf_counter() - t0
    tasks = args.full_steps / args.images

    print(f"device {device}, torch threads {torch.get_num_threads()}, compile {args.compile}, {chunks} interleaved chunks of {args.chunk} "
          f"steps per variant (batch size 1, the spec's CNN)")
    per_step = {}
    for name in loops:
        med, cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        per_step[name] = med
        full = args.full_steps * med + tasks * (t_stream + t_eval)
        total = sum(timed[name].wall)
        print(f"  {name:38s} {med * 1e3:7.3f} ms/step wall ({cpu * 1e3:.3f} CPU), median; {chunks * args.chunk:,} "
              f"timed steps in {total:.1f} s; projected {args.full_steps:,}-step run: {full / 60:6.1f} min")
    a, b = list(loops)
    paired = statistics.median(x / y for x, y in zip(times[a], times[b]))
    cpu_ratio = statistics.median(cpu_times[a]) / statistics.median(cpu_times[b])
    ratio = per_step[a] / per_step[b]
    print(f"  per task: epoch_stream {t_stream * 1e3:.1f} ms, test evaluation (1,000 images) {t_eval * 1e3:.1f} ms")
    totals = sum(times[a]) / sum(times[b])
    print(f"ratio MetaOptimize / fixed: {ratio:.3f} wall (medians), {paired:.3f} (median of paired chunks), "
          f"{totals:.3f} (total timed wall), "
          f"{cpu_ratio:.3f} CPU time; target <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'}")


if __name__ == "__main__":
    main()
