"""The experiment harness every `train.py` shares: flags, run folder, logging, run control, DDP, AMP.

It reads the flags and holds the `Run`; the parts below it take values: common/distributed.py
(process group, rank, device, DDP), common/train_step.py (autocast, GradScaler, compile,
backward-and-step), common/step_metrics.py (step sizes as metrics, the finiteness check),
common/stop_control.py (signals, --max-time, stop agreement across ranks), common/metric_log.py
(config.json, metrics.jsonl, wandb), common/checkpointer.py (checkpoint.pt, its identity and the
resume rules that read it), common/sharded.py (FSDP2 and its checkpoints), common/runfolder.py
(the run-folder rules and `RunFolder`, the folder a run holds).

A training script uses it like this (see cifar10/train.py):

    parser = harness.ArgParser(description=...)
    harness.add_run_args(parser)
    add_optimizer_args(parser)
    args = harness.check_args(parser.parse_args())  # every flag check that needs no device or data
    run = harness.start_run(args, "cifar10")      # locks the run folder, seeds, picks the device
    ... build data, model on run.device (bad input raises ValueError) ...
    model = harness.shard(model, model.layers, args, run.device)   # --fsdp (harness.add_fsdp_arg)
    ... build the optimizer (after `shard`: FSDP2 makes new parameters) ...
    state = run.resume(model, optimizer, scheduler, scaler)   # --resume: the rest of the checkpoint
    for ...:
        ...
        run.log_step(optimizer, step, {...})       # every --log-every steps; checks for divergence
        if run.should_stop(step):                  # --max-time, SIGTERM, SIGUSR1, SIGINT
            return run.stop(progress(), "at epoch 3, batch 7/500")   # checkpoint, message, exit code 0
    run.log({...}, step)
    run.checkpoint(progress())                     # weights, optimizer, ... plus `progress` (a dict with "step")
    run.finish({"final": {...}, "best": {...}})

    if __name__ == "__main__":
        harness.run_main(main)                     # bad input -> one `error:` line, exit 2

Run folder layout, metric keys and exit codes: docs/CONTRACTS.md; its rules live in
common/runfolder.py. The folder is locked for the whole run (a second process on it fails at
once, naming the holder). Nothing but the lock is written until the first `log`, `checkpoint` or
`finish`; a run that fails on bad input before that leaves nothing behind.

Divergence: when step sizes are logged, when a loss is logged and before every checkpoint, the
harness checks that losses, weights and step sizes are finite (one host sync, never per step);
`run.check_finite(values, step)` checks numbers a loop has read anyway (l2o's meta-objective).
A non-finite value ends the run: the checkpoint of the last finite state is kept, summary.json
says {"diverged": true, "diverged_at_step": N, ...}, and the process exits with code 3. With an
enabled GradScaler (fp16) a non-finite logged loss is first an overflow the scaler skipped (logged
as null, with a note); only one that persists to the next log is divergence.

The run holds the folder it claimed, not its path: a folder deleted or replaced while it runs
stops it at its next write (one line, exit 1), and nothing is written into the new one.

Checkpoints are loaded with `torch.load(weights_only=True)`: the state handed to `checkpoint` /
`save_checkpoint` may hold tensors, numbers, strings, None and lists/tuples/dicts of them
(everything a `state_dict()` holds); no numpy arrays or custom classes.

FSDP2 (--fsdp): `shard` wraps the model with fully_shard (each of the given blocks, then the
root) over all ranks (a process group of one without torchrun). `checkpoint` then has every rank
write its shards of the model and optimizer into a new folder checkpoint.<8 hex>.dcp
(torch.distributed.checkpoint); checkpoint.pt, replaced atomically once that folder is complete,
holds the rest and names it, and the folder it named before is removed. So a kill at any point
leaves the last complete checkpoint, as with one file (common/sharded.py).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import cli, distributed, runfolder, sharded, train_step
from common.checkpointer import Checkpointer, load_training_state, training_state  # noqa: F401 (re-exported)
from common.cli import UsageError, parse_max_time
from common.distributed import _DIST, cleanup_distributed, gradient_sync, is_main, resolve_device, unwrap  # noqa: F401 (re-exported)
from common.metric_log import MetricLog, flags_record, plain, run_config
from common.metric_log import to_python as _to_python
from common.optim_flags import OPTIMIZER_CHOICES, as_flags, check_optimizer_args
from common.optimizers.blocks import resolve_stepsize_groups
from common.runfolder import CONFIG, SUMMARY, Diverged, RunFolder, RunFolderError
from common.step_metrics import MAX_LOGGED_BLOCKS, check_state, step_size_metrics  # noqa: F401 (re-exported)
from common.stop_control import DDP_STOP_CHECK_EVERY, PROCESS_START, StopControl  # noqa: F401 (re-exported)
from common.train_step import backward_and_step, graph_backward  # noqa: F401 (re-exported)

__all__ = [
    "ArgParser",
    "Diverged",
    "Run",
    "RunFolderError",
    "UsageError",
    "add_fsdp_arg",
    "add_run_args",
    "amp_context",
    "backward_and_step",
    "check_args",
    "check_stepsize_groups",
    "cleanup_distributed",
    "distribute",
    "grad_scaler",
    "gradient_sync",
    "graph_backward",
    "is_main",
    "load_training_state",
    "maybe_compile",
    "parse_max_time",
    "require_positive",
    "resolve_device",
    "run_main",
    "seed_everything",
    "setup_distributed",
    "shard",
    "start_run",
    "step_size_metrics",
    "training_state",
    "unwrap",
]

EXIT_DIVERGED = 3  # exit code of a run that diverged (0: finished or stopped with a checkpoint; 2: bad input)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

ArgParser = cli.ArgParser  # one-line errors, -1e-3 as a value, non-finite floats refused


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
                   help=f"stop cleanly with a checkpoint after this much wall time: {cli.TIME_FORMATS}")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--resume", action="store_true",
                   help="continue the run <save-directory>/<run-name> from its checkpoint (a fresh start if "
                        "the folder is empty; refused if it holds results but no checkpoint)")
    g.add_argument("--start-over", action="store_true",
                   help="delete the results in <save-directory>/<run-name> (checkpoint, metrics, summary) and "
                        "train from scratch")
    g.add_argument("--log-every", type=int, default=100,
                   help="log step sizes (and check for divergence) every this many optimizer steps")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast mixed precision (fp16 adds a gradient scaler)")
    # tests: once this many optimizer steps are done, rank 0 sends itself SIGTERM (see Run.should_stop)
    g.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)
    w = parser.add_argument_group("wandb")
    w.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    w.add_argument("--wandb-project", default="metaoptimize", help="wandb project")
    w.add_argument("--wandb-entity", default=None, help="wandb entity (team or user)")
    return parser


def add_fsdp_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--fsdp, for experiments whose train.py calls `shard` (TinyStories, ImageNet)."""
    parser.add_argument("--fsdp", action="store_true",
                        help="shard weights, gradients and optimizer state over the torchrun ranks with FSDP2 "
                             "(fully_shard) instead of DDP; checkpoints become sharded (a checkpoint.<id>.dcp "
                             "folder next to checkpoint.pt). Works with --compile and --amp bf16; MetaOptimize "
                             "and --optimizer AdamW only")
    return parser


