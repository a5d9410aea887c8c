#!/usr/bin/env python3
"""The paper's Table 1: time per training iteration and peak memory of each method against AdamW.

    python3 scripts/bench_overhead.py --device cuda       # the paper's sizes: ImageNet batch 256 at 224 px,
                                                          # TinyStories batch 128 x 256 tokens
    python3 scripts/bench_overhead.py --device cpu --imagenet-batch 8 --image-size 112 --tinystories-batch 4
    python3 scripts/bench_overhead.py --quick             # tiny models, one round: checks that it runs

Every method trains its own copy of the experiment's real model (same initial weights): the
torchvision ResNet-18 of imagenet/train.py (1000 classes) and the llama2.c 15M transformer of
tinystories/train.py (dim 288, 6 layers, 6 heads, vocab 32000), on a fixed random batch that
lives on the device (no data loading). An iteration is what train.py does: forward, loss,
backward (TinyStories: gradient clipping at norm 1), optimizer step, zero_grad. Methods (the rows
of Table 1): torch AdamW, foreach (the reference) and fused; MetaOptimize with the paper's
configurations of the experiment, scalar and blockwise; the learning-rate-free baselines with the
protocols of scripts/sweeps/*_lr_free.yaml (DoG with averaging, Prodigy, Mechanic on Adam, gdtuo
Adam/Adam). All are built by common.specs.build_optimizer from a spec of train.py's flags, but the two
AdamW rows, which are torch.optim.AdamW with foreach=True and with fused=True.

Time: the methods are timed in one process in interleaved rounds (common.benchmark.interleaved,
order alternating), --steps iterations per round after --warmup untimed ones; the table gives the
median and the minimum over rounds of the time per iteration, and the ratio to AdamW (foreach, and
fused) as the median over rounds of the ratio within a round (the methods of a round ran back to
back, under the same load: the steadier number on a shared machine).

Memory: the peak memory of training, measured for each method while its model copy, gradients,
optimizer state and one iteration's activations are allocated: on CUDA the growth of
torch.cuda.max_memory_allocated over the memory allocated before the copy was made; on the CPU
the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over
its resident set before, with glibc told to return every allocation of 128 KiB or more to the
system when freed (so memory freed by an earlier method is not reused unseen). "extra" is the
difference to AdamW (foreach).

The table and every measurement are written to --record (default results/bench_overhead_<device>,
.md and .json, with date, command, machine and software; --quick writes nothing unless --record is
given).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tinystories"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import harness  # noqa: E402
from common.benchmark import environment, interleaved, markdown_table, sync, write_results  # noqa: E402
from common.specs import build_optimizer, resolve_spec  # noqa: E402

# the optimizer spec of each row (common/specs.py), per experiment: the paper's configurations (spec
# section 7) and the learning-rate-free protocols of the *_lr_free.yaml sweeps; None: torch.optim.AdamW itself
ADAMW = {"alg_base": "AdamW", "momentum_param_base": 0.9, "normalizer_param_base": 0.999, "weight_decay_base": 0.1}
LION = {"alg_base": "Lion", "momentum_param_base": 0.99, "weight_decay_base": 0.1, "Lion_beta2_base": 0.9}
LION_META = {"alg_meta": "Lion", "momentum_param_meta": 0.99, "Lion_beta2_meta": 0.9}
LR_FREE = {
    "DoG (+ averaging)": {"optimizer": "DoG", "dog_reps_rel": 1e-6},
    "Prodigy": {"optimizer": "Prodigy"},
    "Mechanic (Adam)": {"optimizer": "Mechanic", "mechanic_base": "Adam", "mechanic_s_init": 1e-6},
    "gdtuo (Adam, Adam)": {"optimizer": "gdtuo", "gdtuo_base": "Adam", "gdtuo_hyper": "Adam"},
}
REFERENCE, FUSED = "AdamW (torch, foreach)", "AdamW (torch, fused)"


def table_rows(blocks: str) -> dict:
    """The rows of Table 1 for one model, whose named step-size blocks are `blocks`."""
    return {
        REFERENCE: None, FUSED: None,
        "MetaOptimize (AdamW, Lion) scalar": {"optimizer": "HF", **ADAMW, **LION_META, "alpha0": 1e-6},
        "MetaOptimize (AdamW, Lion) blocks": {"optimizer": "HF", **ADAMW, **LION_META, "alpha0": 1e-6,
                                              "stepsize_groups": blocks},
        "MetaOptimize (Lion, Lion) scalar": {"optimizer": "HF", **LION, **LION_META, "alpha0": 1e-6},
        **LR_FREE,
    }


METHODS = {"imagenet": table_rows("resnet18_blocks"), "tinystories": table_rows("transformer_blocks_15m")}
TITLES = {"imagenet": "ImageNet, ResNet-18", "tinystories": "TinyStories, llama2.c 15M transformer"}
QUICK = dict(imagenet_batch=2, image_size=16, classes=10, tinystories_batch=2, seq_len=16, dim=48, n_heads=2,
             vocab_size=256, steps=1, rounds=1, warmup=1)


def parse_args(argv=None):
    p = harness.ArgParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--experiments", default="imagenet,tinystories",
                   help="comma-separated: imagenet, tinystories (default: both)")
    p.add_argument("--methods", default="",
                   help="comma-separated parts of row names to keep (the two AdamW rows are always kept; default: every row)")
    p.add_argument("--steps", type=int, default=5, help="timed iterations per round (default: 5)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per method first (default: 2)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast (default: none)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g = p.add_argument_group("sizes (defaults: the paper's)")
    g.add_argument("--imagenet-batch", type=int, default=256, help="ImageNet images per iteration (default: 256)")
    g.add_argument("--image-size", type=int, default=224, help="ImageNet crop size (default: 224)")
    g.add_argument("--classes", type=int, default=1000, help="ImageNet classes (default: 1000)")
    g.add_argument("--tinystories-batch", type=int, default=128, help="TinyStories sequences per iteration (128)")
    g.add_argument("--seq-len", type=int, default=256, help="TinyStories tokens per sequence (default: 256)")
    g.add_argument("--dim", type=int, default=288, help="TinyStories model width (default: 288)")
    g.add_argument("--n-heads", type=int, default=6, help="TinyStories attention heads (default: 6; 6 layers)")
    g.add_argument("--vocab-size", type=int, default=32000, help="TinyStories vocabulary (default: 32000)")
    p.add_argument("--quick", action="store_true",
                   help="tiny models, one round of one iteration (a check that every row runs; its numbers mean "
                        "nothing); sizes given on the command line still apply")
    p.add_argument("--memory-in-process", action="store_true",
                   help="CPU: measure peak memory in this process (faster; its glibc setting then also applies to "
                        "the timed iterations) instead of a child process")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)  # CPU: the memory phase
    p.add_argument("--record", default=None, metavar="STEM",
                   help="write STEM.md and STEM.json (default: results/bench_overhead_<device>; none with --quick)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:  # quick sizes, unless given explicitly
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    for name in ("steps", "rounds", "imagenet_batch", "image_size", "classes", "tinystories_batch", "seq_len",
                 "dim", "n_heads", "vocab_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error(f"--warmup must be at least 1 (the optimizers allocate their state there), got {args.warmup}")
    if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
        p.error(f"--dim {args.dim} must split into --n-heads {args.n_heads} heads of even size")
    args.experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    unknown = [e for e in args.experiments if e not in METHODS]
    if unknown or not args.experiments:
        p.error(f"--experiments: unknown {', '.join(unknown) or '(none given)'}; accepted: {', '.join(METHODS)}")
    args.methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    return args


# --------------------------------------------------------------------------------------
# Peak memory of one method
# --------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory growth over a `with` block: CUDA allocator statistics, or the process's peak RSS."""

    def __init__(self, device: torch.device, measure: bool = True):
        self.device, self.measure = device, measure
        if measure and device.type == "cpu":
            try:  # glibc: allocations of 128 KiB and more are mmap'ed and returned when freed
                self._libc = ctypes.CDLL("libc.so.6")
                self._libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
            except OSError:
                self._libc = None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def __enter__(self):
        self.bytes = None
        if not self.measure:
            return self
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if self._libc is not None:
                self._libc.malloc_trim(0)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak RSS to the current RSS
                self.base = self._status("VmRSS:")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if not self.measure:
            return False
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            peak = self._status("VmHWM:")
            self.bytes = None if peak is None else peak - self.base
        return False


