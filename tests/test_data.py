"""common.download and common.data on tiny generated CIFAR files (real on-disk layouts)."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_fixtures import make_cifar_archive, write_fake_cifar10, write_fake_cifar100

from common.data import (
    CIFAR,
    DatasetError,
    DeviceBatches,
    load_cifar,
    normalize,
    random_crop_flip,
    split_classes,
)
from common.download import DownloadError, download, extract_tar

UNREACHABLE = "http://127.0.0.1:9/x"  # discard port: connection refused


def md5(path_or_bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------------------
# a localhost HTTP server with optional Range support
# --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    files: dict = {}
    log: list = []
    ranges = True
    truncate = None  # send only this many bytes of the body, then close

    def do_GET(self):  # noqa: N802
        body = self.files.get(self.path)
        rng = self.headers.get("Range")
        self.log.append((self.path, rng))
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng and self.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.truncate is not None:
            self.wfile.write(body[start : start + self.truncate])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("H", (_Handler,), {"files": {}, "log": [], "ranges": True, "truncate": None})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    handler.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield handler
    httpd.shutdown()
    httpd.server_close()


BLOB = bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8))


# --------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------


def test_download_file_url_with_md5(tmp_path):
    archive = make_cifar_archive(tmp_path / "src", "cifar10")
    dest = tmp_path / "dst" / "a.tar.gz"
    out = download(archive.as_uri(), dest, md5=md5(archive), size=archive.stat().st_size)
    assert out == dest and dest.read_bytes() == archive.read_bytes()
    assert not Path(str(dest) + ".part").exists()
    # present and valid: skipped (an unreachable URL would fail otherwise)
    assert download(UNREACHABLE, dest, md5=md5(archive)) == dest


def test_download_resumes_with_range(server, tmp_path):
    server.files["/blob"] = BLOB
    dest = tmp_path / "blob.bin"
    Path(str(dest) + ".part").write_bytes(BLOB[:100_000])
    download(server.base + "/blob", dest, md5=md5(BLOB))
    assert dest.read_bytes() == BLOB
    assert server.log == [("/blob", "bytes=100000-")]


def test_interrupted_download_keeps_part_then_resumes(server, tmp_path):
    server.files["/blob"] = BLOB
    server.truncate = 120_000
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="run again to resume"):
        download(server.base + "/blob", dest, md5=md5(BLOB))
    part = Path(str(dest) + ".part")
    kept = part.read_bytes()  # what arrived, up to the last whole network chunk
    assert not dest.exists() and 0 < len(kept) < 120_000 and BLOB.startswith(kept)
    server.truncate = None
    download(server.base + "/blob", dest, md5=md5(BLOB))
    assert dest.read_bytes() == BLOB and server.log[-1] == ("/blob", f"bytes={len(kept)}-")


def test_download_restarts_when_part_is_corrupt(server, tmp_path):
    server.files["/blob"] = BLOB
    dest = tmp_path / "blob.bin"
    Path(str(dest) + ".part").write_bytes(b"\0" * 100_000)
    download(server.base + "/blob", dest, sha256=hashlib.sha256(BLOB).hexdigest())
    assert dest.read_bytes() == BLOB
    assert server.log == [("/blob", "bytes=100000-"), ("/blob", None)]


def test_download_restarts_when_server_ignores_range_or_answers_416(server, tmp_path):
    server.files["/blob"] = BLOB
    server.ranges = False
    dest = tmp_path / "a.bin"
    Path(str(dest) + ".part").write_bytes(BLOB[:5000])
    download(server.base + "/blob", dest, md5=md5(BLOB))
    assert dest.read_bytes() == BLOB and len(server.log) == 1

    server.ranges = True
    dest = tmp_path / "b.bin"
    Path(str(dest) + ".part").write_bytes(BLOB + b"extra")  # longer than the file: 416
    download(server.base + "/blob", dest, md5=md5(BLOB))
    assert dest.read_bytes() == BLOB
    assert server.log[1:] == [("/blob", f"bytes={len(BLOB) + 5}-"), ("/blob", None)]


def test_download_checksum_mismatch_raises(server, tmp_path):
    server.files["/blob"] = BLOB
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match=r"corrupt: its md5 is .*expected 0+\b"):
        download(server.base + "/blob", dest, md5="0" * 32)
    with pytest.raises(DownloadError, match="size is 300000 bytes, expected 7"):
        download(server.base + "/blob", dest, size=7)
    assert not dest.exists() and not Path(str(dest) + ".part").exists()
    # an existing dest with the wrong checksum is downloaded again
    dest.write_bytes(b"stale")
    download(server.base + "/blob", dest, md5=md5(BLOB))
    assert dest.read_bytes() == BLOB


def test_download_errors_are_one_clear_line(server, tmp_path):
    dest = tmp_path / "x.bin"
    with pytest.raises(DownloadError) as e:
        download(UNREACHABLE, dest, timeout=5)
    msg = str(e.value)
    assert "\n" not in msg and UNREACHABLE in msg and str(dest) in msg and "by hand" in msg
    assert "no connection" in msg and "refused" in msg.lower() and len(msg) < 300
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.base + "/missing", dest)
    with pytest.raises(DownloadError, match="no such file"):
        download((tmp_path / "nope").as_uri(), dest)
    with pytest.raises(DownloadError, match="unsupported URL scheme 'ftp'"):
        download("ftp://example.com/x", dest)
    assert not dest.exists()


def test_extract_tar_refuses_path_traversal(tmp_path):
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="../escaped")
    with pytest.raises(DownloadError, match="could not extract"):
        extract_tar(evil, tmp_path / "out")
    assert not (tmp_path / "escaped").exists()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(DownloadError, match="could not extract"):
        extract_tar(bad, tmp_path / "out")


# --------------------------------------------------------------------------------------
# CIFAR loading
# --------------------------------------------------------------------------------------


def test_load_cifar10_layout_and_values(tmp_path):
    write_fake_cifar10(tmp_path, n_train=50, n_test=20)
    d = load_cifar("cifar10", tmp_path, download=False)
    assert d.train_x.shape == (50, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.train_y.shape == (50,) and d.train_y.dtype == torch.int64
    assert d.test_x.shape == (20, 3, 32, 32) and d.test_y.shape == (20,)
    assert d.classes[:2] == ["airplane", "automobile"] and d.num_classes == 10
    assert sorted(d.train_y.tolist()) == sorted(i % 10 for i in range(50))
    # rows are channel-major: pixel (c, h, w) = data[c*1024 + h*32 + w]; batch order kept
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(d.train_x[10], torch.from_numpy(raw[b"data"][0]).view(3, 32, 32))
    assert d.train_y[10].item() == raw[b"labels"][0]


def test_load_cifar100_and_str_keys(tmp_path):
    write_fake_cifar100(tmp_path, n_train=200, n_test=100)
    folder = tmp_path / "cifar-100-python"
    # python-3 style pickle with str keys is accepted too
    with open(folder / "test", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    with open(folder / "test", "wb") as f:
        pickle.dump({k.decode(): v for k, v in d.items()}, f)
    data = load_cifar("cifar100", tmp_path)
    assert data.train_x.shape == (200, 3, 32, 32) and data.test_x.shape == (100, 3, 32, 32)
    assert data.num_classes == 100 and data.classes[7] == "fine_07"
    assert set(data.train_y.tolist()) == set(range(100))


def test_load_cifar_missing_folder_error(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_cifar("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and CIFAR["cifar10"]["url"] in msg and "data_batch_1" in msg
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DatasetError, match="test_batch is missing"):
        load_cifar("cifar10", tmp_path, download=False)
    with pytest.raises(ValueError, match="accepted: cifar10, cifar100"):
        load_cifar("mnist", tmp_path)


def test_load_cifar_downloads_and_extracts(tmp_path, monkeypatch):
    archive = make_cifar_archive(tmp_path / "src", "cifar100")
    monkeypatch.setitem(CIFAR["cifar100"], "url", archive.as_uri())
    monkeypatch.setitem(CIFAR["cifar100"], "md5", md5(archive))
    data = load_cifar("cifar100", tmp_path / "data")
    ref = load_cifar("cifar100", tmp_path / "src", download=False)
    assert torch.equal(data.train_x, ref.train_x) and torch.equal(data.test_y, ref.test_y)
    assert (tmp_path / "data" / "cifar-100-python.tar.gz").is_file()
    assert not list((tmp_path / "data").glob(".extract-*"))


def test_load_cifar_download_failure_is_dataset_error(tmp_path, monkeypatch):
    monkeypatch.setitem(CIFAR["cifar10"], "url", UNREACHABLE)
    with pytest.raises(DatasetError, match="download failed: could not download http://127.0.0.1:9/x") as e:
        load_cifar("cifar10", tmp_path)
    assert "\n" not in str(e.value) and "cifar-10-batches-py" in str(e.value)


# --------------------------------------------------------------------------------------
# preprocessing and batching
# --------------------------------------------------------------------------------------


def test_normalize():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(normalize(x).flatten(), torch.tensor([-1.0, 1.0, -0.6]))
    assert torch.allclose(normalize(x, 0.0, 1.0).flatten(), torch.tensor([0.0, 1.0, 0.2]))
    per_channel = normalize(x, [0.0, 0.5, 0.2], [1.0, 0.5, 0.1]).flatten()
    assert torch.allclose(per_channel, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert normalize(x).dtype == torch.float32


def test_random_crop_flip():
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    flipped = torch.flip(x, dims=[3])
    is_x = (out == x).flatten(1).all(1)
    is_flip = (out == flipped).flatten(1).all(1)
    assert (is_x | is_flip).all() and 10 < int(is_flip.sum()) < 54

    out = random_crop_flip(x, torch.Generator().manual_seed(1), padding=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # reference: the same draws (offsets, then flips), one sample at a time
    g = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, 5, (64, 2), generator=g)
    flips = torch.randint(0, 2, (64,), generator=g).bool()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):
        r, c = offsets[i].tolist()
        ref = padded[i, :, r : r + 8, c : c + 8]
        assert torch.equal(out[i], torch.flip(ref, dims=[2]) if flips[i] else ref)
    assert (out == 0).any()  # some crops reach into the zero padding


def test_device_batches_determinism_and_resume():
    n = 53
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    y = torch.arange(n)
    db = DeviceBatches(x, y, 10, device="cpu", seed=3, augment=True)
    assert len(db) == 6
    e0 = list(db.epoch(0))
    assert [len(b[1]) for b in e0] == [10, 10, 10, 10, 10, 3]
    assert sorted(torch.cat([b[1] for b in e0]).tolist()) == list(range(n))  # each example once
    assert e0[0][0].dtype == torch.float32 and e0[0][0].shape == (10, 3, 32, 32)
    again = list(DeviceBatches(x, y, 10, device="cpu", seed=3, augment=True).epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, again))
    e1 = list(db.epoch(1))
    assert not torch.equal(torch.cat([b[1] for b in e0]), torch.cat([b[1] for b in e1]))
    other_seed = list(DeviceBatches(x, y, 10, device="cpu", seed=4).epoch(0))
    assert not torch.equal(e0[0][1], other_seed[0][1])
    # resumed at batch k: exactly the batches of the uninterrupted epoch
    for k in (0, 3, 6):
        resumed = list(db.epoch(1, start_batch=k))
        assert len(resumed) == 6 - k
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, e1[k:]))
    # labels and images stay paired (image value = label before normalisation, up to crops/zeros)
    xb, yb = e0[0]
    centre = (xb[:, 0, 16, 16] * 0.5 + 0.5) * 255
    assert torch.allclose(centre, yb.float(), atol=1e-3)
    with pytest.raises(ValueError, match="start_batch"):
        list(db.epoch(0, start_batch=7))


def test_device_batches_options():
    x = torch.randint(0, 256, (25, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(25)
    db = DeviceBatches(x, y, 10, device="cpu", seed=0, shuffle=False, drop_last=True, mean=0.0, std=1.0)
    batches = list(db.epoch(0))
    assert len(db) == len(batches) == 2
    assert torch.equal(batches[1][1], torch.arange(10, 20))
    assert torch.allclose(batches[0][0], x[:10].float() / 255)
    with pytest.raises(ValueError, match="uint8"):
        DeviceBatches(x.float(), y, 10, device="cpu", seed=0)
    with pytest.raises(ValueError, match="no batch"):
        DeviceBatches(x, y, 30, device="cpu", seed=0, drop_last=True)
    with pytest.raises(TypeError, match="epoch"):
        iter(db)


def test_split_classes():
    tasks = split_classes(100, 10, seed=0)
    assert len(tasks) == 10 and all(len(t) == 10 for t in tasks)
    assert sorted(c for t in tasks for c in t) == list(range(100))
    assert split_classes(100, 10, seed=0) == tasks
    assert split_classes(100, 10, seed=1) != tasks
    with pytest.raises(ValueError, match="divisor"):
        split_classes(100, 7, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_batches_cuda_no_sync():
    x = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(300)
    db = DeviceBatches(
        x, y, 64, device="cuda", seed=0, augment=True, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2]
    )
    cpu = list(
        DeviceBatches(
            x, y, 64, device="cpu", seed=0, augment=True, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2]
        ).epoch(2)
    )
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = list(db.epoch(2, start_batch=1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(
        torch.allclose(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1]) for a, b in zip(gpu, cpu[1:])
    )
    out = random_crop_flip(x[:8].cuda(), torch.Generator().manual_seed(0))
    assert out.is_cuda and torch.equal(out.cpu(), random_crop_flip(x[:8], torch.Generator().manual_seed(0)))


# ---- files in the CIFAR layout that do not hold what the format says -------------------------


def _rewrite(path: Path, **changes):
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d.update({k.encode(): v for k, v in changes.items()})
    with open(path, "wb") as f:
        pickle.dump(d, f)


def test_cifar_meta_with_the_wrong_number_of_class_names_is_one_error(tmp_path):
    root = write_fake_cifar10(tmp_path, n_train=10, n_test=5)
    _rewrite(root / "cifar-10-batches-py" / "batches.meta", label_names=[b"a", b"b", b"c", b"d", b"e"])
    with pytest.raises(DatasetError, match=r"batches.meta: 'label_names' names 5 classes, cifar10 has 10"):
        load_cifar("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("data, what", [
    (np.full((2, 3072), 0.5, dtype=np.float32), r"float32 values in \[0.5, 0.5\]"),  # a cast would make them all 0
    (np.full((2, 3072), 300, dtype=np.int64), r"int64 values in \[300, 300\]"),  # a cast would wrap to 44
    (np.full((2, 3072), -1, dtype=np.int16), r"int16 values in \[-1, -1\]"),
])
def test_cifar_pixels_that_are_not_uint8_values_are_one_error(tmp_path, data, what):
    root = write_fake_cifar10(tmp_path, n_train=10, n_test=2)
    _rewrite(root / "cifar-10-batches-py" / "test_batch", data=data, labels=[0, 1])
    with pytest.raises(DatasetError, match=rf"test_batch: 'data' holds {what}; the format is uint8 pixels"):
        load_cifar("cifar10", tmp_path, download=False)


def test_cifar_pixels_as_wider_integers_in_range_load(tmp_path):
    root = write_fake_cifar10(tmp_path, n_train=10, n_test=2)
    _rewrite(root / "cifar-10-batches-py" / "test_batch", data=np.full((2, 3072), 255, dtype=np.int64),
             labels=[0, 1])
    data = load_cifar("cifar10", tmp_path, download=False)
    assert data.test_x.dtype == torch.uint8 and int(data.test_x.min()) == 255
