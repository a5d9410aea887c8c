"""ImageNet, torchvision ResNet-18, 90 epochs, batch 256, MetaOptimize: the paper's Section 7.1.2 experiment.

    python3 imagenet/train.py --data-dir /data/imagenet      # (AdamW, Lion), alpha0 1e-6, scalar
    python3 imagenet/train.py --data-dir /data/imagenet --alg-base Lion --weight-decay-base .1 \\
        --momentum-param-base .99 --Lion-beta2-base .9 --alg-meta Lion --alpha0 1e-6 \\
        --stepsize-groups resnet18_blocks --run-name lion-lion-blocks
    python3 imagenet/train.py --data-dir /data/imagenet --optimizer AdamW --lr 1e-3   # cosine, 10k warm-up
    torchrun --nproc_per_node 8 imagenet/train.py --data-dir /data/imagenet --amp bf16 --channels-last
    torchrun --nproc_per_node 8 imagenet/train.py --data-dir /data/imagenet --amp bf16 --fsdp   # sharded (FSDP2)
    python3 imagenet/train.py --dummy --dummy-size 25600 --epochs 1           # synthetic data: smoke test

--data-dir holds train/<class>/*.JPEG and val/<class>/*.JPEG. --batch-size is global: torchrun
divides it over the ranks (DDP; DistributedSampler; metrics summed over the ranks; rank 0 logs
and saves; --fsdp shards the weights and optimizer state instead, one FSDP unit per residual block).
A run writes <save-directory>/<run-name>/ (config.json, metrics.jsonl, checkpoint.pt every epoch
(with --fsdp plus the folder of its shards), summary.json at the end). Every --log-every steps: train/loss, train/acc,
images_per_s, lr, step_size/block_i; every epoch: test/loss, test/acc (top-1, %), test/acc5
(top-5, %) on val/. SIGTERM/SIGUSR1/Ctrl-C or --max-time save a checkpoint at the current batch
and exit 0; rerun with --resume: a run stopped mid-epoch continues that epoch in the same sample
order, skipping the batches it has trained on, with the same random crops and flips (each image's
are seeded by --seed, the epoch and its index): it ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common` without installing the repo
sys.path.insert(0, str(Path(__file__).resolve().parent))  # imagenet/data.py

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from data import Normalizer, build_loaders, set_train_position

from common import harness, sharded
from common.data import DatasetError
from common.optim_flags import (
    add_optimizer_args,
    build_optimizer,
    build_scheduler,
    eval_weights,
)
from common.step_metrics import effective_step_sizes

# the paper's ImageNet setting (spec section 7); every one is a flag
NUM_EPOCHS = 90
BATCH_SIZE = 256  # global, divided over the torchrun ranks
WORKERS = 8  # data loader processes per rank
IMAGE_SIZE = 224
WARMUP_STEPS = 10_000  # --optimizer AdamW baseline only: linear warm-up, then cosine decay to 0
DUMMY_SIZE = 1_281_167  # --dummy: synthetic images per epoch (the size of ImageNet's training set)

BLOCKS_HELP = """\
--stepsize-groups resnet18_blocks = [3, 12, 15, 15, 15, 2] follows torchvision resnet18's
parameter order (62 tensors; conv = weight, bn = weight and bias):
  block 0 (3):  conv1, bn1                                   stem
  block 1 (12): layer1.{0,1}.{conv1, bn1, conv2, bn2}         stage 1, 64 channels
  block 2 (15): layer2.{0,1}.{conv1, bn1, conv2, bn2}, layer2.0.downsample.{0 (conv), 1 (bn)}
  block 3 (15): layer3, the same layout                       stage 3, 256 channels
  block 4 (15): layer4, the same layout                       stage 4, 512 channels
  block 5 (2):  fc.weight, fc.bias                            classifier"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag; the description and the block table kept as written."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.ArgParser(description=__doc__, epilog=BLOCKS_HELP, formatter_class=HelpFormatter)
    g = parser.add_argument_group("ImageNet")
    g.add_argument("--data-dir", default=None, help="folder holding train/<class>/ and val/<class>/ image folders")
    g.add_argument("--epochs", "--num-epochs", dest="epochs", type=int, default=NUM_EPOCHS, help="epochs")
    g.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="global batch size, divided over the ranks")
    g.add_argument("--workers", type=int, default=WORKERS, help="data loader processes per rank")
    g.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                   help="training crop; validation resizes to 256/224 of it and center-crops it")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on GPUs)")
    g.add_argument("--dummy", action="store_true", help="synthetic images instead of --data-dir (1000 classes)")
    g.add_argument("--dummy-size", type=int, default=DUMMY_SIZE,
                   help="--dummy: training images per epoch (validation: 1/25 of them)")
    # for tests: print a checksum of the weights on every rank at the end
    g.add_argument("--weights-checksum", action="store_true", help=argparse.SUPPRESS)
    add_optimizer_args(parser)
    harness.add_run_args(parser)
    harness.add_fsdp_arg(parser)
    parser.set_defaults(warmup_steps=WARMUP_STEPS)
    args = parser.parse_args(argv)
    harness.require_positive(parser, args, "epochs", "batch_size", "dummy_size")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.image_size < 32:
        parser.error(f"--image-size must be at least 32 (ResNet-18 downsamples 32x), got {args.image_size}")
    if args.fsdp and args.channels_last:
        parser.error("--channels-last does not go with --fsdp: FSDP2 cannot shard channels-last weights yet; "
                     "leave one of them out")
    harness.check_args(args)
    harness.check_stepsize_groups(args, lambda: torchvision.models.resnet18())  # its tensors: any class count
    return args