# --------------------------------------------------------------------------------------
# Models, batches, one iteration
# --------------------------------------------------------------------------------------


@dataclass
class Experiment:
    model: torch.nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    clip: float  # gradient clipping (0: none)
    describe: str

    def loss(self, model):
        if self.clip:  # the transformer returns (logits, loss)
            return model(self.inputs, self.targets)[1]
        return F.cross_entropy(model(self.inputs), self.targets)


def make_experiment(name: str, args, device: torch.device) -> Experiment:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "imagenet":
        import torchvision

        model = torchvision.models.resnet18(num_classes=args.classes).to(device)
        x = torch.randn(args.imagenet_batch, 3, args.image_size, args.image_size, generator=gen).to(device)
        y = torch.randint(0, args.classes, (args.imagenet_batch,), generator=gen).to(device)
        what = f"torchvision ResNet-18, batch {args.imagenet_batch}, {args.image_size} px, {args.classes} classes"
        return Experiment(model, x, y, 0.0, what)
    from model import ModelArgs, Transformer

    margs = ModelArgs(dim=args.dim, n_layers=6, n_heads=args.n_heads, n_kv_heads=args.n_heads,
                      vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    model = Transformer(margs).to(device)
    x = torch.randint(0, args.vocab_size, (args.tinystories_batch, args.seq_len), generator=gen).to(device)
    y = torch.randint(0, args.vocab_size, (args.tinystories_batch, args.seq_len), generator=gen).to(device)
    what = (f"llama2.c transformer dim {args.dim}, 6 layers, {args.n_heads} heads, vocab {args.vocab_size}, "
            f"batch {args.tinystories_batch} x {args.seq_len} tokens")
    return Experiment(model, x, y, 1.0, what)


def make_optimizer(name: str, spec, params):
    if spec is None:  # the two AdamW references: torch's own, foreach and fused
        return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1,
                                 **({"fused": True} if name == FUSED else {"foreach": True}))
    return build_optimizer(params, spec)