def _check_fsdp_args(args) -> None:
    if getattr(args, "amp", "none") == "fp16":
        raise UsageError("--fsdp does not take --amp fp16 (--dtype float16): its gradient scaler would check each "
                         "rank's shards on their own and the ranks could disagree on skipping a step; use --amp bf16")
    name = getattr(args, "optimizer", "HF")
    if str(name).strip().lower() not in OPTIMIZER_CHOICES:
        raise UsageError(f"--fsdp works with --optimizer HF (MetaOptimize) or AdamW, not {name}: the baselines' "
                         f"packages treat each rank's shards as the whole model")


def check_args(args):
    """Every check of the run and optimizer flags that needs no device, data or model (raises
    UsageError / ValueError naming the flag); returns `args`.

    Call it at the end of an experiment's `parse_args`: sweep.py checks a sweep's values through
    that function. `start_run` calls it again for namespaces made elsewhere.
    """
    parse_max_time(getattr(args, "max_time", None))
    if getattr(args, "log_every", 1) < 1:
        raise UsageError(f"--log-every must be a positive number of steps, got {args.log_every}")
    name = getattr(args, "run_name", None)
    if name is not None and (not str(name) or str(name) in (".", "..") or "/" in str(name) or "\\" in str(name)):
        raise UsageError(f"--run-name must be a plain folder name, got {name!r}")
    if getattr(args, "resume", False) and name is None:
        raise UsageError("--resume needs --run-name (the name of the run to continue)")
    for key, value in vars(args).items():  # a namespace from another parser: nan never makes sense
        if isinstance(value, float) and math.isnan(value):
            raise UsageError(f"{cli.flag_name(key)} must be a finite number, got nan")
    if hasattr(args, "optimizer"):
        check_optimizer_args(args)
    if getattr(args, "fsdp", False):
        _check_fsdp_args(args)
    return args