def all_reduce_sum(tensor: torch.Tensor, world_size: int) -> list[float]:
    """A small device tensor summed over the ranks, on the host (a sync: call rarely, on every rank)."""
    if world_size > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor.tolist()


def sync_buffers(model, world_size: int):
    """Rank 0's BatchNorm statistics on every rank (each rank's last forward updated its own)."""
    if world_size > 1:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


@torch.no_grad()
def evaluate(model, loader, normalize, optimizer, args, run, batches: int) -> dict:
    """test/loss, test/acc (top-1, %), test/acc5 (top-5, %) over all of val/, summed over the ranks.

    `batches`: the most batches a rank has; under --fsdp a rank with fewer runs forwards on a blank
    image until it has made as many (FSDP gathers the weights in each forward, with every rank)."""
    model.eval()
    sums = torch.zeros(4, device=run.device)  # loss sum, top-1 correct, top-5 correct, count
    with eval_weights(optimizer):
        for images, labels in run.progress(loader, desc="eval", leave=False):
            images, labels = normalize(images, labels)
            with harness.amp_context(args, run.device):
                out = model(images)
            hits = out.topk(min(5, out.shape[1]), dim=1).indices == labels[:, None]
            sums[0] += F.cross_entropy(out.float(), labels, reduction="sum")
            sums[1] += hits[:, 0].sum()
            sums[2] += hits.any(dim=1).sum()
            sums[3] += len(labels)
        if sharded.is_sharded(model):
            blank = torch.zeros(1, 3, args.image_size, args.image_size, device=run.device)
            for _ in range(len(loader), batches):
                with harness.amp_context(args, run.device):
                    model(blank)
    model.train()
    loss, top1, top5, count = all_reduce_sum(sums, run.world_size)
    return {"test/loss": loss / count, "test/acc": 100.0 * top1 / count, "test/acc5": 100.0 * top5 / count}


