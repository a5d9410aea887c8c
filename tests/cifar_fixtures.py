"""Tiny CIFAR-10 / CIFAR-100 written in the exact on-disk layout of the official python versions.

    from cifar_fixtures import write_fake_cifar10, write_fake_cifar100, make_cifar_archive

    root = write_fake_cifar10(tmp_path)            # tmp_path/cifar-10-batches-py/{data_batch_1..5,...}
    data = load_cifar("cifar10", root, download=False)
    archive = make_cifar_archive(tmp_path / "src", "cifar10")   # .../cifar-10-python.tar.gz
    train = load_cifar10_train("my_name")          # cifar10/train.py as a module (main(argv), parse_args)

Files are protocol-2 pickles of dicts with bytes keys (what Python 2's cPickle wrote): data
batches hold b"batch_label", b"labels" (CIFAR-10) or b"fine_labels" + b"coarse_labels"
(CIFAR-100), b"data" (uint8 N x 3072, channel-major rows) and b"filenames". Labels cycle
through all classes (every class present when n >= num_classes) and each class has its own
mean colour, so a tiny model can learn them.
"""

from __future__ import annotations

import importlib.util
import pickle
import tarfile
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


def _images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 3072]: a per-class colour (fixed by the class) plus noise."""
    colours = np.random.default_rng(1234).integers(30, 226, size=(num_classes, 3))
    noise = rng.integers(-25, 26, size=(len(labels), 3, 1024))
    img = colours[labels][:, :, None] + noise
    return np.clip(img, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar10(root, n_train: int = 100, n_test: int = 20, seed: int = 0) -> Path:
    """Write `root/cifar-10-batches-py/` with n_train images split over data_batch_1..5 and n_test
    in test_batch, plus batches.meta and readme.html. Returns `root`."""
    root = Path(root)
    folder = root / _FOLDERS["cifar10"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_labels = _labels(n_train, 10, rng)
    for i, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _write_cifar10_batch(folder / f"data_batch_{i}", f"training batch {i} of 5", train_labels[idx], rng)
    _write_cifar10_batch(folder / "test_batch", "testing batch 1 of 1", _labels(n_test, 10, rng), rng)
    _dump(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": max(1, n_train // 5),
            b"label_names": [c.encode() for c in CIFAR10_CLASSES],
            b"num_vis": 3072,
        },
    )
    (folder / "readme.html").write_text(
        "<meta HTTP-EQUIV='REFRESH' content='0; url=http://www.cs.toronto.edu/~kriz/cifar.html'>\n"
    )
    return root


def _write_cifar10_batch(path: Path, batch_label: str, labels: np.ndarray, rng) -> None:
    _dump(
        path,
        {
            b"batch_label": batch_label.encode(),
            b"labels": [int(v) for v in labels],
            b"data": _images(labels, 10, rng),
            b"filenames": [f"fake_{path.name}_{i}.png".encode() for i in range(len(labels))],
        },
    )


def write_fake_cifar100(root, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """Write `root/cifar-100-python/` with `train` (n_train images), `test` (n_test) and `meta`.
    Returns `root`."""
    root = Path(root)
    folder = root / _FOLDERS["cifar100"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for fname, n in (("train", n_train), ("test", n_test)):
        fine = _labels(n, 100, rng)
        _dump(
            folder / fname,
            {
                b"filenames": [f"fake_{fname}_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{'training' if fname == 'train' else 'testing'} batch 1 of 1".encode(),
                b"fine_labels": [int(v) for v in fine],
                b"coarse_labels": [int(v) // 5 for v in fine],
                b"data": _images(fine, 100, rng),
            },
        )
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
        },
    )
    return root


def make_cifar_archive(root, name: str) -> Path:
    """Pack `root/<folder>` (written with the defaults when missing) into `root/<official archive name>`
    with the official layout (the folder at the top level). Returns the archive path."""
    if name not in _FOLDERS:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(_FOLDERS)}")
    root = Path(root)
    folder = root / _FOLDERS[name]
    if not folder.is_dir():
        (write_fake_cifar10 if name == "cifar10" else write_fake_cifar100)(root)
    archive = root / _ARCHIVES[name]
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def load_cifar10_train(module_name: str):
    """cifar10/train.py imported as `module_name` (its main(argv) runs in-process: no torch import per run)."""
    spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parents[1] / "cifar10" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
