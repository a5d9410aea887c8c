"""Downloads that resume, verify and never leave a half file behind; safe tar extraction.

    path = download(url, "data/cifar-10-python.tar.gz", md5="c58f...")
    extract_tar(path, "data")

`download` writes into `<dest>.part`, resumes an interrupted `.part` with an HTTP Range request,
checks md5 / sha256 / size and only then moves the file to `dest` (os.replace). `file://` URLs
are copied the same way. Every failure is a `DownloadError` with one line naming the URL, the
reason and where to put the file when downloading it by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

import requests
from tqdm import tqdm

CHUNK_SIZE = 1 << 20  # bytes per read / write of local files
NET_CHUNK_SIZE = 1 << 16  # bytes per network read (what a broken connection may lose of the .part)
USER_AGENT = "metaoptimize-repro-download/1.0"


class DownloadError(RuntimeError):
    """A download, its verification or an archive extraction failed (message is one line)."""


class _Incomplete(Exception):
    """The server sent fewer bytes than announced; the `.part` file is kept for a resume."""


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _hash_file(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_SIZE), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_file(path: Path, md5=None, sha256=None, size=None) -> str | None:
    """None when `path` passes every given check, else a short description of the mismatch."""
    actual = path.stat().st_size
    if size is not None and actual != int(size):
        return f"size is {actual} bytes, expected {int(size)}"
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is not None:
            got = _hash_file(path, algorithm)
            if got.lower() != expected.lower():
                return f"{algorithm} is {got}, expected {expected.lower()}"
    return None


@contextlib.contextmanager
def file_lock(path):
    """Exclusive advisory lock on `<path>.lock`, so parallel jobs do not download the same file twice."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _network_reason(exc: Exception) -> str:
    """A short reason for a requests exception (its str() is a long nested repr)."""
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        r = exc.response
        return f"HTTP {r.status_code} {r.reason or ''}".strip()
    if isinstance(exc, requests.exceptions.Timeout):
        return "the server did not answer in time (timeout)"
    text = str(exc)
    if "Name or service not known" in text or "nodename nor servname" in text or "Failed to resolve" in text:
        return "host name could not be resolved (no network or DNS failure)"
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return f"no connection ({m.group(1).strip()})"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "no connection (network unreachable?)"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _fail(url: str, dest: Path, reason: str) -> DownloadError:
    return DownloadError(
        f"could not download {url}: {reason}. Download it by hand (e.g. `wget {url}`) and save it as {dest}"
    )


def _progress(total, initial, desc):
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        dynamic_ncols=True,
    )


def _copy_file_url(url: str, part: Path, desc: str) -> None:
    src = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    if not src.is_file():
        raise FileNotFoundError(f"no such file {src}")
    with open(src, "rb") as fin, open(part, "wb") as fout, _progress(src.stat().st_size, 0, desc) as bar:
        for chunk in iter(lambda: fin.read(CHUNK_SIZE), b""):
            fout.write(chunk)
            bar.update(len(chunk))


def _http_get(url: str, part: Path, desc: str, timeout: float, resume: bool) -> bool:
    """Fetch `url` into `part`. Returns True when it appended to an existing `.part` (a resume)."""
    offset = part.stat().st_size if (resume and part.exists()) else 0
    headers = {"User-Agent": USER_AGENT}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as r:
        if offset > 0 and r.status_code == 416:  # .part is already as long as (or longer than) the file
            r.close()
            part.unlink()
            return _http_get(url, part, desc, timeout, resume=False)
        r.raise_for_status()
        appending = offset > 0 and r.status_code == 206 and _range_start(r) == offset
        if not appending:
            offset = 0  # server ignored Range (200) or answered another range: start from scratch
        length = r.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with open(part, "ab" if appending else "wb") as f, _progress(total, offset, desc) as bar:
            for chunk in r.iter_content(chunk_size=NET_CHUNK_SIZE):
                if chunk:
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise _Incomplete(f"the connection closed after {part.stat().st_size} of {total} bytes")
    return appending


def _range_start(r) -> int | None:
    m = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def download(url, dest, *, md5=None, sha256=None, size=None, desc=None, timeout=60.0) -> Path:
    """Download `url` to `dest` (resuming, verified, atomic) and return `dest` as a Path.

    Skips the download when `dest` exists and passes the given checks. An interrupted download
    leaves `<dest>.part`, which the next call resumes with an HTTP Range request; it restarts
    from scratch when the server ignores Range, answers 416, or the resumed file fails its
    checksum. `file://` URLs are copied. Raises DownloadError on any failure.
    """
    dest = Path(dest).expanduser()
    part = Path(str(dest) + ".part")
    desc = desc or dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest):
        if dest.exists():
            problem = _check_file(dest, md5, sha256, size)
            if problem is None:
                return dest
            print(f"{dest} exists but its {problem}; downloading it again", file=sys.stderr)
        if part.exists() and (md5 or sha256 or size) and _check_file(part, md5, sha256, size) is None:
            os.replace(part, dest)  # a previous run finished the transfer but not the rename
            return dest
        scheme = urllib.parse.urlparse(str(url)).scheme.lower()
        if scheme not in ("http", "https", "file"):
            raise _fail(url, dest, f"unsupported URL scheme {scheme!r} (accepted: http, https, file)")
        for attempt in range(2):
            try:
                if scheme == "file":
                    _copy_file_url(url, part, desc)
                    resumed = False
                else:
                    resumed = _http_get(url, part, desc, timeout, resume=attempt == 0)
            except (requests.exceptions.ChunkedEncodingError, _Incomplete) as e:
                reason = str(e) if isinstance(e, _Incomplete) else "the connection broke during the transfer"
                raise _fail(url, dest, f"{reason} (run again to resume from {part})") from None
            except requests.exceptions.RequestException as e:
                raise _fail(url, dest, _network_reason(e)) from None
            except OSError as e:
                raise _fail(url, dest, f"{type(e).__name__}: {e.strerror or e}") from None
            problem = _check_file(part, md5, sha256, size)
            if problem is None:
                os.replace(part, dest)
                return dest
            part.unlink()
            if resumed:
                print(
                    f"resumed download of {url} is corrupt ({problem}); restarting from scratch",
                    file=sys.stderr,
                )
                continue
            break
        raise _fail(url, dest, f"the downloaded file is corrupt: its {problem}")


def extract_tar(archive, dest_dir) -> Path:
    """Extract a (compressed) tar archive into `dest_dir`, refusing members that escape it."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest_dir, filter="data")
            else:  # Python < 3.10.12 / 3.11.4: check members by hand
                root = dest_dir.resolve()
                for m in tar.getmembers():
                    target = (root / m.name).resolve()
                    if not (m.isfile() or m.isdir()) or (target != root and root not in target.parents):
                        raise tarfile.TarError(f"unsafe member {m.name!r}")
                tar.extractall(dest_dir)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DownloadError(
            f"could not extract {archive}: {type(e).__name__}: {e}. Delete it and download it again"
        ) from None
    return dest_dir
