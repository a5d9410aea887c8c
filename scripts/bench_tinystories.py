"""Training throughput of MetaOptimize (AdamW base, Lion meta) against torch AdamW on the TinyStories model.

    python scripts/bench_tinystories.py                                  # 15M model, batch 128 x 256 (GPU)
    python scripts/bench_tinystories.py --device cpu --batch-size 2 --seq-len 64 --steps 3 --reps 3

Both optimizers train their own copy of the same model in one process, in interleaved repetitions
(the order alternates), on fixed random tokens (no data loading). A step is what train.py does:
forward, backward, gradient clipping at 1.0, optimizer step. Prints tokens/s per optimizer (median
over repetitions), the ratio MetaOptimize / AdamW (median of the per-repetition ratios), the time of
the optimizer step alone, and the projected time of the paper's
30k-iteration run at batch 128 x 256 tokens (meaningful when --batch-size 128 --seq-len 256).
torch AdamW is the fused one (on CPU too): the fastest AdamW torch has.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tinystories"))

from model import ModelArgs, Transformer, describe  # noqa: E402

from common import harness  # noqa: E402
from common.benchmark import environment, interleaved, markdown_table, write_results  # noqa: E402
from common.optimizers import MetaOptimize  # noqa: E402

PAPER_ITERS, PAPER_TOKENS_PER_STEP = 30_000, 128 * 256


def parse_args(argv=None):
    p = harness.ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per repetition")
    p.add_argument("--reps", type=int, default=5, help="repetitions per optimizer, interleaved")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="autocast dtype (float16 adds a gradient scaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--stepsize-groups", default="scalar", help="MetaOptimize blocks (e.g. transformer_blocks_15m)")
    p.add_argument("--vocab-size", type=int, default=32000, help="model vocabulary")
    p.add_argument("--dim", type=int, default=288, help="model width")
    p.add_argument("--n-layers", type=int, default=6, help="transformer blocks")
    p.add_argument("--n-heads", type=int, default=6, help="attention heads")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--record", default=None, metavar="STEM",
                   help="record the table and every measurement as STEM.md + STEM.json, with date, command and "
                        "machine (e.g. results/bench_tinystories_cpu)")
    return p.parse_args(argv)


def make_optimizers(model: Transformer, device, stepsize_groups) -> dict:
    """name -> (model copy, optimizer): the same initial weights for every optimizer."""
    out = {}
    m = copy.deepcopy(model)
    out["torch AdamW"] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1,
                                               fused=True))  # the fastest AdamW torch has, on CPU too
    m = copy.deepcopy(model)
    out["MetaOptimize (AdamW, Lion)"] = (m, MetaOptimize(
        m.parameters(), alg_base="AdamW", alg_meta="Lion", alpha0=1e-6, meta_stepsize=1e-3, gamma=1.0,
        stepsize_groups=stepsize_groups, weight_decay_base=0.1, normalizer_param_base=0.999,
        momentum_param_base=0.9, weight_decay_meta=0.0, momentum_param_meta=0.99, lion_beta2_meta=0.9))
    return out


def main():
    args = parse_args()
    device = harness.resolve_device(args.device)
    env = environment(device)  # the date and commit of the start, for --record
    for name in ("batch_size", "seq_len", "steps", "reps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    torch.manual_seed(0)
    margs = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_heads,
                      vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    model = Transformer(margs).to(device)
    print(describe(model))
    runs = make_optimizers(model, device, args.stepsize_groups)
    del model
    amp = argparse.Namespace(amp={"float32": "none", "bfloat16": "bf16", "float16": "fp16"}[args.dtype])
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    nets = {name: harness.maybe_compile(m, args) for name, (m, _) in runs.items()}
    scalers = {name: harness.grad_scaler(amp, device) for name in runs}

    def train_steps(name, n):
        model, opt = runs[name]
        net, scaler = nets[name], scalers[name]
        for _ in range(n):
            with harness.amp_context(amp, device):
                _, loss = net(x, y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

    for name in runs:
        train_steps(name, args.warmup)
    tokens = args.batch_size * args.seq_len * args.steps
    timed = interleaved(
        {name: lambda name=name: train_steps(name, args.steps) for name in runs}, args.reps, device,
        on_round=lambda rep, t: print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{n} {tokens / v.wall[-1]:,.0f} tok/s" for n, v in t.items()), flush=True))
    rates = {name: [tokens / s for s in t.wall] for name, t in timed.items()}

    # the optimizer step alone (gradients of one backward pass kept), interleaved the same way
    for name in runs:
        with harness.amp_context(amp, device):
            _, loss = nets[name](x, y)
        loss.backward()
    def optimizer_steps(name):
        for _ in range(args.steps):
            runs[name][1].step()

    timed = interleaved({name: lambda name=name: optimizer_steps(name) for name in runs}, args.reps, device)
    step_ms = {name: [1e3 * s / args.steps for s in t.wall] for name, t in timed.items()}

    median = {n: statistics.median(r) for n, r in rates.items()}
    base, meta = "torch AdamW", "MetaOptimize (AdamW, Lion)"
    # paired: the two optimizers of one repetition ran back to back, so they saw the same machine load
    ratio = statistics.median(m / b for m, b in zip(rates[meta], rates[base]))
    opt_ms = {n: statistics.median(r) for n, r in step_ms.items()}
    print(f"\ndevice {device}, dtype {args.dtype}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.steps} steps x {args.reps} reps, compile {args.compile}")
    for n, v in median.items():
        hours = PAPER_ITERS * PAPER_TOKENS_PER_STEP / v / 3600
        print(f"  {n:28s} {v:12,.0f} tokens/s, optimizer step alone {opt_ms[n]:8.2f} ms  "
              f"(30k iterations at 128 x 256 tokens: {hours:.2f} h)")
    print(f"ratio MetaOptimize (AdamW, Lion) / torch AdamW tokens/s: {ratio:.3f} (median of the per-repetition "
          f"ratios; ratio of the medians {median[meta] / median[base]:.3f}); MetaOptimize takes "
          f"{100 * (1 / ratio - 1):+.1f}% time per training step")
    result = {"device": str(device), "args": vars(args), "tokens_per_s": median, "all": rates, "ratio": ratio,
              "optimizer_step_ms": opt_ms, "all_optimizer_step_ms": step_ms}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        table = markdown_table(["optimizer", "tokens/s (median)", "optimizer step ms (median)"],
                               [[n, f"{v:,.0f}", f"{opt_ms[n]:.2f}"] for n, v in median.items()])
        paths = write_results(args.record, title="TinyStories training throughput (scripts/bench_tinystories.py)",
                              table=table, raw=result, device=device, env=env, notes=[
                                  f"batch {args.batch_size} x {args.seq_len} tokens, dtype {args.dtype}, {args.steps} "
                                  f"steps x {args.reps} interleaved repetitions; MetaOptimize (AdamW, Lion) / torch "
                                  f"AdamW tokens/s: {ratio:.3f} (median of the per-repetition ratios)."])
        print(f"recorded {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
