"""ImageNet data: class-folder datasets, the standard augmentation, loaders, synthetic data.

Layout expected under --data-dir (as for pytorch/examples' imagenet/main.py):
    train/<class>/<image>.JPEG   and   val/<class>/<image>.JPEG
(the official validation set comes flat; sort it into class folders first, e.g. with the
well-known `valprep.sh`).

Workers decode and crop JPEGs and hand back uint8 CHW tensors; the float conversion and
the ImageNet mean/std normalisation run on the device (`to_device`), which moves 4x less
data to the GPU and keeps the workers' CPU for decoding.

Mid-epoch resume: the training order is a seeded permutation per epoch (DistributedSampler,
also with one process), and `set_train_position(loader, epoch, start_batch)` skips the
batches already trained on. Each training image's crop and flip are drawn from a random
state seeded by (--seed, epoch, image index), in whichever worker decodes it, so a resumed run
sees exactly the remaining images of that epoch, augmented exactly as an uninterrupted run
augments them, whatever --workers is; the loaders draw nothing from torch's global RNG.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from common.data import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DUMMY_CLASSES = 1000
LAYOUT = "expected <data-dir>/train/<class>/*.JPEG and <data-dir>/val/<class>/*.JPEG, or use --dummy"


class UnreadableImage(DatasetError):
    """An image file that cannot be decoded (truncated, not an image): the message names the file.

    Raised in a DataLoader worker, it reaches the training loop rebuilt from the worker's whole
    traceback text; the constructor keeps only the original message, so the error stays one line.
    """

    def __init__(self, message: str):
        if "Original Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class CheckedImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose layout problems are one ValueError naming the folder and what is missing,
    and whose unreadable images are an UnreadableImage naming the file."""

    def __getitem__(self, key):
        """`key`: an index, or (index, seed, epoch) from ResumableSampler: the transform's random draws
        then come from a state seeded by (seed, epoch, index), and torch's global RNG is left alone."""
        index, *seed = key if isinstance(key, tuple) else (key,)
        try:
            if not seed:
                return super().__getitem__(index)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(np.random.SeedSequence((*seed, index)).generate_state(1, np.uint64)[0]))
                return super().__getitem__(index)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated file, unknown format, ...
            raise UnreadableImage(f"--data-dir: cannot read image {self.samples[index][0]} "
                                  f"({type(e).__name__}: {e}); remove or replace it") from None

    def find_classes(self, directory):
        if not os.path.isdir(directory):
            parent = os.path.dirname(directory.rstrip(os.sep))
            raise ValueError(f"--data-dir {parent}: missing {os.path.basename(directory)}/ folder ({LAYOUT})")
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            flat = any(e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(directory))
            hint = ("; its images lie directly in it: sort them into one folder per class (for ImageNet's "
                    "validation set, e.g. with the well-known valprep.sh)") if flat else ""
            raise ValueError(f"--data-dir: {directory} has no class folders ({LAYOUT}){hint}")
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = torchvision.datasets.folder.make_dataset(
            directory, class_to_idx, extensions=extensions, is_valid_file=is_valid_file, allow_empty=True)
        found = {target for _, target in samples}
        empty = [c for c, i in class_to_idx.items() if i not in found]
        if empty:
            where = os.path.join(directory, empty[0])
            more = f" (and {len(empty) - 1} more class folders)" if len(empty) > 1 else ""
            raise ValueError(f"--data-dir: no images in {where}{more}; expected files ending in "
                             f"{', '.join(IMG_EXTENSIONS)}")
        return samples


