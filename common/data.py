"""CIFAR-10 / CIFAR-100 loading and whole-dataset-on-device batching.

    data = load_cifar("cifar10", "data")                  # downloads + extracts when missing
    train = DeviceBatches(data.train_x, data.train_y, 100, device="cuda", seed=0)
    for epoch in range(epochs):
        for x, y in train.epoch(epoch):                    # float32 [B,3,32,32], int64 [B] on device
            ...

The whole split lives on the device as uint8; each batch is gathered, (optionally) augmented
and normalised there. The order and augmentation of an epoch depend only on (seed, epoch), so a
run resumed at batch k of epoch e sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.download import DownloadError, download, extract_tar, file_lock

# The official "python version" archives (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "archive": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "train_files": [f"data_batch_{i}" for i in range(1, 6)],
        "test_files": ["test_batch"],
        "meta_file": "batches.meta",
        "classes_key": "label_names",
        "labels_key": "labels",
        "num_classes": 10,
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "archive": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "train_files": ["train"],
        "test_files": ["test"],
        "meta_file": "meta",
        "classes_key": "fine_label_names",
        "labels_key": "fine_labels",
        "num_classes": 100,
    },
}


class DatasetError(RuntimeError):
    """A dataset is missing or malformed (the message says what is expected and where to get it)."""


@dataclass
class ImageData:
    """A labelled image set split in train and test (CIFAR, MNIST, scikit-learn's digits)."""

    train_x: Tensor  # uint8 [N, C, H, W], e.g. [N, 3, 32, 32] for CIFAR
    train_y: Tensor  # int64 [N]
    test_x: Tensor
    test_y: Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


CifarData = ImageData  # the name the CIFAR experiments use


# --------------------------------------------------------------------------------------
# CIFAR loading
# --------------------------------------------------------------------------------------


def _cifar_info(name: str) -> dict:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in CIFAR:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(CIFAR)}")
    return CIFAR[key]


def _expected_files(info: dict) -> list[str]:
    return [*info["train_files"], *info["test_files"], info["meta_file"]]


def _layout(info: dict) -> str:
    return f"{info['folder']}/{{{','.join(_expected_files(info))}}}"


