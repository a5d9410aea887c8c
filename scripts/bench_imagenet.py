"""Training throughput (images/s) of MetaOptimize against torch AdamW on the ImageNet ResNet-18.

    python3 scripts/bench_imagenet.py                               # GPU: batch 256, 224 px, float32
    python3 scripts/bench_imagenet.py --amp bf16 --channels-last    # the fast GPU setting
    python3 scripts/bench_imagenet.py --device cpu --image-size 64 --batch-size 16 --steps 3 --reps 3
    # real JPEG decoding: write an ImageNet-like folder once, then time the loader against the GPU
    python3 scripts/bench_imagenet.py --make-folder /tmp/fake_imagenet
    python3 scripts/bench_imagenet.py --data-dir /tmp/fake_imagenet --workers 16

Each optimizer trains its own copy of torchvision's ResNet-18 (same initial weights) in one
process, in interleaved repetitions (the order alternates), on a fixed synthetic uint8 batch that
lives on the device (train.py --dummy): no data loading is timed. A step is what train.py does:
normalise the batch, forward, cross-entropy, backward, optimizer step (and the cosine schedule
of the AdamW baseline). The optimizers are built by common.specs.build_optimizer from specs of the
paper's settings, as train.py builds them (torch AdamW fused, the fastest torch has, on CPU too).
Prints images/s per optimizer (median over repetitions) and the ratio MetaOptimize / AdamW.

With --data-dir it also times the training loader alone (JPEG decode, RandomResizedCrop, flip,
--workers processes) and one optimizer on the real loader, and says which is the bottleneck.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "imagenet"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from data import DummyLoader, Normalizer, build_loaders, set_train_position  # noqa: E402

from common import harness  # noqa: E402
from common.benchmark import interleaved, sync  # noqa: E402
from common.specs import build_optimizer, build_scheduler  # noqa: E402

# key -> (label, the optimizer's spec, as train.py's flags give it): the paper's ImageNet settings (spec section 7)
OPTIMIZERS = {
    "adamw": ("torch AdamW (cosine)", {"optimizer": "AdamW", "lr": 1e-3, "warmup_steps": 10000}),
    "adamw-lion": ("MetaOptimize (AdamW, Lion)", {"optimizer": "HF", "alg_base": "AdamW", "alg_meta": "Lion",
                                                  "alpha0": 1e-6}),
    "adamw-lion-blocks": ("MetaOptimize (AdamW, Lion) blocks",
                          {"optimizer": "HF", "alg_base": "AdamW", "alg_meta": "Lion", "alpha0": 1e-6,
                           "stepsize_groups": "resnet18_blocks"}),
    "lion-lion": ("MetaOptimize (Lion, Lion)",
                  {"optimizer": "HF", "alg_base": "Lion", "momentum_param_base": 0.99, "Lion_beta2_base": 0.9,
                   "alg_meta": "Lion", "alpha0": 1e-6}),
    "sgdm-lion": ("MetaOptimize (SGDm, Lion)", {"optimizer": "HF", "alg_base": "SGDm", "alg_meta": "Lion",
                                                "alpha0": 1e-5}),
}
BASELINE = "adamw"


def parse_args(argv=None):
    p = harness.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (default 256)")
    p.add_argument("--image-size", type=int, default=224, help="square crop size (default 224)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repetition (default 20)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per optimizer, interleaved (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first (default 3)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast (default none)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--optimizers", default="adamw,adamw-lion,lion-lion",
                   help=f"comma-separated, from: {', '.join(OPTIMIZERS)} (default adamw,adamw-lion,lion-lion)")
    p.add_argument("--data-dir", default=None, help="also time real JPEG loading from this ImageFolder")
    p.add_argument("--workers", type=int, default=8, help="--data-dir: loader processes (default 8)")
    p.add_argument("--make-folder", default=None,
                   help="write an ImageNet-like folder of random JPEGs here (500x375) and exit")
    p.add_argument("--classes", type=int, default=10, help="--make-folder: classes (default 10)")
    p.add_argument("--per-class", type=int, default=260, help="--make-folder: training images per class")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    for name in ("batch_size", "image_size", "steps", "reps", "classes", "per_class"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or BASELINE not in names:
        p.error(f"--optimizers: {', '.join(unknown) or 'no ' + BASELINE}; give a comma-separated list from "
                f"{', '.join(OPTIMIZERS)}, including {BASELINE}")
    args.optimizers = names
    return args


def make_folder(root: Path, classes: int, per_class: int) -> None:
    """root/{train,val}/nXXXXXXXX/*.JPEG: smooth random 500x375 JPEGs (ImageNet's typical size and quality)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", max(1, per_class // 26))):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # upsampled: compresses like a photo
                image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
                noise = rng.integers(-12, 13, (375, 500, 3))
                pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", quality=90)
    print(f"wrote {classes * (per_class + max(1, per_class // 26))} JPEGs under {root}")


def main():
    args = parse_args()
    if args.make_folder:
        make_folder(Path(args.make_folder), args.classes, args.per_class)
        return 0
    device = harness.resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    normalize = Normalizer(device, args.channels_last)
    runs = {}
    for key in args.optimizers:
        name, spec = OPTIMIZERS[key]
        m = copy.deepcopy(model)
        opt = build_optimizer(m, spec)
        runs[name] = dict(model=m, net=harness.maybe_compile(m, args), optimizer=opt,
                          scheduler=build_scheduler(opt, spec, total_steps=90 * 5005),
                          scaler=harness.grad_scaler(args, device))
    del model
    dummy = DummyLoader(1, args.batch_size, args.image_size, 1000, device, seed=0)

    def train_steps(name, batches, n):
        r = runs[name]
        done = 0
        for images, labels in batches:
            images, labels = normalize(images, labels)
            with harness.amp_context(args, device):
                loss = F.cross_entropy(r["net"](images), labels)
            r["optimizer"].zero_grad(set_to_none=True)
            r["scaler"].scale(loss).backward()
            r["scaler"].step(r["optimizer"])
            r["scaler"].update()
            if r["scheduler"] is not None:
                r["scheduler"].step()
            done += 1
            if done == n:
                return done
        return done

    synthetic = itertools.repeat((dummy.images, dummy.labels))

    for name in runs:
        train_steps(name, synthetic, args.warmup)
    images = args.batch_size * args.steps
    timed = interleaved(
        {name: lambda name=name: train_steps(name, synthetic, args.steps) for name in runs}, args.reps, device,
        on_round=lambda rep, t: print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{n} {images / v.wall[-1]:,.1f}" for n, v in t.items()) + " images/s", flush=True))
    rates = {name: [images / s for s in t.wall] for name, t in timed.items()}

    median = {n: statistics.median(r) for n, r in rates.items()}
    baseline = OPTIMIZERS[BASELINE][0]
    base = median[baseline]
    print(f"\ndevice {device}, batch {args.batch_size}, {args.image_size} px, amp {args.amp}, channels-last "
          f"{args.channels_last}, compile {args.compile}; {args.steps} steps x {args.reps} reps, synthetic data")
    for n, v in median.items():
        extra = "" if n == baseline else f"   ratio to torch AdamW {v / base:.3f} ({100 * (base / v - 1):+.1f}% time)"
        print(f"  {n:36s} {v:10,.1f} images/s  {1000 * args.batch_size / v:8.1f} ms/step{extra}")
    ratios = {n: v / base for n, v in median.items() if n != baseline}
    result = {"device": str(device), "args": vars(args), "images_per_s": median, "all": rates, "ratio": ratios}

    if args.data_dir:
        result.update(real_data(args, device, runs, train_steps, median))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def real_data(args, device, runs, train_steps, median) -> dict:
    """Loader alone vs a MetaOptimize step on the real loader: which one limits images/s."""
    loader_args = argparse.Namespace(dummy=False, data_dir=args.data_dir, image_size=args.image_size,
                                     batch_size=args.batch_size, workers=args.workers, seed=0)
    train, _, _, size = build_loaders(loader_args, 0, 1, device)
    n = min(len(train), args.steps * args.reps)
    if n < 2:
        raise ValueError(f"--data-dir {args.data_dir}: {size} training images make fewer than 2 batches of "
                         f"--batch-size {args.batch_size}")
    set_train_position(train, 0)
    it = iter(train)
    next(it)  # workers started
    t = time.perf_counter()
    for _ in range(n - 1):
        images, labels = next(it)
        images.to(device, non_blocking=True)
    sync(device)
    loader_rate = (n - 1) * args.batch_size / (time.perf_counter() - t)
    del it
    name = next(k for k in runs if k != OPTIMIZERS[BASELINE][0])
    set_train_position(train, 1)
    it = iter(train)
    train_steps(name, it, 1)  # workers started, first batch
    sync(device)
    t = time.perf_counter()
    done = train_steps(name, it, n - 1)
    sync(device)
    e2e_rate = done * args.batch_size / (time.perf_counter() - t)
    compute = median[name]
    bottleneck = "the data loader" if loader_rate < compute else f"the model step ({device.type})"
    print(f"\nreal JPEGs from {args.data_dir} ({size} images), --workers {args.workers}, {n - 1} batches:")
    print(f"  loader alone (decode + crop + flip, to device)  {loader_rate:10,.1f} images/s")
    print(f"  {name} on synthetic data {compute:10,.1f} images/s")
    print(f"  {name} on the real loader {e2e_rate:10,.1f} images/s")
    print(f"  bottleneck: {bottleneck}")
    return {"loader_images_per_s": loader_rate, "real_data_images_per_s": e2e_rate, "bottleneck": bottleneck}


if __name__ == "__main__":
    harness.run_main(main)