def check_stepsize_groups(args, build_model) -> None:
    """--stepsize-groups against the model's trainable tensors (UsageError naming the flag), for an
    experiment's `parse_args`: `build_model()` runs on the meta device (no memory, no data), so a
    sweep checks it before it writes or submits anything. Only MetaOptimize (--optimizer HF) reads it."""
    spec = getattr(args, "stepsize_groups", None)
    if spec is None or OPTIMIZER_CHOICES.get(str(getattr(args, "optimizer", "HF")).strip().lower()) != "HF":
        return
    with torch.device("meta"):
        model = build_model()
    try:
        resolve_stepsize_groups(spec, sum(1 for p in model.parameters() if p.requires_grad))
    except ValueError as e:
        raise UsageError(as_flags(str(e))) from None


def run_main(main) -> None:
    """Call `main()` and exit with its code (0 when it returns None).

    Bad input (ValueError, UsageError, DatasetError) becomes one `error:` line and exit code 2; a
    run folder that cannot be used or written (locked, disk full) one `error:` line and exit 1; a
    diverged run one `error:` line and exit 3. Set HARNESS_TRACEBACK=1 for the full traceback.
    """
    try:
        from common.data import DatasetError
    except ImportError:  # pragma: no cover - data module not present
        DatasetError = UsageError  # noqa: N806
    try:
        code = main()
    except (ValueError, UsageError, DatasetError, RunFolderError, Diverged) as e:
        _close_runs()
        if os.environ.get("HARNESS_TRACEBACK"):
            raise
        sys.stderr.write(cli.error_line(e) + "\n")
        sys.stderr.flush()
        cleanup_distributed()
        sys.exit(EXIT_DIVERGED if isinstance(e, Diverged) else 1 if isinstance(e, RunFolderError) else 2)
    except BaseException:
        _close_runs()
        raise
    cleanup_distributed(barrier=True)
    sys.exit(int(code or 0))


# --------------------------------------------------------------------------------------
# Devices, distributed, AMP, compile
# --------------------------------------------------------------------------------------