def main(argv=None) -> int:
    args = parse_args(argv)
    run = harness.start_run(args, "imagenet")
    device = run.device
    if args.batch_size % run.world_size:
        raise ValueError(f"--batch-size {args.batch_size} (global) is not divisible by the {run.world_size} "
                         f"ranks; use a multiple of {run.world_size}")
    train, val, num_classes, train_size = build_loaders(args, run.rank, run.world_size, device)
    steps_per_epoch = len(train)
    val_batches = torch.tensor([len(val)], device=device)  # rank 0's, the most: val/ is dealt out rank by rank
    if run.world_size > 1:
        dist.broadcast(val_batches, 0)
    normalize = Normalizer(device, args.channels_last)  # uint8 batch -> normalised float on the device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model = torchvision.models.resnet18(num_classes=num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
    model = harness.shard(model, blocks, args, device)  # --fsdp: one FSDP unit per residual block
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, total_steps=args.epochs * steps_per_epoch)
    scaler = harness.grad_scaler(args, device)
    # an overflow the scaler skipped is not divergence: the epoch's cumulative sums would keep its inf
    skips_overflow = scaler.is_enabled()

    epoch, batch, step = 0, 0, 0  # next epoch, next batch within it, optimizer steps done
    sums = torch.zeros(3, device=device)  # this epoch's train loss sum, correct, count (this rank; no sync)
    best, last = {}, {}
    logged, window_time = None, 0.0  # totals at the last log of this epoch, seconds since it (a resumed window)
    state = run.resume(model, optimizer, scheduler, scaler)
    if state is not None:
        epoch, batch, step = state["epoch"], state["batch"], state["step"]
        if run.is_main:  # saved summed over the ranks
            sums.copy_(state["epoch_sums"])
        best, last = state["best"], state["last"]
        # the log window a stop fell inside: the epoch's totals at its last log (older checkpoints: none)
        logged = state["logged_sums"].tolist() if state.get("logged_sums") is not None else None
        window_time = state.get("window_time", 0.0)
        if run.is_main:
            print(f"resumed {run.dir} at epoch {epoch + 1}, batch {batch}/{steps_per_epoch} (step {step})",
                  file=sys.stderr)
    net = harness.maybe_compile(harness.distribute(model, device, args), args)  # training forward; `model` is saved

    def progress():  # a checkpoint's entries besides the training state (every rank: it reduces the sums)
        return {"epoch": epoch, "batch": batch, "step": step, "best": best, "last": last,
                "epoch_sums": torch.tensor(all_reduce_sum(sums, run.world_size)),
                "logged_sums": torch.tensor(logged), "window_time": time.monotonic() - t_log}

    if run.is_main:
        print(f"imagenet: {train_size} training images, {num_classes} classes, {steps_per_epoch} steps/epoch, "
              f"{run.world_size} rank(s) x {args.batch_size // run.world_size} images, device {device}",
              file=sys.stderr)
    net.train()
    while epoch < args.epochs:
        set_train_position(train, epoch, batch)  # the epoch's sample order, minus the batches done
        if logged is None:  # the epoch's totals at the last log (a resume inside a window: saved)
            logged = all_reduce_sum(sums, run.world_size)
        t_epoch = time.monotonic()
        t_log, window_time = t_epoch - window_time, 0.0
        images_here = 0
        bar = run.progress(steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", initial=batch, leave=False)
        with run.checkpoint_on(DatasetError, progress):  # an unreadable image: keep the steps done
            for images, labels in train:
                images, labels = normalize(images, labels)
                with harness.amp_context(args, device):
                    out = net(images)
                    loss = F.cross_entropy(out, labels)
                harness.backward_and_step(loss, optimizer, scaler, scheduler)
                step, batch, images_here = step + 1, batch + 1, images_here + len(labels)
                with torch.no_grad():  # device-side sums, read every --log-every steps
                    batch_sums = torch.stack([loss.detach().float() * len(labels),
                                              (out.argmax(1) == labels).sum().float(),
                                              torch.full((), float(len(labels)), device=device)])
                    if skips_overflow:  # a loss the GradScaler skipped (fp16 overflow) stays out of the sums
                        batch_sums = torch.where(torch.isfinite(batch_sums[0]), batch_sums, 0.0)
                    sums += batch_sums
                bar.update()
                if run.is_log_step(step):  # every rank: the sums are reduced over the ranks
                    totals = all_reduce_sum(sums, run.world_size)
                    loss_sum, correct, count = (a - b for a, b in zip(totals, logged))
                    count = count or math.nan  # a window of skipped steps only: logged as null, as one overflow
                    now = time.monotonic()
                    record = {"epoch": epoch + batch / steps_per_epoch, "train/loss": loss_sum / count,
                              "train/acc": 100.0 * correct / count, "images_per_s": count / (now - t_log)}
                    run.log_step(optimizer, step, record)
                    bar.set_postfix(loss=f"{record['train/loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                    logged, t_log = totals, now
                if run.should_stop(step):
                    bar.close()
                    return run.stop(progress(), f"at epoch {epoch + 1}, batch {batch}/{steps_per_epoch}")
        bar.close()

        train_loss, train_correct, train_count = all_reduce_sum(sums, run.world_size)
        train_count = train_count or math.nan
        images_per_s = images_here * run.world_size / max(time.monotonic() - t_epoch, 1e-9)
        sync_buffers(model, run.world_size)
        test = evaluate(model, val, normalize, optimizer, args, run, int(val_batches))
        epoch, batch = epoch + 1, 0
        last = {"epoch": epoch, "train/loss": train_loss / train_count, "train/acc": 100.0 * train_correct / train_count,
                **test, "images_per_s": images_per_s}
        if not best or test["test/acc"] > best["test/acc"]:
            best = {"test/acc": test["test/acc"], "test/acc5": test["test/acc5"], "epoch": epoch}
        run.log(last, step)  # a non-finite loss ends the run as diverged
        if run.is_main:
            bar.write(f"epoch {epoch}/{args.epochs}  train loss {last['train/loss']:.4f} acc {last['train/acc']:.2f}%"
                      f"  val loss {test['test/loss']:.4f} top-1 {test['test/acc']:.2f}% top-5 {test['test/acc5']:.2f}%"
                      f"  ({images_per_s:.0f} img/s)")
        sums.zero_()
        logged, t_log = [0.0] * len(sums), time.monotonic()  # the next epoch's window starts at its start
        run.checkpoint(progress())
        if epoch < args.epochs and run.should_stop(step):
            return run.stop(progress(), f"after epoch {epoch}")

    if args.weights_checksum:  # every rank (a collective under --fsdp)
        print(f"weights-checksum rank={run.rank} {sharded.weights_digest(model)} "  # one write: ranks share stdout
              f"step_sizes={effective_step_sizes(optimizer).tolist()}\n", end="", flush=True)
    run.finish({"final": last, "best": best})
    if run.is_main and last:
        print(f"best top-1 {best['test/acc']:.2f}% (epoch {best['epoch']}), final top-1 {last['test/acc']:.2f}% "
              f"top-5 {last['test/acc5']:.2f}%")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
