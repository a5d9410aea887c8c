"""The experiment harness every `train.py` shares: flags, run folder, logging, checkpoints, DDP, AMP.

A training script uses it like this (see cifar10/train.py):

    parser = harness.ArgParser(description=...)
    harness.add_run_args(parser)
    add_optimizer_args(parser)
    args = parser.parse_args()
    run = harness.start_run(args, "cifar10")      # validates flags, seeds, picks the device
    ... build data, model, optimizer on run.device (bad input raises ValueError) ...
    state = run.load_checkpoint()                  # --resume: dict or None
    for ...:
        ...
        run.log_step_sizes(optimizer, step)        # does the --log-every check itself
        if run.should_stop():                      # --max-time, SIGTERM, SIGUSR1
            run.save_checkpoint({...}); run.close(); return
    run.log({...}, step); run.save_checkpoint({...})
    run.finish({"final": {...}, "best": {...}})

    if __name__ == "__main__":
        harness.run_main(main)                     # bad input -> one `error:` line, exit 2

Run folder layout and metric keys: docs/CONTRACTS.md. Nothing is written to the run folder
until the first `log`, `save_checkpoint` or `finish`, so a run that fails on bad input
(unknown algorithm, missing dataset) leaves nothing behind.

Checkpoints are loaded with `torch.load(weights_only=True)`: the state handed to
`save_checkpoint` may hold tensors, numbers, strings, None and lists/tuples/dicts of them
(everything a `state_dict()` holds); no numpy arrays or custom classes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import re
import secrets
import signal
import string
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ArgParser",
    "Run",
    "UsageError",
    "add_run_args",
    "amp_context",
    "backward_and_step",
    "cleanup_distributed",
    "distribute",
    "grad_scaler",
    "is_main",
    "load_training_state",
    "maybe_compile",
    "parse_max_time",
    "require_positive",
    "resolve_device",
    "run_main",
    "seed_everything",
    "setup_distributed",
    "start_run",
    "training_state",
    "unwrap",
]

PROCESS_START = time.monotonic()  # --max-time counts from here (the import happens at process start)
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
WANDB_ID = "wandb_id.txt"
MAX_LOGGED_BLOCKS = 64  # more blocks than this: log step_size/min, /median, /max instead
DDP_STOP_CHECK_EVERY = 20  # under DDP, ranks agree on stopping every this many should_stop() calls


class UsageError(Exception):
    """Bad command-line input; `run_main` prints it as one `error: ...` line and exits with 2."""


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


class ArgParser(argparse.ArgumentParser):
    """argparse with errors as one line `error: ...` on stderr (exit code 2), as CONTRACTS.md asks."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


_TIME_FORMATS = '"HH:MM:SS", "D-HH:MM:SS", "MM:SS" or a number of seconds'


def parse_max_time(text) -> float | None:
    """--max-time value in seconds: "HH:MM:SS", "D-HH:MM:SS" (SLURM), "MM:SS" or seconds; None when unset."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip()
        if s.lower() in ("", "none", "inf", "infinite", "unlimited"):
            return None
        days = 0
        m = re.fullmatch(r"(\d+)-(.+)", s)
        if m:
            days, s = int(m.group(1)), m.group(2)
        parts = s.split(":")
        try:
            if m and len(parts) == 1:  # "D-HH" is SLURM too
                parts.append("0")
            if len(parts) == 1:
                seconds = float(parts[0])
            elif len(parts) in (2, 3):
                if not all(re.fullmatch(r"\d+(\.\d*)?", p) for p in parts):
                    raise ValueError
                nums = [float(p) for p in parts]
                if any(x >= 60 for x in nums[1:]):
                    raise ValueError
                if m and len(nums) == 2:  # "D-HH:MM"
                    nums.append(0.0)
                seconds = 0.0
                for x in nums:
                    seconds = seconds * 60 + x
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--max-time: cannot read {text!r}; use {_TIME_FORMATS}") from None
        seconds += days * 86400
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"--max-time must be a positive duration, got {text!r}; use {_TIME_FORMATS}")
    return seconds


def require_positive(parser: argparse.ArgumentParser, args, *names: str) -> None:
    """After parsing: a parser error (one `error:` line, exit 2) for the first of these integer flags below 1."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def add_run_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every experiment shares (the paper's --seed, --run-name, --save-directory, --max-time, ...)."""
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="random seed (weights, data order, augmentation)")
    g.add_argument("--run-name", default=None,
                   help="name of the run folder <save-directory>/<run-name> (default: timestamp-random)")
    g.add_argument("--save-directory", default="outputs", help="where run folders are written")
    g.add_argument("--max-time", default=None,
                   help=f"stop cleanly with a checkpoint after this much wall time: {_TIME_FORMATS}")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--resume", action="store_true",
                   help="continue the run <save-directory>/<run-name> from its checkpoint (fresh start if none)")
    g.add_argument("--log-every", type=int, default=100, help="log step sizes every this many optimizer steps")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast mixed precision (fp16 adds a gradient scaler)")
    w = parser.add_argument_group("wandb")
    w.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    w.add_argument("--wandb-project", default="metaoptimize", help="wandb project")
    w.add_argument("--wandb-entity", default=None, help="wandb entity (team or user)")
    return parser


