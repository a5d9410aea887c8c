"""The optimizees' data: MNIST, or scikit-learn's digits when MNIST is not on disk.

    --data auto      MNIST when its idx files are in --data-dir (torchvision layout), else digits28
    --data mnist     MNIST, downloaded into --data-dir when missing
    --data digits    scikit-learn's 8x8 digits (64 inputs: fast)
    --data digits28  the digits upsampled to 28x28 (784 inputs, the paper's 784 -> 20 -> 10 shape)

Images enter the optimizees as x / 255 in [0, 1] (the paper does not normalise). A run's training
batches come from `StepBatches`: batch t of an endless stream whose order depends only on a seed,
so a resumed optimizee run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from torch import Tensor

from common.data import DeviceBatches, ImageData, load_digits, load_mnist, mnist_present, normalize

DATASETS = ("auto", "mnist", "digits", "digits28")


def resolve_dataset(name: str, data_dir) -> str:
    """The dataset a --data value stands for ("auto" -> "mnist" if present, else "digits28")."""
    if name not in DATASETS:
        raise ValueError(f"--data: unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    if name == "auto":
        return "mnist" if mnist_present(data_dir) else "digits28"
    return name


def load_dataset(name: str, data_dir, download: bool = True, device=None, batch_size: int = 1) -> ImageData:
    """An already resolved dataset name (see `resolve_dataset`) -> uint8 images [N, 1, H, W] on `device`.

    Raises ValueError when the training split has fewer images than `batch_size`.
    """
    if name == "mnist":
        data = load_mnist(data_dir, download=download)
    elif name in ("digits", "digits28"):
        data = load_digits(8 if name == "digits" else 28)
    else:
        raise ValueError(f"--data: unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    if len(data.train_x) < batch_size:
        raise ValueError(f"--batch-size {batch_size} is larger than the {len(data.train_x)} training images of {name}")
    if device is not None:
        for split in ("train_x", "train_y", "test_x", "test_y"):
            setattr(data, split, getattr(data, split).to(device))
    return data


class StepBatches:
    """`batches(t)`: training batch t (float x in [0, 1], int64 y) of a seeded stream of epochs.

    Batch t is batch t mod n of epoch t // n (n full batches per epoch, the rest dropped), in an
    order drawn from (seed, epoch) only. Consecutive calls are served from one pass over the epoch.
    """

    def __init__(self, x_uint8: Tensor, y: Tensor, batch_size: int, *, seed: int, device):
        self.batches = DeviceBatches(x_uint8, y, batch_size, device=device, seed=seed, drop_last=True,
                                     mean=0.0, std=1.0)
        self._iter, self._next = None, None

    def __call__(self, t: int) -> tuple[Tensor, Tensor]:
        epoch, batch = divmod(int(t), len(self.batches))
        if self._next != (epoch, batch):
            self._iter = self.batches.epoch(epoch, start_batch=batch)
        self._next = (epoch, batch + 1)
        return next(self._iter)


def as_float(x_uint8: Tensor) -> Tensor:
    """A whole split as the optimizees see it (x / 255)."""
    return normalize(x_uint8, 0.0, 1.0)