def bench_experiment(name: str, args, device: torch.device, child_memory=None, memory_only=False) -> dict:
    """Peak memory and time per iteration of every method (memory_only: {method: peak bytes}).
    On the CPU, memory is measured in a child process (child_memory: its answer), so that the glibc
    setting it needs does not slow the timed iterations."""
    memory_here = memory_only or device.type == "cuda" or args.memory_in_process
    exp = make_experiment(name, args, device)
    methods = {k: v for k, v in METHODS[name].items()
               if not args.methods or k in (REFERENCE, FUSED) or any(m in k.lower() for m in args.methods)}
    amp = argparse.Namespace(amp=args.amp)
    print(f"\n== {TITLES[name]}: {exp.describe}; {device}, {torch.get_num_threads()} threads ==", flush=True)
    runs, memory = {}, {}

    def iteration(model, opt, scaler):
        with harness.amp_context(amp, device):
            loss = exp.loss(model)
        scaler.scale(loss).backward()
        if exp.clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), exp.clip, foreach=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    # one-time costs of the first iteration in a process (kernels, thread pools) land in no method's peak
    warm = copy.deepcopy(exp.model)
    iteration(warm, torch.optim.SGD(warm.parameters(), lr=0.0), harness.grad_scaler(amp, device))
    del warm
    for method, spec in methods.items():
        with PeakMemory(device, measure=memory_here) as peak:  # the copy, its gradients and state, warm-up
            model = copy.deepcopy(exp.model)
            opt = make_optimizer(method, spec, list(model.parameters()))
            scaler = harness.grad_scaler(amp, device)
            for _ in range(args.warmup):
                iteration(model, opt, scaler)
        runs[method] = (model, opt, scaler)
        if memory_here:
            memory[method] = peak.bytes
            print(f"  {method}: peak {'?' if peak.bytes is None else f'{peak.bytes / 2**20:,.1f} MB'}", flush=True)
    exp.model = None  # the template is no longer needed
    if memory_only:
        return memory
    if not memory_here:
        memory = child_memory[name]

    def steps(method):
        model, opt, scaler = runs[method]
        for _ in range(args.steps):
            iteration(model, opt, scaler)

    timings = interleaved({m: (lambda m=m: steps(m)) for m in runs}, args.rounds, device,
                          on_round=lambda r, t: print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                              f"{m} {1e3 * v.wall[-1] / args.steps:.1f}" for m, v in t.items()) + " ms/iteration",
                              flush=True))
    per_iter = {m: [s / args.steps for s in t.wall] for m, t in timings.items()}
    median = {m: statistics.median(v) for m, v in per_iter.items()}
    best = {m: min(v) for m, v in per_iter.items()}

    def paired(m, ref):  # the median over rounds of the ratio within a round (run back to back: same load)
        return statistics.median(a / b for a, b in zip(per_iter[m], per_iter[ref]))

    ref_mem = memory.get(REFERENCE)
    rows, raw = [], {"model": exp.describe, "methods": {}}
    for m in runs:
        mem = memory[m]
        rows.append([
            m, f"{1e3 * median[m]:.1f}", f"{1e3 * best[m]:.1f}", f"{paired(m, REFERENCE):.2f}",
            f"{paired(m, FUSED):.2f}" if FUSED in per_iter else "",
            "?" if mem is None else f"{mem / 2**20:,.0f}",
            "?" if mem is None or ref_mem is None else f"{(mem - ref_mem) / 2**20:+,.0f}",
            "?" if mem is None or not ref_mem else f"{mem / ref_mem:.2f}",
        ])
        raw["methods"][m] = {"spec": methods[m] and resolve_spec(methods[m]), "seconds_per_iteration": per_iter[m], "peak_memory_bytes": mem}
    columns = ["method", "ms/iter (median)", "ms/iter (min)", "time x AdamW", "time x fused AdamW",
               "peak MB", "extra MB", "memory x AdamW"]
    table = markdown_table(columns, rows)
    print(table, flush=True)
    return {"title": TITLES[name], "describe": exp.describe, "table": table, "raw": raw}


