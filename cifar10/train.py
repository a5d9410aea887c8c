"""CIFAR-10, ResNet-18, MetaOptimize: the paper's Section 7.1.1 experiment.

    python3 cifar10/train.py                      # the paper's default: (AdamW, Lion), scalar, 60 epochs
    python3 cifar10/train.py --optimizer HF --alg-base Lion --weight-decay-base .1 --momentum-param-base .99 \
        --Lion-beta2-base .9 --alg-meta Lion --momentum-param-meta .99 --Lion-beta2-meta .9 --alpha0 1e-6 \
        --stepsize-groups resnet18_blocks --run-name lion-lion-blocks
    python3 cifar10/train.py --optimizer AdamW --lr 1e-3 --warmup-steps 1000   # cosine-schedule baseline

The whole dataset sits on the device; a run writes <save-directory>/<run-name>/ (config.json,
metrics.jsonl, checkpoint.pt every epoch, summary.json at the end). SIGTERM/SIGUSR1/Ctrl-C or
--max-time save a checkpoint at the current batch and exit 0; rerun with --resume to continue.
A non-finite loss, weight or step size ends the run as diverged (exit code 3, docs/CONTRACTS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common` without installing the repo

import torch
import torch.nn.functional as F

from common import harness
from common.data import DeviceBatches, load_cifar
from common.models import cifar_resnet18
from common.optim_flags import add_optimizer_args, build_optimizer, build_scheduler, eval_weights

# the paper's CIFAR-10 setting (spec section 7); every one is a flag
NUM_EPOCHS = 60
BATCH_SIZE = 100
EVAL_BATCH_SIZE = 500  # evaluation is in eval mode (BatchNorm running stats): no effect on results
DATA_DIR = "./data"
WARMUP_STEPS = 1000  # --optimizer AdamW baseline only


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.ArgParser(
        description="Train ResNet-18 on CIFAR-10 with MetaOptimize (Sharifnassab et al., ICML 2025). "
                    "Paper symbols are in brackets; -1 leaves a hyperparameter unset.")
    g = parser.add_argument_group("CIFAR-10")
    g.add_argument("--num-epochs", type=int, default=NUM_EPOCHS, help="epochs over the 50,000 training images")
    g.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="mini-batch size")
    g.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE, help="batch size of the test evaluation")
    g.add_argument("--data-dir", default=DATA_DIR,
                   help="folder holding cifar-10-batches-py/ (downloaded there when missing)")
    g.add_argument("--augment", action="store_true",
                   help="random crop (padding 4) + horizontal flip; off in the paper")
    add_optimizer_args(parser)
    harness.add_run_args(parser)
    parser.set_defaults(warmup_steps=WARMUP_STEPS)
    args = parser.parse_args(argv)
    harness.require_positive(parser, args, "num_epochs", "batch_size", "eval_batch_size")
    harness.check_args(args)
    harness.check_stepsize_groups(args, lambda: cifar_resnet18(num_classes=10))  # its tensors: any class count
    return args


@torch.no_grad()
def evaluate(model, batches, optimizer, args, device) -> tuple[float, float]:
    """Test loss and accuracy (%) on the weights the optimizer wants evaluated; one host sync."""
    model.eval()
    sums = torch.zeros(3, device=device)  # loss sum, correct, count
    with eval_weights(optimizer):
        for x, y in batches.epoch(0):
            with harness.amp_context(args, device):
                out = model(x)
            sums[0] += F.cross_entropy(out.float(), y, reduction="sum")
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
    model.train()
    loss, correct, count = sums.tolist()
    return loss / count, 100.0 * correct / count


def main(argv=None) -> int:
    args = parse_args(argv)
    run = harness.start_run(args, "cifar10")
    if run.world_size > 1:
        raise harness.UsageError("cifar10/train.py trains on one device; start it with python3, not torchrun")
    device = run.device

    data = load_cifar("cifar10", args.data_dir)
    train = DeviceBatches(data.train_x, data.train_y, args.batch_size, device=device, seed=args.seed,
                          augment=args.augment)
    test = DeviceBatches(data.test_x, data.test_y, args.eval_batch_size, device=device, seed=0, shuffle=False)
    model = cifar_resnet18(num_classes=len(data.classes)).to(device)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, total_steps=args.num_epochs * len(train))
    scaler = harness.grad_scaler(args, device)
    fmodel = harness.maybe_compile(model, args)  # the forward pass; `model` is what we save

    epoch, batch, step = 0, 0, 0  # next epoch, next batch within it, optimizer steps done
    sums = torch.zeros(3, device=device)  # this epoch's train loss sum, correct, count (no per-step sync)
    history, best = [], {}
    state = run.resume(model, optimizer, scheduler, scaler)
    if state is not None:
        if state["batches_per_epoch"] != len(train):
            raise harness.UsageError(f"--resume: the checkpoint has {state['batches_per_epoch']} batches per epoch, "
                                     f"this run {len(train)}; resume with the same --batch-size and data")
        epoch, batch, step = state["epoch"], state["batch"], state["step"]
        sums.copy_(state["epoch_sums"])
        history, best = state["history"], state["best"]
        print(f"resumed {run.dir} at epoch {epoch + 1}, batch {batch}/{len(train)} (step {step})", file=sys.stderr)

    def progress():  # a checkpoint's entries besides the training state
        return {"epoch": epoch, "batch": batch, "step": step, "epoch_sums": sums, "history": history, "best": best,
                "batches_per_epoch": len(train)}

    model.train()
    while epoch < args.num_epochs:
        t_epoch, images_here = time.monotonic(), 0
        bar = run.progress(len(train), desc=f"epoch {epoch + 1}/{args.num_epochs}", initial=batch, leave=False)
        for x, y in train.epoch(epoch, start_batch=batch):
            with harness.amp_context(args, device):
                out = fmodel(x)
                loss = F.cross_entropy(out, y)
            harness.backward_and_step(loss, optimizer, scaler, scheduler)
            step, batch, images_here = step + 1, batch + 1, images_here + len(y)
            with torch.no_grad():  # device-side sums, read once per epoch
                sums[0] += loss.detach().float() * len(y)
                sums[1] += (out.argmax(1) == y).sum()
                sums[2] += len(y)
            bar.update()
            run.log_step(optimizer, step)
            if run.should_stop(step):
                bar.close()
                return run.stop(progress(), f"at epoch {epoch + 1}, batch {batch}/{len(train)}")
        bar.close()

        train_loss, train_correct, train_count = sums.tolist()  # the epoch's one host sync (plus eval)
        train_time = time.monotonic() - t_epoch
        test_loss, test_acc = evaluate(fmodel, test, optimizer, args, device)
        epoch, batch = epoch + 1, 0
        record = {"epoch": epoch, "train/loss": train_loss / train_count,
                  "train/acc": 100.0 * train_correct / train_count, "test/loss": test_loss, "test/acc": test_acc,
                  "images_per_s": images_here / max(train_time, 1e-9)}
        run.log(record, step)
        history.append(record)
        if not best or test_acc > best["test/acc"]:
            best = {"test/acc": test_acc, "epoch": epoch}
        if run.is_main:
            bar.write(f"epoch {epoch}/{args.num_epochs}  train loss {record['train/loss']:.4f} "
                      f"acc {record['train/acc']:.2f}%  test loss {test_loss:.4f} acc {test_acc:.2f}%  "
                      f"({record['images_per_s']:.0f} img/s)")
        sums.zero_()
        run.checkpoint(progress())
        if epoch < args.num_epochs and run.should_stop(step):
            return run.stop(progress(), f"after epoch {epoch}")

    final = history[-1] if history else {}
    run.finish({"final": final, "best": best})
    if final:
        print(f"best test acc {best['test/acc']:.2f}% (epoch {best['epoch']}), "
              f"final test acc {final['test/acc']:.2f}%")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
