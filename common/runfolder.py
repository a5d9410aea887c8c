"""Run-folder rules (docs/CONTRACTS.md), standard library only: the harness writes by them,
sweep.py, summarize.py and plot.py read by them (without importing torch).

- file names, and what `summary.json` says: `run_state(dir)` is "finished", "diverged",
  "checkpoint" (can resume) or "new";
- one writer per folder: `RunLock` (flock on `<run>/.lock`, which names its holder); one
  computation of a shared result: `waiting_lock`;
- the folder a run holds: `RunFolder` (claim, resume rules, an open directory fd that every write
  goes through and is checked against, release);
- atomic writes with the user's umask (`atomic_write`), and removal of the temp files that a
  killed writer leaves (`remove_stale_temp_files`);
- OS errors as one line that says what happened and where (`describe_os_error`).

    python common/runfolder.py state RUN_DIR     # prints finished, diverged, checkpoint or new
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

from common.cli import UsageError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SHARDS = "checkpoint.{}.dcp"  # --fsdp: the folder of model and optimizer shards (DCP) that checkpoint.pt names
SUMMARY = "summary.json"
WANDB_ID = "wandb_id.txt"
LOCK = ".lock"
RESULT_FILES = (SUMMARY, CHECKPOINT, METRICS, CONFIG, WANDB_ID)  # a fresh start removes them, in this order
SAME_TASK_WAIT = 120  # s a requeued SLURM task waits for its own earlier attempt to let go of the lock
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # ".<file>.<8 random chars>.tmp"
_SHARDS = re.compile(r"^checkpoint\.[0-9a-f]{8}\.dcp$")  # SHARDS with 8 random hex digits


# flags (config.json keys) that say how to run, not what the run is: a checkpoint's identity leaves them out
RUN_CONTROL = frozenset({
    "resume", "start_over", "max_time", "stop_at_step", "save_directory", "run_name", "device", "log_every",
    "compile", "wandb", "wandb_project", "wandb_entity", "threads", "workers", "data_dir", "no_download",
    "command", "start_time", "experiment"})


# flags a resume may change (docs/CONTRACTS.md): applied from the resume on and recorded in config.json's
# "changes"; any other flag outside RUN_CONTROL changes what the checkpoint means and is refused
RESUME_CHANGEABLE = frozenset({
    "meta_stepsize", "gamma", "weight_decay_base", "weight_decay_meta", "momentum_param_meta",
    "normalizer_param_meta", "Lion_beta2_meta", "optimizer_impl", "fsdp", "eval_every", "eval_iters",
    "eval_batch_size", "acc_every", "weights_checksum", "grad_clip"})


def new_run_name() -> str:
    """The name of a run started without --run-name: a timestamp plus a random suffix (runs started in
    the same second get their own folders)."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def config_hash(config: dict) -> str:
    """The identity of a run's configuration (config.json's keys but RUN_CONTROL): 16 hex digits, the
    same for the args at the start and for config.json read back (values compared as JSON), also
    after resumes changed flags (config.json's "changes" are undone first: the values it started with)."""
    config = dict(config)
    for change in reversed(config.pop("changes", None) or []):
        if isinstance(change, dict) and "key" in change:
            config[change["key"]] = change.get("old")
    meaning = {k: v for k, v in config.items() if k not in RUN_CONTROL}
    text = json.dumps(json.loads(json.dumps(meaning, default=str)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_config(run_dir) -> dict | None:
    """config.json as a dict; None when missing or unreadable."""
    try:
        config = json.loads((Path(run_dir) / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def ends_at_line(path, offset: int) -> bool:
    """True when cutting the file `path` at `offset` keeps whole lines (offset 0, the byte before it a
    newline, or the file no longer than that)."""
    if offset <= 0:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(offset - 1)
            byte = f.read(1)
    except OSError:
        return True
    return byte in (b"\n", b"")


class RunFolderError(Exception):
    """The run folder cannot be used or written (locked, unwritable, disk full): one line, exit 1."""


class RunLocked(RunFolderError):
    """Another process holds the run folder's lock."""


class Diverged(Exception):
    """The run diverged (a non-finite loss, weight or step size); summary.json says so. Exit code 3."""


# --------------------------------------------------------------------------------------
# What a run folder holds
# --------------------------------------------------------------------------------------


def read_summary(run_dir) -> dict | None:
    """summary.json as a dict; None when missing or unreadable (a run that has not ended)."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def summary_state(summary: dict | None) -> str | None:
    """"diverged" or "finished" for a summary.json's contents; None for a run that has not ended."""
    if not isinstance(summary, dict):
        return None
    if summary.get("diverged") is True:
        return "diverged"
    if summary.get("finished") is True:
        return "finished"
    return None


def run_state(run_dir) -> str:
    """"finished" (summary.json says so), "diverged" (stopped on a non-finite loss, weight or step
    size), "checkpoint" (can resume) or "new"."""
    state = summary_state(read_summary(run_dir))
    if state:
        return state
    return "checkpoint" if (Path(run_dir) / CHECKPOINT).exists() else "new"


def is_finished(run_dir) -> bool:
    return run_state(run_dir) == "finished"


def has_results(run_dir) -> list[str]:
    """The files of `run_dir` that a fresh start would lose (summary, checkpoint, non-empty metrics)."""
    run_dir = Path(run_dir)
    found = [f for f in (SUMMARY, CHECKPOINT) if (run_dir / f).exists()]
    with contextlib.suppress(OSError):
        if (run_dir / METRICS).stat().st_size:
            found.append(METRICS)
    return found


def remove_results(run_dir) -> None:
    """Delete what an earlier run left (summary first: a half-done removal never claims "finished")."""
    for name in RESULT_FILES:
        with contextlib.suppress(FileNotFoundError):
            (Path(run_dir) / name).unlink()
    remove_shard_folders(run_dir)


def shard_folders(run_dir) -> list[Path]:
    """The sharded checkpoint folders in `run_dir`: the one checkpoint.pt names, and any that a
    writer killed before it could replace checkpoint.pt left."""
    with contextlib.suppress(OSError):
        return sorted(Path(e.path) for e in os.scandir(run_dir) if e.is_dir(follow_symlinks=False)
                      and _SHARDS.match(e.name))
    return []


def remove_shard_folders(run_dir, keep: str | None = None) -> None:
    """Delete the sharded checkpoint folders of `run_dir` but `keep` (the one checkpoint.pt names)."""
    for folder in shard_folders(run_dir):
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def describe_os_error(e: OSError, path) -> str:
    """One line for an OSError on `path`: what happened (the disk is full, ...) and where."""
    what = {
        errno.ENOSPC: "no space left on device (the disk is full)",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a file of that name is in the way",
    }.get(e.errno, e.strerror or str(e))
    return f"cannot write {path}: {what}"


def disk_is_full(path, margin: int = 1 << 20) -> bool:
    """True when the file system of `path` has less than `margin` bytes left for this user."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def atomic_write(path, write, check=None, dir_fd: int | None = None) -> None:
    """Write via `write(binary_file)` into a temp file next to `path`, fsync, os.replace: all or nothing.
    `check()`, called after the bytes are written and before the replace, may raise to call it off
    (the harness: the run folder is still the run's after a long write). With `dir_fd` (an open
    folder, see `RunFolder`) the file is written in that folder whatever its path is now; `path`
    names it in messages.

    The file gets the user's umask (0644 with the usual 022). On an OSError the temp file is removed
    and RunFolderError says what happened (the disk is full, ...) and where; other errors pass
    through (after the temp file is removed). A SIGKILL can still leave the temp file:
    `remove_stale_temp_files` clears those at the next start.
    """
    path = Path(path)
    tmp = _temp_path(path)
    # relative to the held folder with dir_fd (os functions take dir_fd=None as "by path")
    src, dst = (tmp, path) if dir_fd is None else (tmp.name, path.name)
    try:
        fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check()
        os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as e:
        # a full disk may surface as another error (torch: "unexpected pos ..."): look before freeing it
        full = isinstance(e, Exception) and not isinstance(e, OSError) and disk_is_full(path.parent)
        with contextlib.suppress(OSError):
            os.unlink(src, dir_fd=dir_fd)
        if isinstance(e, OSError) or full:
            cause = e if isinstance(e, OSError) else OSError(errno.ENOSPC, "disk full")
            raise RunFolderError(describe_os_error(cause, path)) from e
        raise
    if dir_fd is None:
        fsync_dir(path.parent)
    else:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def write_json(path, obj) -> None:
    data = _json_bytes(obj)
    atomic_write(path, lambda f: f.write(data))


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temp_files(run_dir, of: str | None = None) -> list[Path]:
    """Delete the temp files of writes that never finished (a SIGKILL mid-checkpoint); with `of`,
    only those of the file of that name. Call it only while holding the lock its writers take (the
    folder's, or the file's `waiting_lock`): a live writer's temp file looks the same."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(run_dir):
            if entry.is_file(follow_symlinks=False) and _TEMP.match(entry.name) \
                    and (of is None or entry.name.startswith(f".{of}.")):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


# --------------------------------------------------------------------------------------
# One writer per folder
# --------------------------------------------------------------------------------------


def _slurm_task() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process"
    text = f"pid {holder.get('pid')} on {holder.get('host')}"
    if holder.get("slurm_task"):
        text += f" (SLURM job {holder['slurm_task']})"
    if holder.get("since"):
        text += f", since {holder['since']}"
    return text


class RunLock:
    """An exclusive lock on a run folder, held until `release()` or the process ends (a killed
    holder never leaves a stale lock: the kernel drops it). The lock file names its holder.

    A second process gets RunLocked at once, except a requeued attempt of the same SLURM task,
    which waits up to SAME_TASK_WAIT s for its earlier attempt to exit. On a file system without
    locks (some parallel file systems), the folder is used unlocked with a note on stderr.
    """

    def __init__(self, run_dir):
        import fcntl

        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        me, waited = _slurm_task(), False
        deadline = time.monotonic() + SAME_TASK_WAIT
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    print(f"note: cannot lock {self.path} ({e.strerror}); make sure only one process "
                          f"writes {run_dir}", file=sys.stderr)
                    return
                if me and holder and holder.get("slurm_task") == me and time.monotonic() < deadline:
                    if not waited:
                        print(f"note: waiting up to {SAME_TASK_WAIT} s for the earlier attempt of this SLURM task "
                              f"({describe_holder(holder)}) to let go of {run_dir}", file=sys.stderr, flush=True)
                        waited = True
                    time.sleep(1.0)
                    continue
                raise RunLocked(f"run folder {run_dir} is in use by {describe_holder(holder)}; one run "
                                f"folder has one writer: wait until that run ends, or choose another "
                                f"--run-name / --save-directory") from None
            # the holder we waited for may have removed the file: hold the one on disk
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)

    def release(self) -> None:
        """Remove the lock file and let go (safe to call twice)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # only our file: a new run may have claimed a new folder at this path
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


class RunFolder:
    """The folder of one run as rank 0 holds it: `claim` creates it, locks it, opens it (a directory
    fd held until `release`) and applies the resume rules. The run holds that folder, not its path:
    `check` (before each write) compares the held folder with what the path names now, so a folder
    deleted, or deleted and made again (which may reuse its inode number), is caught; the run's
    files are written through the fd (`write`, `write_json`, `open_append`, `truncate`), so they
    never land in another run's folder at the same path. Unclaimed (other ranks), it writes by path.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.fd: int | None = None  # the claimed folder, open
        self.lost = False  # the folder was deleted or replaced while the run held it
        self._counts_links = False  # the file system gives the held folder links (st_nlink 0 once deleted)
        self._lock: RunLock | None = None
        self._made: list[Path] = []  # folders `claim` created (removed again if the run writes nothing)

    def claim(self, resume: bool, start_over: bool) -> None:
        """Create, open and lock the folder, clear stale temp files, apply the resume rules (UsageError,
        RunLocked or Diverged, with one line that says what to type)."""
        parent = self.path.parent
        missing = [d for d in (self.path, *self.path.parents) if not d.exists()]
        try:
            if parent.exists() and not parent.is_dir():
                raise NotADirectoryError(20, "Not a directory")
            self.path.mkdir(parents=True, exist_ok=True)
            self._made = missing
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            self._counts_links = os.fstat(self.fd).st_nlink > 0
            self._lock = RunLock(self.path)
            self.check()  # the lock is in the folder held
            probe = f".write-test.{secrets.token_hex(4)}.tmp"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=self.fd))
            os.unlink(probe, dir_fd=self.fd)  # the lock file may predate a read-only remount: check for real
        except OSError as e:
            raise UsageError(f"--save-directory {parent}: {describe_os_error(e, self.path)}") from None
        remove_stale_temp_files(self.path)
        self._resume_rules(resume, start_over)

    def _resume_rules(self, resume: bool, start_over: bool) -> None:
        state, results = run_state(self.path), has_results(self.path)
        if start_over:
            if results:
                remove_results(self.path)
                print(f"note: --start-over: removed {', '.join(results)} from {self.path}", file=sys.stderr)
        elif state == "diverged" and resume:
            step = (read_summary(self.path) or {}).get("diverged_at_step")
            raise Diverged(f"--resume: {self.path} diverged at step {step} (see its summary.json); nothing to "
                           f"resume. Start another --run-name with other settings, or pass --start-over")
        elif results and not resume:
            how = "continue it" if CHECKPOINT in results or SUMMARY in results else \
                "start it again (it has no checkpoint yet: it starts from the beginning)"
            raise UsageError(f"run folder {self.path} already holds a run ({', '.join(results)}); add --resume to "
                             f"the same command to {how}, --start-over to discard it, or choose another --run-name / "
                             f"--save-directory")
        elif results and CHECKPOINT not in results and SUMMARY not in results:
            # killed before its first checkpoint: only metric lines that the fresh start writes again
            remove_results(self.path)
            print(f"note: --resume: {self.path} has no {CHECKPOINT} yet (the run was stopped before its first "
                  f"checkpoint); starting it from the beginning", file=sys.stderr)
        elif results and CHECKPOINT not in results:
            raise UsageError(f"--resume: {self.path} has no {CHECKPOINT} to continue from but holds results "
                             f"({', '.join(results)}); a fresh start would overwrite them. Pass --start-over to "
                             f"discard them, or choose another --run-name")

    def check(self) -> None:
        """The path still names the folder claimed (two stats; nothing to check when unclaimed): else
        RunFolderError (exit 1) and nothing more is written."""
        if self.fd is None:
            return
        try:
            held = os.fstat(self.fd)  # a deleted folder has no links, even if its inode number comes back
            same = (held.st_nlink > 0 or not self._counts_links) and os.path.samestat(held, os.stat(self.path))
        except OSError:
            same = False
        if not same:
            self.lost = True
            raise RunFolderError(f"run folder {self.path} was deleted or replaced while this run ran (by another run "
                                 f"of that name?); this run stopped and wrote nothing more there")

    def write(self, name: str, write) -> None:
        """`atomic_write` of the file `name` in the held folder, checked before and again before the replace."""
        self.check()
        atomic_write(self.path / name, write, check=self.check, dir_fd=self.fd)

    def write_json(self, name: str, obj) -> None:
        data = _json_bytes(obj)
        self.write(name, lambda f: f.write(data))

    def open_append(self, name: str):
        """The file `name` of the held folder, opened for appending text (RunFolderError on an OSError)."""
        self.check()
        try:
            fd = os.open(name if self.fd is not None else self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                         0o666, dir_fd=self.fd)
            return os.fdopen(fd, "a", encoding="utf-8")
        except OSError as e:
            raise RunFolderError(describe_os_error(e, self.path / name)) from None

    def truncate(self, name: str, size: int) -> None:
        """Cut the file `name` of the held folder to `size` bytes, if it is longer."""
        self.check()
        try:
            fd = os.open(name if self.fd is not None else self.path / name, os.O_WRONLY, dir_fd=self.fd)
        except FileNotFoundError:
            return
        try:
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Let go of the lock and the folder; remove the folders `claim` made if they hold nothing (not
        when the folder was lost: the path is another run's now). Safe to call twice."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.lost:
            return
        for d in self._made:  # innermost first; stops at the first folder that holds something
            try:
                d.rmdir()
            except OSError:
                break
        self._made = []


@contextlib.contextmanager
def waiting_lock(path, what: str = "it"):
    """Hold an exclusive lock on the file `path` for the block, waiting (with a note on stderr)
    while another process holds it: for a result that concurrent runs share and one computes
    (evaluate.py's --lr grid). The file is created and kept (removing it would let a waiter and a
    newcomer hold two different files). Where the file cannot be made or locked, the block runs
    unlocked: callers write by `atomic_write`, so that costs only duplicated work."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                print(f"note: waiting for {describe_holder(_read_holder(fd))} to finish {what} ({path})",
                      file=sys.stderr, flush=True)
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):  # who holds it, for the note of a waiter
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_task": _slurm_task(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _read_holder(fd: int) -> dict | None:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "state":
        print("usage: python common/runfolder.py state RUN_DIR", file=sys.stderr)
        return 2
    print(run_state(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