def memory_in_child(args) -> dict:
    """{experiment: {method: peak bytes}} measured by this script in a child process (--memory-child)."""
    print("measuring peak memory in a child process ...", flush=True)
    proc = subprocess.run([sys.executable, __file__, *args.argv, "--memory-child"], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the memory child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(proc.stdout.rsplit("\n", 2)[0], flush=True)  # its per-method lines
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness.resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.memory_child:
        print(json.dumps({name: bench_experiment(name, args, device, memory_only=True) for name in args.experiments}))
        return 0
    env = environment(device, args.argv)  # the date and commit of the start
    child_memory = memory_in_child(args) if device.type == "cpu" and not args.memory_in_process else None
    results = {name: bench_experiment(name, args, device, child_memory) for name in args.experiments}
    record = args.record or (None if args.quick else str(ROOT / "results" / f"bench_overhead_{device.type}"))
    if record:
        text = "\n\n".join(f"## {r['title']}\n\n{r['describe']}\n\n{r['table']}" for r in results.values())
        memory_how = ("torch.cuda.max_memory_allocated growth" if device.type == "cuda"
                      else "growth of the process's peak resident set (VmHWM)")
        notes = [f"Time per whole training iteration (forward, backward, optimizer step), {args.steps} iterations "
                 f"per round, {args.rounds} interleaved rounds after {args.warmup} warm-up iterations; time x AdamW "
                 f"is the median over rounds of the ratio to torch AdamW with foreach=True in the same round (x "
                 f"fused AdamW: to fused=True). Peak memory: "
                 f"{memory_how} while the method's model copy, gradients, optimizer state and one iteration's "
                 f"activations exist; extra = difference to AdamW (foreach). amp: {args.amp}."]
        if args.quick:
            notes.append("--quick: tiny models, one round; the numbers only show that every row runs.")
        paths = write_results(record, title="Overhead against AdamW (the paper's Table 1)", table=text,
                              raw={k: v["raw"] for k, v in results.items()}, device=device, argv=args.argv,
                              notes=notes, env=env)
        print(f"\nwrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