def run_main(main) -> None:
    """Call `main()`; bad input (ValueError, UsageError, DatasetError) becomes one `error:` line, exit 2.

    Set HARNESS_TRACEBACK=1 to see the full traceback instead. `main()` may return an exit code.
    """
    try:
        from common.data import DatasetError
    except ImportError:  # pragma: no cover - data module not present
        DatasetError = UsageError  # noqa: N806
    try:
        code = main()
    except (ValueError, UsageError, DatasetError) as e:
        if os.environ.get("HARNESS_TRACEBACK"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"error: {msg}\n")
        sys.stderr.flush()
        cleanup_distributed()
        sys.exit(2)
    cleanup_distributed(barrier=True)
    sys.exit(int(code or 0))


# --------------------------------------------------------------------------------------
# Devices, distributed, AMP, compile
# --------------------------------------------------------------------------------------

_DIST = {"rank": 0, "world_size": 1, "local_rank": 0, "initialised": False}


def setup_distributed(args=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; initialises the process group.

    nccl on CUDA, gloo otherwise. Not under torchrun (or WORLD_SIZE=1): a no-op returning (0, 1, 0).
    Safe to call more than once.
    """
    if _DIST["initialised"]:
        return _DIST["rank"], _DIST["world_size"], _DIST["local_rank"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        want = getattr(args, "device", "auto") if args is not None else "auto"
        use_cuda = torch.cuda.is_available() and not str(want).startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        _DIST.update(rank=rank, world_size=world, local_rank=local_rank)
    _DIST["initialised"] = True
    return _DIST["rank"], _DIST["world_size"], _DIST["local_rank"]


def is_main() -> bool:
    """True on rank 0 (and always when not distributed)."""
    return _DIST["rank"] == 0


def cleanup_distributed(barrier: bool = False) -> None:
    """Tear the process group down. `barrier=True` (a normal end) first waits until every rank is
    done communicating: a rank that destroys gloo while its peer still uses it can abort at exit."""
    if _DIST["world_size"] > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
    _DIST.update(rank=0, world_size=1, local_rank=0, initialised=False)


def resolve_device(text: str = "auto") -> torch.device:
    """--device: auto (cuda if available, on this rank's GPU under torchrun), cpu, cuda, cuda:N, mps."""
    text = str(text or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {text!r}; accepted: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", _DIST["local_rank"] if _DIST["world_size"] > 1 else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_context(args, device):
    """Autocast context for --amp bf16/fp16 (a no-op context for --amp none)."""
    amp = getattr(args, "amp", "none")
    if amp in (None, "none"):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(args, device) -> torch.amp.GradScaler:
    """GradScaler, enabled only for --amp fp16 (when disabled its calls pass through)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=getattr(args, "amp", "none") == "fp16")


def maybe_compile(model, args):
    """torch.compile(model) with --compile. Save `unwrap(model).state_dict()` in checkpoints."""
    return torch.compile(model) if getattr(args, "compile", False) else model


def distribute(model, device):
    """Wrap in DistributedDataParallel under torchrun (world size > 1); unchanged otherwise."""
    if _DIST["world_size"] <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def training_state(model, optimizer, scheduler, scaler) -> dict:
    """The part of a checkpoint every experiment has: weights, optimizer (with MetaOptimize's beta
    and traces), learning-rate schedule and AMP loss scale."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None, "scaler": scaler.state_dict(),
    }


def load_training_state(state: dict, model, optimizer, scheduler, scaler) -> None:
    """Inverse of `training_state` (the model first: some optimizers check the weights they wrap)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])


def backward_and_step(loss, optimizer, scaler, scheduler=None) -> None:
    """zero_grad, (scaled) backward, optimizer step (the scaler skips it on overflow), schedule step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()


def unwrap(model):
    """The plain module under torch.compile / DDP wrappers (its state_dict keys have no prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _to_python(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Write via `write(file)` into a temp file next to `path`, fsync, then os.replace (all or nothing)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _atomic_write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def start_run(args, experiment: str) -> Run:
    """Validate the run flags, seed, pick the device and set up the run (see `Run`).

    The optimizer flags are checked here too, so a typo fails before any data is downloaded.
    """
    if hasattr(args, "optimizer"):
        from common.optim_flags import check_optimizer_args

        check_optimizer_args(args)
    return Run(args, experiment)


class Run:
    """One run: `<save-directory>/<run-name>/` with config.json, metrics.jsonl, checkpoint.pt, summary.json.

    Attributes: dir (Path), device, is_main, rank, world_size, local_rank, max_time (s or None),
    stop_reason (why should_stop() said yes). Only rank 0 writes files and logs to wandb.
    """

    def __init__(self, args, experiment: str):
        self.args, self.experiment = args, experiment
        self.max_time = parse_max_time(getattr(args, "max_time", None))
        self.log_every = int(getattr(args, "log_every", 100))
        if self.log_every <= 0:
            raise UsageError(f"--log-every must be a positive number of steps, got {self.log_every}")
        self.rank, self.world_size, self.local_rank = setup_distributed(args)
        self.is_main = self.rank == 0
        self.device = resolve_device(getattr(args, "device", "auto"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        name = getattr(args, "run_name", None)
        if name is None:
            if getattr(args, "resume", False):
                raise UsageError("--resume needs --run-name (the name of the run to continue)")
            # a timestamp plus a random suffix: runs started in the same second get their own folders
            name = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
            if self.world_size > 1:  # every rank must use rank 0's timestamp
                import torch.distributed as dist

                box = [name]
                dist.broadcast_object_list(box, src=0)
                name = box[0]
        name = str(name)
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise UsageError(f"--run-name must be a plain folder name, got {name!r}")
        args.run_name = name
        self.name = name
        self.dir = Path(getattr(args, "save_directory", "outputs")) / name
        self.resume = bool(getattr(args, "resume", False))
        if not self.resume and self.is_main:
            found = [f for f in (CHECKPOINT, SUMMARY) if (self.dir / f).exists()]
            if (self.dir / METRICS).exists() and (self.dir / METRICS).stat().st_size:
                found.append(METRICS)
            if found:
                raise UsageError(
                    f"run folder {self.dir} already holds a run ({', '.join(found)}); pass --resume to continue "
                    f"it, or choose another --run-name / --save-directory"
                )
        if getattr(args, "wandb", False) and self.is_main:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UsageError("--wandb: the wandb package is not installed (pip install wandb)") from None
        seed_everything(int(getattr(args, "seed", 0)))

        self._opened = False
        self._metrics_file = None
        self._wandb = None
        self._elapsed_before = 0.0  # training seconds of earlier segments of this run (from the checkpoint)
        self._t0 = time.monotonic()
        self._stop_flag = False
        self._stop_calls = 0
        self.stop_reason: str | None = None
        self._old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError, OSError):  # not the main thread: no handlers
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    # ---- time and stopping ---------------------------------------------------------------

    def _on_signal(self, signum, frame):  # only sets a flag; the loop saves between steps
        self._stop_flag = True
        self.stop_reason = signal.Signals(signum).name

    def elapsed(self) -> float:
        """Seconds of training so far, over all segments of a resumed run."""
        return self._elapsed_before + time.monotonic() - self._t0

    def should_stop(self) -> bool:
        """True once --max-time is used up or SIGTERM/SIGUSR1 arrived. No device sync on one process.

        Under DDP the ranks agree (an all-reduce every DDP_STOP_CHECK_EVERY calls), so call it
        the same number of times on every rank.
        """
        if not self._stop_flag and self.max_time is not None and time.monotonic() - PROCESS_START >= self.max_time:
            self._stop_flag = True
            self.stop_reason = f"--max-time {self.args.max_time}"
        if self.world_size <= 1:
            return self._stop_flag
        self._stop_calls += 1
        if self._stop_calls % DDP_STOP_CHECK_EVERY:
            return False
        import torch.distributed as dist

        flag = torch.tensor([float(self._stop_flag)], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and not self._stop_flag:
            self._stop_flag, self.stop_reason = True, "another rank stopped"
        return self._stop_flag

    # ---- files ---------------------------------------------------------------------------

    def _open(self):
        """Create the run folder, config.json, metrics.jsonl and the wandb run (rank 0, first write)."""
        if self._opened or not self.is_main:
            self._opened = True
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.resume and (self.dir / CONFIG).exists()):
            config = {k: _to_python(v) for k, v in vars(self.args).items()}
            config.update(experiment=self.experiment, command=list(sys.argv),
                          start_time=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
            _atomic_write_json(self.dir / CONFIG, config)
        self._metrics_file = open(self.dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115
        if getattr(self.args, "wandb", False):
            self._init_wandb()
        self._opened = True

    def _init_wandb(self):
        import wandb

        id_file = self.dir / WANDB_ID
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            atomic_write_bytes(id_file, lambda f: f.write(run_id.encode()))
        config = {k: _to_python(v) for k, v in vars(self.args).items()}
        config["experiment"] = self.experiment
        self._wandb = wandb.init(project=self.args.wandb_project, entity=self.args.wandb_entity, name=self.name,
                                 id=run_id, resume="allow", config=config, dir=str(self.dir))
        # our own step as the x axis: after a resume the steps between the checkpoint and the
        # interruption are logged again, which wandb's monotonic internal step would drop
        self._wandb.define_metric("step")
        self._wandb.define_metric("*", step_metric="step")

    def log(self, metrics: dict, step: int) -> None:
        """One line in metrics.jsonl (with "step" and "time") and one wandb.log; rank 0 only."""
        if not self.is_main:
            return
        self._open()
        record = {"step": int(step), "time": round(self.elapsed(), 3)}
        record.update({k: _to_python(v) for k, v in metrics.items()})
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._wandb is not None:
            self._wandb.log(record)

    def log_step_sizes(self, optimizer, step: int, extra: dict | None = None) -> bool:
        """Every --log-every steps: log the step size per block (`step_size/block_i`) plus `extra`.

        More than 64 blocks: `step_size/min`, `step_size/median`, `step_size/max`. Optimizers with
        an lr (the scheduled AdamW baseline) also log `lr`. Returns whether it logged.
        """
        if step % self.log_every:
            return False
        if not self.is_main:
            return True
        from common.optim_flags import current_step_sizes

        sizes = current_step_sizes(optimizer).detach().float()
        if sizes.numel() > MAX_LOGGED_BLOCKS:
            values = torch.stack([sizes.min(), sizes.median(), sizes.max()]).tolist()
            metrics = dict(zip(("step_size/min", "step_size/median", "step_size/max"), values))
        else:
            metrics = {f"step_size/block_{i}": v for i, v in enumerate(sizes.tolist())}
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        if isinstance(lr, (int, float)) or (isinstance(lr, torch.Tensor) and lr.numel() == 1):
            metrics["lr"] = _to_python(lr)
        if extra:
            metrics.update(extra)
        self.log(metrics, step)
        return True

    def _metrics_offset(self) -> int:
        if self._metrics_file is None:
            return 0
        self._metrics_file.flush()
        return self._metrics_file.tell()

    def save_checkpoint(self, state: dict) -> None:
        """Atomically write checkpoint.pt: `state` plus RNG states, elapsed time and the metrics offset."""
        if self.is_main:
            self._open()
            state = dict(state)
            state["harness"] = {
                "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "rng_numpy": _numpy_state_to_save(np.random.get_state()),
                "rng_python": random.getstate(),
                "metrics_offset": self._metrics_offset(),
                "elapsed": self.elapsed(),
                "run_name": self.name,
                "experiment": self.experiment,
            }
            atomic_write_bytes(self.dir / CHECKPOINT, lambda f: torch.save(state, f))
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def load_checkpoint(self) -> dict | None:
        """With --resume: the saved state (RNG states restored, metrics.jsonl cut back to the checkpoint).

        None without --resume, or when the run folder has no checkpoint yet (a fresh start).
        Tensors come back on the CPU; load_state_dict() moves them where they belong.
        """
        if not self.resume:
            return None
        path = self.dir / CHECKPOINT
        if not path.exists():
            if self.is_main and (self.dir / METRICS).exists():  # lines of an attempt that never checkpointed
                os.truncate(self.dir / METRICS, 0)
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"--resume: cannot read {path} ({type(e).__name__}: {e})") from None
        meta = state.pop("harness", None)
        if meta is None:
            raise UsageError(f"--resume: {path} was not written by common.harness")
        if meta.get("experiment") not in (None, self.experiment):
            raise UsageError(f"--resume: {path} is a {meta['experiment']} run, not {self.experiment}")
        torch.set_rng_state(meta["rng_torch"])
        if meta["rng_cuda"] and torch.cuda.is_available() and len(meta["rng_cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(meta["rng_cuda"])
        np.random.set_state(_numpy_state_to_load(meta["rng_numpy"]))
        random.setstate(_tuples(meta["rng_python"]))
        self._elapsed_before = float(meta["elapsed"])
        self._t0 = time.monotonic()
        if self.is_main:
            metrics = self.dir / METRICS
            if metrics.exists() and metrics.stat().st_size > meta["metrics_offset"]:
                os.truncate(metrics, meta["metrics_offset"])
            self._warn_changed_flags()
        return state

    def _warn_changed_flags(self):
        """A resumed run keeps its first config.json; say on stderr which flags differ from it."""
        try:
            saved = json.loads((self.dir / CONFIG).read_text())
        except (OSError, ValueError):
            return
        skip = {"resume", "max_time", "stop_after_steps", "command", "start_time", "experiment"}
        changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {v!r}" for k, v in vars(self.args).items()
                   if k in saved and k not in skip and _to_python(v) != saved[k]]
        if changed:
            print(f"note: resuming {self.dir} with changed flags: {'; '.join(changed)}", file=sys.stderr)

    def close(self) -> None:
        """Flush and close files and wandb (used after stopping early; `finish` calls it too)."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        for sig, handler in self._old_handlers.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)
        self._old_handlers = {}

    def finish(self, summary: dict) -> None:
        """The run completed: write summary.json {"finished": true, **summary, "wall_time": s}, close."""
        if self.is_main:
            self._open()
            record = {"finished": True}
            record.update({k: _plain(v) for k, v in summary.items()})
            record["wall_time"] = round(self.elapsed(), 3)
            _atomic_write_json(self.dir / SUMMARY, record)
            if self._wandb is not None:
                for section in ("final", "best"):
                    for k, v in (record.get(section) or {}).items():
                        self._wandb.summary[k if section == "final" else f"best/{k}"] = v
        self.close()

    def progress(self, iterable_or_total=None, desc: str | None = None, **kwargs):
        """tqdm progress bar on rank 0 (disabled elsewhere); a number means `total=`."""
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        kwargs.setdefault("disable", not self.is_main)
        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("mininterval", 0.5 if tty else 30.0)  # batch logs stay short
        if isinstance(iterable_or_total, int):
            return tqdm(total=iterable_or_total, desc=desc, **kwargs)
        return tqdm(iterable_or_total, desc=desc, **kwargs)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return _to_python(value)


def _numpy_state_to_save(state):
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_state_to_load(state):
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _tuples(value):
    """random.setstate needs tuples; torch.load may give back lists."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_tuples(v) for v in value)
    return value
