"""TinyStories: the llama2.c 15M transformer, batch 128, 30k iterations, MetaOptimize against AdamW and Lion.

    # data (once): download, then pretokenize with Llama 2's tokenizer (the paper) or your own vocabulary
    python tinystories/prepare.py download
    python tinystories/prepare.py download_tokenizer && python tinystories/prepare.py pretokenize --vocab-size 32000
    # MetaOptimize (AdamW base, Lion meta), as in the paper
    python tinystories/train.py --alg-base AdamW --alg-meta Lion --alpha0 1e-6 --run-name adamw_lion
    # Lion base and meta; fixed-step baselines use --alg-meta fixed --alpha0 <step>
    python tinystories/train.py --alg-base Lion --Lion-beta2-base .9 --momentum-param-base .99 \\
        --alg-meta Lion --alpha0 1e-6 --run-name lion_lion
    # the AdamW baseline with 1k warm-up steps and cosine decay (the paper picks the peak from 1e-5, 1e-4, 1e-3)
    python tinystories/train.py --optimizer AdamW --lr 1e-3 --run-name adamw_cosine
    # 4 GPUs: the --grad-accum micro-batches of a step are divided over the ranks
    torchrun --nproc_per_node 4 tinystories/train.py --batch-size 32 --grad-accum 4 --dtype bfloat16 --compile
    # the same with weights, gradients and optimizer state sharded (FSDP2, one unit per transformer block)
    torchrun --nproc_per_node 4 tinystories/train.py --batch-size 32 --grad-accum 4 --dtype bfloat16 --fsdp

One optimizer step uses --batch-size x --grad-accum sequences of --seq-len tokens, whatever the number of
ranks. Metrics per run folder (docs/CONTRACTS.md): train/loss, tokens_per_s, lr, step_size/block_i every
--log-every steps; train/loss and val/loss (--eval-iters batches each) every --eval-every steps, with a
checkpoint. Resume with --resume --run-name NAME (after --max-time, SIGTERM or SIGUSR1). With --fsdp the
checkpoint's weights and optimizer state are a sharded folder next to checkpoint.pt (sample.py reads it too).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from model import ModelArgs, Transformer, describe
from prepare import TokenShards

from common import harness, sharded
from common.optim_flags import add_optimizer_args, build_optimizer, build_scheduler, eval_weights
from common.step_metrics import effective_step_sizes

DEFAULTS = dict(
    data_dir="data/tinystories",
    vocab_size=32000,  # Llama 2's tokenizer, as in the paper (reads <data-dir>/tok32000/)
    max_iters=30_000,
    batch_size=128,  # sequences per micro-batch (one forward/backward)
    grad_accum=1,  # micro-batches per optimizer step, divided over the ranks
    seq_len=256,
    dim=288,
    n_layers=6,
    n_heads=6,
    n_kv_heads=6,
    multiple_of=32,
    dropout=0.0,
    grad_clip=1.0,  # clip the global gradient norm (0: off)
    eval_every=1000,
    eval_iters=100,
    log_every=10,
    warmup_steps=1000,  # --optimizer AdamW: linear warm-up, then cosine decay to 0 at --max-iters
)
DTYPES = {"float32": "none", "bfloat16": "bf16", "float16": "fp16"}  # --dtype -> the harness's --amp

BLOCKS_HELP = """\
--stepsize-groups transformer_blocks_15m = [1, 9, 9, 9, 9, 9, 10] follows the model's parameter
order (56 tensors; the output layer shares the embedding matrix, so it is not a tensor of its own):
  block 0 (1):  tok_embeddings.weight (= output.weight)
  block 1-5 (9 each): layers.0 .. layers.4: wq, wk, wv, wo, w1, w2, w3, attention_norm, ffn_norm
  block 6 (10): layers.5 (9 tensors) + norm.weight"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def parse_args(argv=None):
    parser = harness.ArgParser(description=__doc__.split("\n\n")[0], epilog=BLOCKS_HELP, formatter_class=HelpFormatter)
    g = parser.add_argument_group("tinystories")
    g.add_argument("--data-dir", help="folder of prepare.py (tok<vocab-size>/data*.bin; shard 0 is validation)")
    g.add_argument("--vocab-size", type=int, help="tokenizer vocabulary; selects <data-dir>/tok<N>/")
    g.add_argument("--max-iters", type=int, help="optimizer steps")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (a multiple of the ranks)")
    g.add_argument("--seq-len", type=int, help="tokens per sequence (also the model's max_seq_len)")
    g.add_argument("--eval-every", type=int, help="estimate train/val loss and checkpoint every this many steps")
    g.add_argument("--eval-iters", type=int, help="batches per loss estimate")
    g.add_argument("--grad-clip", type=float, help="max global gradient norm (0: no clipping)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="autocast dtype (float16 adds a gradient scaler); same as --amp none/bf16/fp16")
    m = parser.add_argument_group("model (llama2.c 15M by default)")
    m.add_argument("--dim", type=int, help="model width (embedding and residual stream)")
    m.add_argument("--n-layers", type=int, help="transformer blocks")
    m.add_argument("--n-heads", type=int, help="attention heads (--dim must split into heads of even size)")
    m.add_argument("--n-kv-heads", type=int, help="key/value heads (grouped-query attention; --n-heads must be a "
                                                   "multiple)")
    m.add_argument("--multiple-of", type=int, help="SwiGLU hidden width rounds up to a multiple of this")
    m.add_argument("--dropout", type=float, help="dropout probability (0: none, as in the paper)")
    g.add_argument("--weights-checksum", action="store_true", help=argparse.SUPPRESS)  # tests: print per rank
    harness.add_run_args(parser)
    harness.add_fsdp_arg(parser)
    add_optimizer_args(parser)
    parser.set_defaults(**DEFAULTS)
    args = parser.parse_args(argv)
    check_args(args, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's ranks, known before they connect
    harness.check_args(args)
    harness.check_stepsize_groups(args, lambda: Transformer(model_args_of(args)))
    return args


def model_args_of(args) -> ModelArgs:
    return ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                     vocab_size=args.vocab_size, multiple_of=args.multiple_of, max_seq_len=args.seq_len,
                     dropout=args.dropout)


def check_args(args, world_size: int):
    for name in ("max_iters", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_iters", "vocab_size",
                 "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.vocab_size > 65536:
        raise ValueError(f"--vocab-size must be at most 65536 (tokens are stored as uint16), got {args.vocab_size}")
    if args.grad_clip < 0:
        raise ValueError(f"--grad-clip must be >= 0 (0: off), got {args.grad_clip}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads or (args.dim // args.n_heads) % 2:
        raise ValueError(f"--dim {args.dim} must divide into --n-heads {args.n_heads} heads of even size, and "
                         f"--n-heads into --n-kv-heads {args.n_kv_heads} groups")
    if args.grad_accum % world_size:
        raise ValueError(f"--grad-accum {args.grad_accum} must be a multiple of the {world_size} ranks "
                         f"(each rank runs grad_accum / ranks micro-batches per step)")
    if args.dtype is not None:
        amp = DTYPES[args.dtype]
        if args.amp not in ("none", amp):
            raise ValueError(f"--dtype {args.dtype} contradicts --amp {args.amp}; give one of them")
        args.amp = amp


def hessian_attention(args):
    """The attention kernels of the training forward: with --hessian the gradient is differentiated
    again, which only the math kernel of scaled_dot_product_attention supports (flash on CPU does not)."""
    if args.hessian == "none":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel(SDPBackend.MATH)


def batch_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    """The random source of micro-batch `micro` of optimizer step `step`: resume and rank count never change it."""
    return np.random.default_rng((seed, step, micro))


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 tensor on device; pinned host memory and a non-blocking copy on CUDA."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def estimate_loss(model, splits, args, run) -> dict:
    """Mean loss over the same --eval-iters batches of each split every time, shared out over the ranks.

    Every rank runs the same number of batches (FSDP gathers the weights in each forward); a rank's
    batch past --eval-iters repeats the last one and is not counted."""
    model.eval()
    sums = torch.zeros(len(splits), device=run.device)
    for s, data in enumerate(splits.values()):
        for first in range(0, args.eval_iters, run.world_size):
            i = min(first + run.rank, args.eval_iters - 1)
            x, y = data.batch(args.batch_size, args.seq_len, np.random.default_rng((args.seed, 1 + s, i)))
            with harness.amp_context(args, run.device):
                _, loss = model(to_device(x, run.device), to_device(y, run.device))
            if first + run.rank < args.eval_iters:
                sums[s] += loss.float()
    if run.world_size > 1:
        dist.all_reduce(sums)
    model.train()
    return {f"{name}/loss": v / args.eval_iters for name, v in zip(splits, sums.tolist())}


def weights_checksum(model, optimizer) -> str:
    return f"weights={sharded.weights_digest(model)} step_sizes={effective_step_sizes(optimizer).tolist()}"


def main():
    args = parse_args()
    run = harness.start_run(args, "tinystories")
    device = run.device
    train_data = TokenShards(args.data_dir, args.vocab_size, "train")
    val_data = TokenShards(args.data_dir, args.vocab_size, "val")

    model_args = model_args_of(args)
    model = Transformer(model_args).to(device)
    model = harness.shard(model, model.layers, args, device)  # --fsdp: one FSDP unit per transformer block
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, args.max_iters)
    scaler = harness.grad_scaler(args, device)

    step, best, last = 0, {}, {}
    loss_sum = torch.zeros((), device=device)  # training loss summed since the last log (no host sync)
    logged_step, window_time = 0, 0.0  # the step of the last log, training seconds since then
    state = run.resume(model, optimizer, scheduler, scaler)
    if state is not None:
        step, best, last = state["step"], state["best"], state["last"]
        # the log window a stop fell inside (checkpoints before these entries: a window from the resume)
        loss_sum.copy_(state.get("loss_sum", loss_sum))
        logged_step, window_time = state.get("logged_step", step), state.get("window_time", 0.0)
    net = harness.maybe_compile(harness.distribute(model, device, args), args)
    net.train()

    def progress():  # a checkpoint's entries besides the training state (sample.py reads model_args); every rank
        if run.world_size > 1:  # each rank's share of the window as their mean: the log's mean stays the same
            dist.all_reduce(loss_sum)
            loss_sum.div_(run.world_size)
        return {"step": step, "best": best, "last": last, "model_args": asdict(model_args),
                "data_dir": str(args.data_dir), "loss_sum": loss_sum, "logged_step": logged_step,
                "window_time": time.monotonic() - t_log}

    accum = args.grad_accum // run.world_size  # micro-batches on this rank per step
    first_micro = run.rank * accum  # global index of this rank's first micro-batch
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    if run.is_main:
        print(describe(model), flush=True)
        print(f"tinystories: {sum(len(a) for a in train_data.arrays):,} training tokens, "
              f"{sum(len(a) for a in val_data.arrays):,} validation tokens; {tokens_per_step:,} tokens per step "
              f"({args.grad_accum} x {args.batch_size} x {args.seq_len}) on {run.world_size} rank(s), device {device}",
              flush=True)

    def micro_batch(step, k):
        x, y = train_data.batch(args.batch_size, args.seq_len, batch_rng(args.seed, step, first_micro + k))
        return to_device(x, device), to_device(y, device)

    attention_kernel = hessian_attention(args)
    t_log = time.monotonic() - window_time
    bar = run.progress(args.max_iters, desc="train", initial=step)
    x, y = micro_batch(step, 0)
    while step < args.max_iters:
        for k in range(accum):
            # the gradients are reduced over the ranks only on the last micro-batch of the step
            with harness.gradient_sync(net, sync=k == accum - 1):
                with harness.amp_context(args, device), attention_kernel():
                    _, loss = net(x, y)
                    loss = loss / accum
                # read the next micro-batch on the host while the device works
                x, y = micro_batch(step + (k + 1) // accum, (k + 1) % accum)
                harness.graph_backward(scaler.scale(loss), optimizer)  # create_graph with --hessian
            loss_sum += loss.detach().float()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip, foreach=True)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()

        if run.is_log_step(step):
            if run.world_size > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= run.world_size
            now = time.monotonic()
            train = {"train/loss": loss_sum.item() / (step - logged_step),
                     "tokens_per_s": tokens_per_step * (step - logged_step) / (now - t_log)}
            run.log_step(optimizer, step, train)
            bar.set_postfix(loss=f"{train['train/loss']:.3f}", tok_s=f"{train['tokens_per_s']:.0f}")
            loss_sum.zero_()
            logged_step, t_log = step, now
        if step % args.eval_every == 0 or step == args.max_iters:
            with eval_weights(optimizer):
                last = estimate_loss(model, {"train": train_data, "val": val_data}, args, run)
            run.log(last, step)  # a non-finite loss ends the run as diverged
            if last["val/loss"] <= best.get("val/loss", math.inf):
                best = dict(last)
            if run.is_main:
                bar.write(f"step {step}: train loss {last['train/loss']:.4f}, val loss {last['val/loss']:.4f}")
            run.checkpoint(progress())
            t_log = time.monotonic()  # tokens/s counts training time only
        if run.should_stop(step):
            bar.close()
            return run.stop(progress(), f"at step {step}/{args.max_iters}")
    bar.close()
    if args.weights_checksum:  # every rank (a collective under --fsdp)
        print(f"weights-checksum rank={run.rank} {weights_checksum(model, optimizer)}\n", end="", flush=True)  # one write: ranks share stdout
    run.finish({"final": last, "best": best})
    return 0


if __name__ == "__main__":
    harness.run_main(main)