def _unpickle(path: Path, info: dict) -> dict:
    """A CIFAR pickle (python-2 pickles with bytes keys; str keys are accepted too)."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DatasetError(
            f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}); delete {path.parent} "
            f"and download {info['url']} again"
        ) from None
    if not isinstance(d, dict):
        raise DatasetError(
            f"{path} holds a {type(d).__name__}, expected a dict; is it the python-version CIFAR?"
        )
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_split(folder: Path, files: list[str], info: dict) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for fname in files:
        d = _unpickle(folder / fname, info)
        if "data" not in d or info["labels_key"] not in d:
            raise DatasetError(
                f"{folder / fname} has keys {sorted(d)}, expected 'data' and {info['labels_key']!r}"
            )
        data = np.asarray(d["data"])
        # the format is uint8 pixels: a cast would silently turn floats in [0, 1] into 0 and wrap 256 to 0
        if data.dtype != np.uint8:
            integral = np.issubdtype(data.dtype, np.integer)
            if not integral or (data.size and (int(data.min()) < 0 or int(data.max()) > 255)):
                what = f"{data.dtype} values" + (f" in [{data.min()}, {data.max()}]" if data.size else "")
                raise DatasetError(f"{folder / fname}: 'data' holds {what}; the format is uint8 pixels in [0, 255]")
            data = data.astype(np.uint8)
        labels = np.asarray(d[info["labels_key"]])
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"{folder / fname}: labels are {labels.dtype}, expected integers")
        labels = labels.astype(np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DatasetError(
                f"{folder / fname}: data has shape {data.shape} and {len(labels)} labels, "
                f"expected N x 3072 uint8 and N labels"
            )
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        ys.append(torch.from_numpy(labels))
    y = torch.cat(ys)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= info["num_classes"]):
        raise DatasetError(f"{folder}: labels outside [0, {info['num_classes']})")
    return torch.cat(xs), y


def _fetch_cifar(info: dict, data_dir: Path) -> None:
    """Download the archive into `data_dir` and extract the folder (files moved in atomically)."""
    archive = download(info["url"], data_dir / info["archive"], md5=info["md5"], desc=info["archive"])
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".extract-") as tmp:
        extract_tar(archive, tmp)
        src = Path(tmp) / info["folder"]
        missing = [f for f in _expected_files(info) if not (src / f).is_file()]
        if missing:
            raise DatasetError(
                f"{archive} does not contain {info['folder']}/{missing[0]}; delete it and retry"
            )
        dst = data_dir / info["folder"]
        dst.mkdir(exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                os.replace(f, dst / f.name)
            elif f.is_dir() and not (dst / f.name).exists():
                shutil.move(str(f), str(dst / f.name))


def load_cifar(name, data_dir, *, download=True) -> ImageData:
    """Load CIFAR-10 or CIFAR-100 ("cifar10" / "cifar100") from `data_dir`.

    Expects the official python-version folder (`cifar-10-batches-py/` or `cifar-100-python/`)
    inside `data_dir`; when it is missing the archive is downloaded (md5-checked) and extracted
    (with `download=False` only an archive already saved in `data_dir` is extracted). Raises DatasetError with what is missing and the URL to fetch by hand.
    """
    info = _cifar_info(name)
    data_dir = Path(data_dir).expanduser()
    folder = data_dir / info["folder"]

    def missing() -> list[str]:
        return [f for f in _expected_files(info) if not (folder / f).is_file()]

    if missing():
        what = f"{folder} is missing" if not folder.is_dir() else f"{folder / missing()[0]} is missing"
        by_hand = (
            f"download {info['url']} by hand and extract it in {data_dir} (expected layout: {_layout(info)})"
        )
        archive = data_dir / info["archive"]
        if not download and not archive.is_file():
            raise DatasetError(f"{name}: {what} and downloading is off; {by_hand}")
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            with file_lock(folder):
                if missing():  # another process may have fetched it while we waited for the lock
                    _fetch_cifar(info, data_dir)
        except DownloadError as e:
            raise DatasetError(
                f"{name}: {what} and the download failed: {e}, then extract it in {data_dir} "
                f"(expected layout: {_layout(info)})"
            ) from None
        except OSError as e:
            raise DatasetError(f"{name}: {what} and could not be created ({e}); {by_hand}") from None

    train_x, train_y = _read_split(folder, info["train_files"], info)
    test_x, test_y = _read_split(folder, info["test_files"], info)
    meta = _unpickle(folder / info["meta_file"], info)
    if info["classes_key"] not in meta:
        raise DatasetError(f"{folder / info['meta_file']} has no {info['classes_key']!r} entry")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[info["classes_key"]]]
    if len(classes) != info["num_classes"]:
        raise DatasetError(f"{folder / info['meta_file']}: {info['classes_key']!r} names {len(classes)} classes, "
                           f"{name} has {info['num_classes']}")
    return ImageData(train_x, train_y, test_x, test_y, classes)


# --------------------------------------------------------------------------------------
# On-device preprocessing
# --------------------------------------------------------------------------------------


def normalize(x_uint8: Tensor, mean=0.5, std=0.5) -> Tensor:
    """(x / 255 - mean) / std as float32 on x's device. mean/std: floats or per-channel sequences.

    The paper's CIFAR-10 normalisation is the default; `normalize(x, 0.0, 1.0)` gives x / 255.
    """
    x = x_uint8.float().div_(255.0)
    if not isinstance(mean, (int, float)):
        mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    if not isinstance(std, (int, float)):
        std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def draw_crop_flip(n: int, generator: torch.Generator, padding: int = 4) -> tuple[Tensor, Tensor]:
    """Random crop offsets [n, 2] in [0, 2*padding] and flip flags [n] (bool), on the generator's device."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=generator.device)
    flips = torch.randint(0, 2, (n,), generator=generator, device=generator.device).bool()
    return offsets, flips


def crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, padding: int = 4) -> Tensor:
    """Crop each image of x [N,C,H,W] from its zero-padded copy at `offsets` [N,2] (row, col),
    then mirror it horizontally where `flips` [N] is true. One gather, no per-sample loop."""
    n, _, h, w = x.shape
    offsets, flips = offsets.to(x.device, non_blocking=True), flips.to(x.device, non_blocking=True)
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = offsets[:, 0, None] + ar_h  # [N, H]
    cols = offsets[:, 1, None] + torch.where(flips[:, None], w - 1 - ar_w, ar_w)  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop (zero padding `padding`, same size as x) and horizontal flip of a batch x [N,C,H,W].

    Randomness comes from `generator` (drawn on its device, e.g. CPU, then moved to x's device):
    first the offsets, then the flips (see `draw_crop_flip`). Keeps x's dtype and device.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects a batch [N, C, H, W], got shape {tuple(x.shape)}")
    offsets, flips = draw_crop_flip(x.shape[0], generator, padding)
    return crop_flip(x, offsets, flips, padding)


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch) only (well mixed, so nearby seeds do not overlap)."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


class DeviceBatches:
    """Mini-batches of a whole split held on `device` (as uint8; normalised per batch on device).

    `len(obj)` is the number of batches per epoch; `obj.epoch(e, start_batch=k)` yields
    `(x_float32, y_int64)` for batches k, k+1, ... of epoch e. The shuffle order and the
    augmentation (random crop with padding 4 + horizontal flip) of epoch e are drawn up front
    from a generator seeded with (seed, e), so they do not depend on where the epoch started.
    """

    def __init__(
        self,
        x_uint8: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        device,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = False,
        mean=0.5,
        std=0.5,
        padding: int = 4,
    ):
        if not (isinstance(x_uint8, Tensor) and x_uint8.dtype == torch.uint8 and x_uint8.dim() == 4):
            got = (
                f"{x_uint8.dtype} of shape {tuple(x_uint8.shape)}"
                if isinstance(x_uint8, Tensor)
                else type(x_uint8)
            )
            raise ValueError(f"DeviceBatches: images must be a uint8 tensor [N, C, H, W], got {got}")
        if len(y) != len(x_uint8):
            raise ValueError(f"DeviceBatches: {len(x_uint8)} images but {len(y)} labels")
        if int(batch_size) < 1:
            raise ValueError(f"DeviceBatches: batch size must be a positive integer, got {batch_size}")
        if int(seed) < 0:
            raise ValueError(f"DeviceBatches: seed must be a non-negative integer, got {seed}")
        self.n = len(x_uint8)
        self.batch_size = int(batch_size)
        if self.n == 0 or (drop_last and self.n < self.batch_size):
            raise ValueError(f"DeviceBatches: {self.n} examples give no batch of size {self.batch_size}")
        self.device = torch.device(device)
        self.x = x_uint8.to(self.device)
        self.y = torch.as_tensor(y).to(self.device, dtype=torch.int64)
        self.seed = int(seed)
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        # per-channel statistics go to the device once, not per batch
        mean, std = (
            v if isinstance(v, (int, float)) else torch.as_tensor(v).float().to(self.device)
            for v in (mean, std)
        )
        self.mean, self.std, self.padding = mean, std, padding

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0):
        """Yield the batches of `epoch` from `start_batch` on (x float32 on device, y int64 on device)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(
                f"DeviceBatches.epoch: start_batch must be in [0, {len(self)}], got {start_batch}"
            )
        g = epoch_generator(self.seed, epoch)
        order = torch.randperm(self.n, generator=g).to(self.device) if self.shuffle else None
        if self.augment:
            offsets, flips = draw_crop_flip(self.n, g, self.padding)
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        bs = self.batch_size
        for b in range(start_batch, len(self)):
            lo, hi = b * bs, min((b + 1) * bs, self.n)
            if order is None:
                x, y = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.x[idx], self.y[idx]
            if self.augment:  # augmentation indexed by position in the epoch
                x = crop_flip(x, offsets[lo:hi], flips[lo:hi], self.padding)
            yield normalize(x, self.mean, self.std), y

    def __iter__(self):
        raise TypeError("DeviceBatches: iterate over obj.epoch(epoch) so the order depends on the epoch")


# --------------------------------------------------------------------------------------
# Continual learning
# --------------------------------------------------------------------------------------


def split_classes(num_classes: int, classes_per_task: int, seed: int) -> list[list[int]]:
    """A seeded permutation of range(num_classes) cut into tasks of `classes_per_task` classes.

    Within a task the classes keep the permutation order, so class task[i] gets the label i of the
    shared head.
    """
    if num_classes < 1 or classes_per_task < 1 or num_classes % classes_per_task:
        raise ValueError(
            f"split_classes: classes per task ({classes_per_task}) must be a positive divisor of the "
            f"number of classes ({num_classes})"
        )
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    perm = torch.randperm(num_classes, generator=g).tolist()
    return [perm[i : i + classes_per_task] for i in range(0, num_classes, classes_per_task)]


# --------------------------------------------------------------------------------------
# Grey-scale digits: MNIST and scikit-learn's bundled 8x8 digits
# --------------------------------------------------------------------------------------

# torchvision's layout: <data_dir>/MNIST/raw/<file> (the .gz archives are extracted beside them)
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's first mirror
DIGITS_TEST_FRACTION = 0.25  # scikit-learn's digits have no official split: a fixed, stratified one
DIGITS_SPLIT_SEED = 0


def mnist_folder(data_dir) -> Path:
    return Path(data_dir).expanduser() / "MNIST" / "raw"


def mnist_present(data_dir) -> bool:
    """True when the four uncompressed MNIST idx files are in torchvision's layout under `data_dir`."""
    return all((mnist_folder(data_dir) / f).is_file() for f in MNIST_FILES)