def setup_distributed(args=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank): `distributed.setup` with the run's --fsdp and --device."""
    if args is None:
        return distributed.setup()
    return distributed.setup(group=bool(getattr(args, "fsdp", False)), device=getattr(args, "device", "auto"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_context(args, device):
    """Autocast context for --amp bf16/fp16 (a no-op context for --amp none)."""
    return train_step.autocast(getattr(args, "amp", "none"), device)


def grad_scaler(args, device) -> torch.amp.GradScaler:
    """GradScaler, enabled only for --amp fp16 (when disabled its calls pass through)."""
    return train_step.scaler(getattr(args, "amp", "none"), device)


def maybe_compile(model, args):
    """torch.compile(model) with --compile. Save `unwrap(model).state_dict()` in checkpoints."""
    return train_step.compile_model(model, bool(getattr(args, "compile", False)))


def shard(model, units, args, device):
    """With --fsdp: fully_shard each module of `units` (the model's blocks), then the model (FSDP2,
    over all ranks); unchanged otherwise. Call it before building the optimizer; `model` stays the
    module to evaluate, save and hand to `run.resume`."""
    if not getattr(args, "fsdp", False):
        return model
    return sharded.shard_model(model, units, device)


def distribute(model, device, args=None):
    """`distributed.distribute` (DDP under torchrun), after refusing a Hessian trace (--hessian)
    under DDP, whose reducer cannot take the second backward (a script that runs the forward through
    the module itself instead can use it: MetaOptimize then averages the gradients and products
    across the ranks). `args`: the run's flags."""
    world = distributed.world_size()
    if world > 1 and not sharded.is_sharded(model) and getattr(args, "hessian", "none") not in (None, "none"):
        raise UsageError(f"--hessian {args.hessian} does not work with DDP ({world} ranks): its "
                         "reducer cannot take the second backward; run on one process (python3, not torchrun)")
    return distributed.distribute(model, device)


def start_run(args, experiment: str, resume_changeable=()) -> Run:
    """Check the flags (`check_args`), lock the run folder, seed, pick the device (see `Run`).

    `resume_changeable`: the experiment's own flags (argparse dest names) that a --resume may change
    besides runfolder.RESUME_CHANGEABLE (applied and recorded; every other changed flag is refused).

    The run and optimizer flags are checked before anything else, so a typo fails before any data
    is downloaded; the save directory is checked writable and the run folder locked right after.
    """
    check_args(args)
    return Run(args, experiment, resume_changeable)


_ACTIVE: list[Run] = []  # runs of this process that hold their folder


def _close_runs() -> None:
    """Close every run of this process (after an error: lock released, an unused folder removed)."""
    for run in list(_ACTIVE):
        with contextlib.suppress(Exception):
            run.close()


# errors rank 0 hits while claiming the folder, raised on every rank (by name, through a broadcast)
_CLAIM_ERRORS = {cls.__name__: cls for cls in (UsageError, RunFolderError, runfolder.RunLocked, Diverged)}
# losses and step sizes: a non-finite one of these in a logged record means the run diverged
_WATCHED = ("loss", "step_size/")


class Run:
    """One run: `<save-directory>/<run-name>/` with config.json, metrics.jsonl, checkpoint.pt, summary.json.

    A composition of its parts, each taking values: the run folder (`runfolder.RunFolder`: claim,
    resume rules, the held folder every write goes through), the metric log (`metric_log.MetricLog`:
    config.json, metrics.jsonl, wandb), the checkpointer (`checkpointer.Checkpointer`) and the stop
    control (`stop_control.StopControl`). Run itself adds the divergence rules, the run's time and
    the progress bars, and reads the flags for them.

    Attributes: dir (Path), device, is_main, rank, world_size, local_rank, max_time (s or None),
    stop_reason (why should_stop() said yes). Only rank 0 writes files and logs to wandb; every
    rank calls the same methods at the same steps (they synchronise under DDP).
    """

    def __init__(self, args, experiment: str, resume_changeable=()):
        self.args, self.experiment = args, experiment
        self.max_time = parse_max_time(getattr(args, "max_time", None))
        self.log_every = int(getattr(args, "log_every", 100))
        self.rank, self.world_size, self.local_rank = setup_distributed(args)
        self.is_main = self.rank == 0
        self.device = resolve_device(getattr(args, "device", "auto"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        name = getattr(args, "run_name", None)
        if name is None:
            name = runfolder.new_run_name()
            if self.world_size > 1:  # every rank must use rank 0's timestamp
                box = [name]
                dist.broadcast_object_list(box, src=0)
                name = box[0]
        args.run_name = self.name = str(name)
        self.dir = Path(getattr(args, "save_directory", "outputs")) / self.name
        self.resume_requested = bool(getattr(args, "resume", False))

        self._opened = False
        self._closed = False
        self._log = None  # the MetricLog, once the folder is claimed
        self._folder = RunFolder(self.dir)  # claimed by rank 0: the folder it holds, not the path
        self._overflowed: set[str] = set()  # losses whose last logged value was non-finite (fp16: see _check_metrics)
        self._bars = []  # progress bars
        self._elapsed_before = 0.0  # training seconds of earlier segments of this run (from the checkpoint)
        self._t0 = time.monotonic()
        self._checkpointer = Checkpointer(
            self._folder, run_name=self.name, experiment=experiment, flags=vars(args),
            changeable=runfolder.RESUME_CHANGEABLE | frozenset(resume_changeable), resume=self.resume_requested,
            is_main=self.is_main, world_size=self.world_size, check_state=self._check_state,
            before_write=self._open, entries=self._checkpoint_entries, restore=self._restore)
        self._stopper = StopControl(self.max_time, getattr(args, "max_time", None), getattr(args, "stop_at_step", None),
                                    self.is_main, self.world_size, self.device)

        for run in list(_ACTIVE):  # an earlier run of this process on this folder that never closed
            if run.dir.resolve() == self.dir.resolve():
                run.close()
        self._claim(bool(getattr(args, "start_over", False)))
        _ACTIVE.append(self)

        if getattr(args, "wandb", False) and self.is_main:
            try:
                import wandb  # noqa: F401
            except ImportError:
                self.close()
                raise UsageError("--wandb: the wandb package is not installed (pip install wandb)") from None
        seed_everything(int(getattr(args, "seed", 0)))
        self._stopper.install()

    def _claim(self, start_over: bool) -> None:
        """Rank 0 claims the folder (runfolder.RunFolder.claim); every rank fails with its error, instead of hanging."""
        error = None
        if self.is_main:
            try:
                self._folder.claim(self.resume_requested, start_over)
            except tuple(_CLAIM_ERRORS.values()) as e:
                error = e
        if self.world_size > 1:
            box = [None if error is None else (type(error).__name__, str(error))]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                error = _CLAIM_ERRORS[box[0][0]](box[0][1])
        if error is not None:
            self.close()
            raise error

    # ---- time and stopping ---------------------------------------------------------------

    @property
    def stop_reason(self) -> str | None:
        """Why should_stop() said yes (a signal's name, "--max-time ...", "another rank stopped")."""
        return self._stopper.reason

    @stop_reason.setter
    def stop_reason(self, value):
        self._stopper.reason = value

    @property
    def _stop_flag(self) -> bool:  # tests set it: as if only this rank got the signal
        return self._stopper.flag

    @_stop_flag.setter
    def _stop_flag(self, value):
        self._stopper.flag = bool(value)

    @property
    def _on_signal(self):
        return self._stopper.on_signal

    def elapsed(self) -> float:
        """Seconds of training so far, over all segments of a resumed run."""
        return self._elapsed_before + time.monotonic() - self._t0

    def should_stop(self, step: int | None = None) -> bool:
        """True once --max-time is used up or SIGTERM/SIGUSR1/SIGINT arrived. No device sync on one process.

        `step` (optimizer steps done) serves the hidden test flag --stop-at-step: from that step on,
        rank 0 sends itself SIGTERM. Under DDP the ranks agree (an all-reduce every
        DDP_STOP_CHECK_EVERY calls; every call with --stop-at-step, so tests stop at that step), so
        call it the same number of times on every rank (common/stop_control.py).
        """
        return self._stopper.should_stop(step)

    def stop(self, progress: dict, where: str) -> int:
        """Stop early: checkpoint (unless one of this step exists), close, say how to continue; returns 0."""
        if progress.get("step") is None or progress.get("step") != self._checkpoint_step:
            self.checkpoint(progress)
        self.close()
        if self.is_main:
            print(f"stopped ({self.stop_reason}) {where}; checkpoint saved in {self.dir}; continue with the same "
                  f"command plus --resume", file=sys.stderr, flush=True)
        return 0

    # ---- divergence ------------------------------------------------------------------------

    def _check_state(self, optimizer, step) -> dict:
        """The step sizes as metrics (common/step_metrics.py), after checking that they and the
        weights are finite (else Diverged). One host sync."""
        checked = check_state(optimizer, self.world_size)
        if checked.problem is not None:
            self._diverge(step, checked.problem)
        return checked.metrics

    def _check_metrics(self, metrics: dict, step) -> None:
        """A non-finite loss or step size among `metrics` ends the run as diverged. With an enabled
        GradScaler (fp16) a non-finite loss is first an overflow the scaler skipped: logged as null with
        a note, and only the next logged value of that key non-finite too ends the run (in place)."""
        watched = {k: v for k, v in metrics.items() if any(w in k for w in _WATCHED)}
        scaler = self._objects[3] if self._objects else None
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            for k, v in list(watched.items()):
                if "loss" not in k or not isinstance(v, (int, float)):
                    continue
                if math.isfinite(v):
                    self._overflowed.discard(k)
                elif k not in self._overflowed:
                    self._overflowed.add(k)
                    del watched[k]
                    metrics[k] = None
                    if self.is_main:
                        print(f"note: {k} is {v} at step {step}: an fp16 overflow that the gradient scaler skipped? "
                              f"The run goes on (logged as null); a non-finite {k} at the next log ends it as "
                              f"diverged", file=sys.stderr, flush=True)
        self.check_finite(watched, step)

    def check_finite(self, values: dict, step) -> None:
        """A non-finite number among `values` ends the run as diverged at `step`, as a logged loss
        does: for values the loop reads on the host anyway between logs (a meta-objective, a loss)."""
        for k, v in values.items():
            v = _to_python(v)
            if isinstance(v, (int, float)) and not math.isfinite(v):
                self._diverge(step, f"{k} is {v}")

    def _diverge(self, step, reason: str):
        """Record the divergence in summary.json, close, raise Diverged (exit code 3 under run_main)."""
        kept = self._checkpoint_step
        if self.is_main:
            self._open()
            record = {"finished": False, "diverged": True, "diverged_at_step": _to_python(step), "reason": reason,
                      "checkpoint_step": kept, "wall_time": round(self.elapsed(), 3)}
            self._folder.write_json(SUMMARY, record)
            if self._wandb is not None:
                self._wandb.summary.update({"diverged": True, "diverged_at_step": record["diverged_at_step"]})
        self.close()
        where = (f"the checkpoint of step {kept} (the last finite state) is kept in {self.dir}" if kept is not None
                 else f"it diverged before its first checkpoint; see {self.dir / SUMMARY}")
        raise Diverged(f"diverged at step {step}: {reason}; {where}")

    # ---- files ---------------------------------------------------------------------------

    def _open(self):
        """Create config.json, metrics.jsonl and the wandb run (rank 0, first write); before that and
        every write after, the folder is checked to be still the run's (`RunFolder.check`)."""
        self._folder.check()
        if self._opened or not self.is_main:
            self._opened = True
            return
        config = None  # a resume keeps the config.json of the first start (the checkpointer records changes)
        if not (self.resume_requested and (self.dir / CONFIG).exists()):
            config = run_config(vars(self.args), self.experiment)
        wandb = None
        if getattr(self.args, "wandb", False):
            wandb = dict(project=self.args.wandb_project, entity=self.args.wandb_entity, name=self.name,
                         config={**flags_record(vars(self.args)), "experiment": self.experiment})
        self._log = MetricLog(self._folder, wandb)
        self._log.open(config)
        self._opened = True

    @property
    def _wandb(self):
        return self._log.wandb if self._log is not None else None

    def log(self, metrics: dict, step: int) -> None:
        """One line in metrics.jsonl (with "step" and "time") and one wandb.log (rank 0).

        A non-finite loss (a key holding "loss") or step size ends the run as diverged (every rank
        must log the same values then: reduce them over the ranks first, as the experiments do).
        """
        metrics = {k: _to_python(v) for k, v in metrics.items()}
        self._check_metrics(metrics, step)
        if not self.is_main:
            return
        self._open()  # checks that the folder is still this run's
        record = {"step": int(step), "time": round(self.elapsed(), 3), **metrics}
        self._log.write(record)

    def is_log_step(self, step: int) -> bool:
        """Whether `log_step` logs at `step` (every --log-every steps)."""
        return step % self.log_every == 0

    def log_step(self, optimizer, step: int, metrics: dict | None = None) -> None:
        """Every --log-every steps: check that the step sizes and weights are finite (else:
        diverged), and log the step sizes (`step_size/block_i`, `common.step_metrics`) with
        `metrics` in one line. Every rank calls it; on other steps it does nothing.

        More than 64 blocks: `step_size/min`, `step_size/median`, `step_size/max`. Optimizers with
        an lr (the scheduled AdamW baseline) also log `lr`.
        """
        if not self.is_log_step(step):
            return
        record = self._check_state(optimizer, step)
        # the lr of optimizers whose step size it is (MetaOptimize's lr only scales its step sizes)
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        if hasattr(optimizer, "step_sizes"):
            lr = None
        if isinstance(lr, (int, float)) or (isinstance(lr, torch.Tensor) and lr.numel() == 1):
            record["lr"] = _to_python(lr)
        if metrics:
            record.update(metrics)
        self.log(record, step)

    def _metrics_offset(self) -> int:
        return self._log.offset() if self._log is not None else 0

    # ---- checkpoints (common/checkpointer.py) ------------------------------------------------

    def resume(self, model, optimizer, scheduler=None, scaler=None) -> dict | None:
        """Register what a checkpoint holds (see `checkpoint`); with --resume and a checkpoint, load
        them and return the checkpoint's other entries (the `progress` it was saved with).

        None on a fresh start. A checkpoint that does not fit (other model flags) is one error line.
        """
        return self._checkpointer.resume(model, optimizer, scheduler, scaler)

    def checkpoint(self, progress: dict) -> None:
        """Save weights, optimizer, schedule and loss scale (registered by `resume`) plus `progress`
        (what the loop needs to continue; its "step" is the optimizer steps done).

        First checks that weights and step sizes are finite: a diverged state never replaces the
        last finite checkpoint. Every rank calls it (rank 0 writes).
        """
        self._checkpointer.checkpoint(progress)

    def checkpoint_on(self, errors, progress):
        """Inside the block, an exception of type `errors` (e.g. an unreadable data file between
        steps) first saves a checkpoint with `progress()` (so --resume keeps the steps done), then
        goes on (its one `error:` line names the file)."""
        return self._checkpointer.checkpoint_on(errors, progress)

    def save_checkpoint(self, state: dict) -> None:
        """Atomically write checkpoint.pt: `state` plus RNG states, elapsed time and the metrics offset
        (no divergence check: `checkpoint` is the method to use in a training loop)."""
        self._checkpointer.save(state)

    def load_checkpoint(self) -> dict | None:
        """With --resume: the saved state (RNG states restored, metrics.jsonl cut back to the checkpoint).

        None without --resume, or when the run folder has no checkpoint (a fresh start: the folder
        holds no results then, see `runfolder.RunFolder.claim`). Tensors come back on the CPU. A checkpoint of
        another run is refused (UsageError) before anything changes.
        """
        return self._checkpointer.load()

    @property
    def _objects(self):  # (model, optimizer, scheduler, scaler) once `resume` is called
        return self._checkpointer.objects

    @property
    def _checkpoint_step(self):  # "step" of the newest checkpoint in the folder
        return self._checkpointer.step

    def _checkpoint_entries(self) -> dict:
        """The run's own entries of a checkpoint (see `_restore`)."""
        return {"metrics_offset": self._metrics_offset(), "elapsed": self.elapsed(),
                "overflowed": sorted(self._overflowed)}

    def _restore(self, entries: dict) -> None:
        """Elapsed time and fp16 overflow notes from a checkpoint's entries."""
        self._elapsed_before = float(entries["elapsed"])
        self._t0 = time.monotonic()
        self._overflowed = set(entries.get("overflowed", ()))

    # ---- the end -------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close files and wandb, restore signal handlers, let go of the folder (used after
        stopping early; `finish` calls it too). A folder this run created and never wrote is removed."""
        if self._closed:
            return
        self._closed = True
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        for bar in self._bars:
            bar.close()
        self._bars = []
        if self._log is not None:
            self._log.close()
            self._log = None
        if hasattr(self, "_stopper"):
            self._stopper.restore()
        self._folder.release()

    def finish(self, summary: dict) -> None:
        """The run completed: write summary.json {"finished": true, **summary, "wall_time": s}, close."""
        if self.is_main:
            self._open()
            record = {"finished": True}
            record.update(plain(summary))
            record["wall_time"] = round(self.elapsed(), 3)
            self._folder.write_json(SUMMARY, record)
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
            bar = tqdm(total=iterable_or_total, desc=desc, **kwargs)
        else:
            bar = tqdm(iterable_or_total, desc=desc, **kwargs)
        self._bars.append(bar)  # closed by close(): an error line then starts on a line of its own
        return bar