def train_transform(image_size: int):
    """RandomResizedCrop + horizontal flip, as uint8 CHW (normalised later on the device)."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ])


def val_transform(image_size: int):
    """Resize to 256/224 of the crop, center crop (256 -> 224 at the standard size), as uint8 CHW."""
    return v2.Compose([
        v2.Resize(round(image_size * 256 / 224), antialias=True),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
    ])


def image_folders(data_dir: str, image_size: int):
    """(train, val) ImageFolder datasets; ValueError naming what is missing for a malformed dir."""
    if not data_dir:
        raise ValueError(f"--data-dir is required unless --dummy is given ({LAYOUT})")
    if not os.path.isdir(data_dir):
        raise ValueError(f"--data-dir {data_dir}: no such directory ({LAYOUT})")
    train = CheckedImageFolder(os.path.join(data_dir, "train"), train_transform(image_size))
    val = CheckedImageFolder(os.path.join(data_dir, "val"), val_transform(image_size))
    if val.classes != train.classes:
        extra = sorted(set(val.classes) - set(train.classes))
        missing = sorted(set(train.classes) - set(val.classes))
        raise ValueError(
            f"--data-dir {data_dir}: val/ and train/ class folders differ "
            f"({len(train.classes)} in train/, {len(val.classes)} in val/; "
            f"only in val/: {extra[:3]}, only in train/: {missing[:3]})")
    return train, val


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch) that can start part-way through an epoch. It
    yields (index, seed, epoch) keys: CheckedImageFolder seeds each image's augmentation with them."""

    def __init__(self, dataset, num_replicas, rank, seed, batch_size):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.start = 0  # samples of this rank's share to skip

    def set_position(self, epoch: int, start_batch: int):
        self.set_epoch(epoch)
        self.start = start_batch * self.batch_size

    def __iter__(self):
        indices = list(super().__iter__())
        return iter([(i, self.seed, self.epoch) for i in indices[self.start:]])

    def __len__(self):
        return max(0, self.num_samples - self.start)


class DummyLoader:
    """Synthetic batches for smoke tests and throughput: one random uint8 batch made once on the
    device and handed out `num_batches` times, so no host work or transfer is measured."""

    def __init__(self, num_batches, batch_size, image_size, num_classes, device, seed):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8,
                                    generator=gen).to(device)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        self.num_batches = num_batches
        self.start = 0

    def set_position(self, epoch: int, start_batch: int):
        self.start = start_batch

    def __len__(self):
        return max(0, self.num_batches - self.start)

    def __iter__(self):
        for _ in range(len(self)):
            yield self.images, self.labels


def set_train_position(loader, epoch: int, start_batch: int = 0):
    """Select the epoch's sample order and skip the first `start_batch` batches (resume)."""
    target = loader if isinstance(loader, DummyLoader) else loader.sampler
    target.set_position(epoch, start_batch)


def build_loaders(args, rank: int, world_size: int, device: torch.device):
    """(train_loader, val_loader, num_classes, train_size). Batches are per rank: global / world_size.

    Real data: train uses ResumableSampler; val is split by rank without padding (every image
    counted once when the ranks' sums are reduced).
    """
    per_rank = args.batch_size // world_size
    if args.dummy:
        n_train = max(1, args.dummy_size // args.batch_size)
        n_val = max(1, n_train // 25)
        train = DummyLoader(n_train, per_rank, args.image_size, DUMMY_CLASSES, device, args.seed + rank)
        val = DummyLoader(n_val, per_rank, args.image_size, DUMMY_CLASSES, device, args.seed + 1000 + rank)
        return train, val, DUMMY_CLASSES, n_train * args.batch_size
    train_set, val_set = image_folders(args.data_dir, args.image_size)
    if len(train_set) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images "
                         f"in {args.data_dir}/train")
    pin = device.type == "cuda"
    # a generator of their own: the loaders' worker seeds are not drawn from torch's global RNG
    common = dict(num_workers=args.workers, pin_memory=pin, persistent_workers=args.workers > 0,
                  generator=torch.Generator().manual_seed(args.seed))
    if args.workers > 0:
        common["prefetch_factor"] = 4
    sampler = ResumableSampler(train_set, world_size, rank, args.seed, per_rank)
    train = DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=True, **common)
    val_part = Subset(val_set, range(rank, len(val_set), world_size))
    val = DataLoader(val_part, batch_size=per_rank, shuffle=False, drop_last=False, **common)
    return train, val, len(train_set.classes), len(train_set)


class Normalizer:
    """uint8 NCHW batch -> normalised float on the device (channels-last if asked), non-blocking."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images, labels):
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format).float()
        return images.sub_(self.mean).mul_(self.inv_std), labels
