"""checkpoint.pt of one run folder: what it holds (weights, optimizer, schedule, loss scale, the
loop's progress, RNG states, the run's identity), its atomic write (with the FSDP2 shards it names),
and the resume rules that read it back: a checkpoint of another run or configuration, or one that
does not fit, is one `error:` line and nothing in the folder changes until it has loaded completely;
changed flags are refused or applied and recorded in config.json (docs/CONTRACTS.md).

Takes values; common/harness.py's `Run` holds one. Only rank 0 writes; every rank loads.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import cli, runfolder, sharded
from common.cli import UsageError
from common.distributed import unwrap
from common.metric_log import MetricLog, flags_record, to_python
from common.runfolder import CHECKPOINT, CONFIG, METRICS, RunFolderError

__all__ = ["Checkpointer", "load_training_state", "training_state"]

# flags of runfolder.RESUME_CHANGEABLE whose value the optimizer keeps in its param groups (key there)
_GROUP_KEYS = {"weight_decay_base": "weight_decay"}


def training_state(model, optimizer, scheduler, scaler) -> dict:
    """The part of a checkpoint every experiment has: weights, optimizer (with MetaOptimize's beta
    and traces), learning-rate schedule and AMP loss scale. model=None, optimizer=None: they are
    saved elsewhere (the shards of --fsdp)."""
    return {
        "model": model.state_dict() if model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def load_training_state(state: dict, model, optimizer, scheduler, scaler, folder=None) -> None:
    """Inverse of `training_state` (the model first: some optimizers check the weights they wrap).

    A checkpoint of --fsdp names the folder of its shards ("sharded", inside `folder`, the run
    folder); they load into a sharded model or, resharded, into a whole one. A model sharded by
    --fsdp needs such a checkpoint (ValueError otherwise).
    """
    if state.get("sharded") is not None:
        sharded.load(Path(folder) / state["sharded"], model, optimizer)
    elif sharded.is_sharded(model):
        raise ValueError("it was written without --fsdp; resume without --fsdp")
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])


class Checkpointer:
    """The checkpoints of the run `run_name` (of `experiment`) in `folder` (a runfolder.RunFolder).

    `flags`: the run's flags (argparse dest -> value; its identity and the changed-flag check come
    from them and config.json); `changeable`: the flags a resume may change; `resume`: --resume.
    The run supplies `check_state(optimizer, step)` (raises when the state is not finite),
    `before_write()` (rank 0, before checkpoint.pt is written: opens the metric log), `entries()`
    (the run's own entries of
    the checkpoint: "metrics_offset", "elapsed", ...) and `restore(entries)` (puts them back).
    """

    def __init__(self, folder: runfolder.RunFolder, *, run_name: str, experiment: str, flags: dict,
                 changeable: frozenset, resume: bool, is_main: bool, world_size: int, check_state, before_write,
                 entries, restore):
        self.folder, self.dir = folder, folder.path
        self.run_name, self.experiment, self.flags = run_name, experiment, flags
        self.changeable, self.resume_requested = changeable, resume
        self.is_main, self.world_size = is_main, world_size
        self._check_state, self._before_write = check_state, before_write
        self._entries, self._restore = entries, restore
        self.objects = None  # (model, optimizer, scheduler, scaler) once `resume` is called
        self.step = None  # "step" of the newest checkpoint in the folder
        self._changes: list = []  # (key, old, new) of the flags this resume changed (see _changed_flags)

    def resume(self, model, optimizer, scheduler=None, scaler=None) -> dict | None:
        """Register what a checkpoint holds; with --resume and a checkpoint, load them and return the
        checkpoint's other entries (the `progress` it was saved with). None on a fresh start."""
        self.objects = (model, optimizer, scheduler, scaler)
        state, meta = self._read()
        if state is None:
            return None
        shards = state.get("sharded")
        if shards is not None and not sharded.is_complete(self.dir / shards):
            raise UsageError(f"--resume: {self.dir / shards}, the shards {CHECKPOINT} names, is missing or incomplete")
        # a changed flag that lives in the param groups (--weight-decay-base): loading puts the saved
        # groups back, so the freshly built groups' values of its keys are put back after it
        keys = {_GROUP_KEYS[k] for k, _, _ in self._changes if k in _GROUP_KEYS}
        fresh = [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]
        try:
            load_training_state(state, unwrap(model), optimizer, scheduler, scaler, folder=self.dir)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--resume: {self.dir / CHECKPOINT} does not fit this run ({cli.first_line(e)}); resume with "
                             f"the flags the run started with (see {self.dir / CONFIG})") from None
        for group, values in zip(optimizer.param_groups, fresh):
            group.update(values)
        self._apply(state, meta)  # only now the folder changes (metrics cut back)
        return {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "scaler", "sharded")}

    def checkpoint(self, progress: dict) -> None:
        """Save the registered objects plus `progress`, after checking that weights and step sizes
        are finite (a diverged state never replaces the last finite checkpoint). Every rank calls it."""
        if self.objects is None:
            raise RuntimeError("Run.checkpoint: call run.resume(model, optimizer, ...) first")
        model, optimizer, scheduler, scaler = self.objects
        self._check_state(optimizer, progress.get("step"))
        model, shards = unwrap(model), None
        if sharded.is_sharded(model):  # --fsdp: the shards first, then checkpoint.pt naming them
            shards = self._save_shards(model, optimizer)
            self.save({**training_state(None, None, scheduler, scaler), "sharded": shards, **progress})
        else:
            self.save({**training_state(model, optimizer, scheduler, scaler), **progress})
        if self.is_main:  # shards that checkpoint.pt no longer names (all of them after a whole one)
            runfolder.remove_shard_folders(self.dir, keep=shards)
        self.step = progress.get("step")

    def _save_shards(self, model, optimizer) -> str:
        """Every rank writes its shards of the model and optimizer into a new folder (rank 0 names it);
        its name, to go into checkpoint.pt."""
        box = [runfolder.SHARDS.format(secrets.token_hex(4))]
        if self.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        folder = self.dir / box[0]
        try:
            sharded.save(folder, model, optimizer)
        except OSError as e:  # a full disk, ...: the checkpoint.pt in place still names complete shards
            if self.is_main:
                shutil.rmtree(folder, ignore_errors=True)
            raise RunFolderError(runfolder.describe_os_error(e, folder)) from None
        if self.is_main:
            runfolder.fsync_dir(folder)
        return box[0]

    @contextlib.contextmanager
    def checkpoint_on(self, errors, progress):
        """Inside the block, an exception of type `errors` first saves a checkpoint with `progress()`,
        then goes on (its one `error:` line names the file)."""
        try:
            yield
        except errors:
            self.checkpoint(progress())
            if self.is_main:
                from tqdm.auto import tqdm

                tqdm.write(f"note: checkpoint of step {self.step} saved in {self.dir}; continue with "
                           f"the same command plus --resume once the cause is fixed", file=sys.stderr)
            raise

    def save(self, state: dict) -> None:
        """Atomically write checkpoint.pt: `state` plus RNG states, the run's entries and identity
        (no divergence check: `checkpoint` is the method to use in a training loop)."""
        if self.is_main:
            self._before_write()
            state = dict(state)
            state["harness"] = {
                "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "rng_numpy": _numpy_state_to_save(np.random.get_state()),
                "rng_python": random.getstate(),
                **self._entries(),
                "run_name": self.run_name,
                "experiment": self.experiment,
                "config_hash": self._config_id(),
            }
            # checked again before the replace: the folder may have been replaced during a long write
            self.folder.write(CHECKPOINT, lambda f: torch.save(state, f))
        if self.world_size > 1:
            dist.barrier()

    def _config_id(self) -> str:
        """The hash of this run's configuration as it started (config.json, written at the first start
        and kept by resumes; the flags when there is none yet): every checkpoint of the run carries it."""
        saved = runfolder.read_config(self.dir)
        return runfolder.config_hash(flags_record(self.flags) if saved is None else saved)

    def load(self) -> dict | None:
        """With --resume: the saved state (RNG states restored, metrics.jsonl cut back to the checkpoint).

        None without --resume, or when the run folder has no checkpoint. Tensors come back on the
        CPU. A checkpoint of another run is refused (UsageError) before anything changes.
        """
        state, meta = self._read()
        if state is not None:
            self._apply(state, meta)
        return state

    def _read(self) -> tuple[dict | None, dict | None]:
        """checkpoint.pt split into (state, harness entries), checked to be this run's (run name,
        experiment, configuration hash) and to cut metrics.jsonl at a line; changes nothing."""
        if not self.resume_requested:
            return None, None
        path = self.dir / CHECKPOINT
        if not path.exists():
            return None, None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"--resume: cannot read {path} ({type(e).__name__}: {cli.first_line(e)})") from None
        meta = state.pop("harness", None) if isinstance(state, dict) else None
        if not isinstance(meta, dict):
            raise UsageError(f"--resume: {path} was not written by common.harness")
        # checkpoints written before the identity was saved lack some entries: unknown, accepted
        if meta.get("experiment") not in (None, self.experiment):
            raise UsageError(f"--resume: {path} is a {meta['experiment']} run, not {self.experiment}")
        if meta.get("run_name") not in (None, self.run_name):
            raise UsageError(f"--resume: {path} belongs to the run {meta['run_name']!r}, not {self.run_name!r}; "
                             f"it was copied or moved here: resume it under its own --run-name")
        if meta.get("config_hash") not in (None, self._config_id()):
            raise UsageError(f"--resume: {path} belongs to another configuration than {self.dir / CONFIG} "
                             f"(another run's checkpoint copied in?); nothing was changed")
        offset = int(meta["metrics_offset"])
        if self.is_main and not runfolder.ends_at_line(self.dir / METRICS, offset):
            raise UsageError(f"--resume: {path} does not match {self.dir / METRICS} (its offset {offset} falls "
                             f"inside a line); nothing was changed")
        self._changes = self._changed_flags(path)  # refused ones raise here, before anything changes
        return state, meta

    def _apply(self, state: dict, meta: dict) -> None:
        """Restore the RNG states and the run's entries of a checked checkpoint; cut metrics.jsonl back to it."""
        torch.set_rng_state(meta["rng_torch"])
        if meta["rng_cuda"] and torch.cuda.is_available() and len(meta["rng_cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(meta["rng_cuda"])
        np.random.set_state(_numpy_state_to_load(meta["rng_numpy"]))
        random.setstate(_tuples(meta["rng_python"]))
        self._restore(meta)
        self.step = state.get("step")
        self._record_changes(state.get("step"))
        if self.is_main:
            self.folder.truncate(METRICS, meta["metrics_offset"])

    def _changed_flags(self, path) -> list[tuple[str, object, object]]:
        """The flags of this resume that differ from config.json, as (key, old, new): the changeable
        ones are said on stderr (and applied, recorded by _apply); any other one outside
        runfolder.RUN_CONTROL changes what the checkpoint means: one error line."""
        saved = runfolder.read_config(self.dir)
        if saved is None:
            return []
        changed = []
        for k, v in self.flags.items():
            new = json.loads(json.dumps(to_python(v), default=str))  # compared as config.json holds it
            if k in saved and k not in runfolder.RUN_CONTROL and new != saved[k]:
                changed.append((k, saved[k], new))
        text = "; ".join(f"{cli.flag_name(k)} {old!r} -> {new!r}" for k, old, new in changed)
        refused = [k for k, _, _ in changed if k not in self.changeable]
        if refused:
            raise UsageError(f"--resume: {path} does not fit this run: changed flags: {text}; "
                             f"{', '.join(cli.flag_name(k) for k in refused)} would change what the checkpoint "
                             f"means (docs/CONTRACTS.md): resume with the flags the run started with (see "
                             f"{self.dir / CONFIG}), or start another --run-name; nothing was changed")
        if changed and self.is_main:
            print(f"note: resuming {self.dir} with changed flags: {text} (applied from the checkpoint's "
                  f"step on, recorded in {CONFIG})", file=sys.stderr)
        return changed

    def _record_changes(self, step) -> None:
        """Rank 0, once the checkpoint loaded: config.json takes the changed flags' new values and lists
        each change with the step it took effect at (its "changes"; the run's identity stays the first one)."""
        if not self._changes or not self.is_main:
            return
        config = runfolder.read_config(self.dir)
        if config is None:
            return
        for key, old, new in self._changes:
            config[key] = new
            config.setdefault("changes", []).append(
                {"step": step, "flag": cli.flag_name(key), "key": key, "old": old, "new": new})
        MetricLog(self.folder).write_config(config)


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