def load_mnist(data_dir, *, download=True) -> ImageData:
    """MNIST as uint8 [N, 1, 28, 28] images (60,000 train, 10,000 test) from `data_dir`.

    Reads torchvision's layout, `<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`,
    with torchvision's reader; when files are missing and `download` is true, torchvision downloads
    the md5-checked archives from its mirrors and extracts them there. Raises DatasetError saying
    what is missing or malformed and how to fetch the files by hand.
    """
    from torchvision.datasets import MNIST

    folder = mnist_folder(data_dir)
    by_hand = (f"download {', '.join(f + '.gz' for f in MNIST_FILES)} from {MNIST_URL} and gunzip them "
               f"into {folder}")
    missing = [f for f in MNIST_FILES if not (folder / f).is_file()]
    if missing:
        if not download:
            raise DatasetError(f"mnist: {folder / missing[0]} is missing and downloading is off; {by_hand}")
        try:
            with file_lock(folder):
                MNIST(str(Path(data_dir).expanduser()), train=True, download=True)
        except (RuntimeError, OSError) as e:
            raise DatasetError(f"mnist: {folder / missing[0]} is missing and the download failed "
                               f"({' '.join(str(e).split())[:200]}); {by_hand}") from None
    splits = []
    for train in (True, False):
        prefix = "train" if train else "t10k"
        try:
            ds = MNIST(str(Path(data_dir).expanduser()), train=train, download=False)
            x, y = ds.data, ds.targets
        except Exception as e:  # torchvision raises bare errors for a truncated or foreign file
            raise DatasetError(f"mnist: cannot read {folder}/{prefix}-images-idx3-ubyte / {prefix}-labels-idx1-ubyte "
                               f"({type(e).__name__}: {e}); delete them and download again") from None
        if x.dtype != torch.uint8 or x.dim() != 3 or len(x) != len(y):
            raise DatasetError(f"mnist: {folder}/{prefix}-images-idx3-ubyte holds {tuple(x.shape)} {x.dtype} "
                               f"images for {len(y)} labels, expected N x H x W uint8 and N labels")
        if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
            raise DatasetError(f"mnist: {folder}/{prefix}-labels-idx1-ubyte has labels outside 0-9")
        splits += [x.unsqueeze(1).contiguous(), y.long()]
    return ImageData(*splits, classes=[str(i) for i in range(10)])


def load_digits(size: int = 8) -> ImageData:
    """scikit-learn's bundled handwritten digits (1,797 images, no download) as uint8 [N, 1, size, size].

    `size` 8 keeps the original 8x8 images; any other size upsamples them bilinearly (28 gives
    MNIST's shape). Pixel values 0-16 map to 0-255, so `normalize(x, 0.0, 1.0)` gives [0, 1] as
    for MNIST. The split is fixed: 25% test, stratified, seed 0.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if int(size) < 1:
        raise ValueError(f"load_digits: size must be a positive integer, got {size}")
    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_FRACTION,
                                           random_state=DIGITS_SPLIT_SEED, stratify=bunch.target)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return ImageData(x[train_idx], y[train_idx], x[test_idx], y[test_idx], classes=[str(i) for i in range(10)])
