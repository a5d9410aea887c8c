#!/usr/bin/env python3
"""Sweeps on SLURM: one sweep file -> one sbatch job array (one array task per configuration x seed).

    python scripts/sweep.py print  scripts/sweeps/cifar10_combinations.yaml     # the runs and their commands
    python scripts/sweep.py write  scripts/sweeps/cifar10_combinations.yaml     # the sbatch script only
    python scripts/sweep.py submit scripts/sweeps/cifar10_combinations.yaml \\
        --set slurm.partition=gpu --set fixed.data-dir=/data/cifar10           # write + sbatch

Sweep file (YAML or TOML; every key but `experiment` is optional):

    experiment: cifar10            # folder of the experiment's train.py (or a path to a train.py)
    name: cifar10_combinations     # job name and default folder name (default: the file's name)
    save_directory: outputs/cifar10_combinations    # --save-directory of every run
    fixed:                         # flags of every run (flag names without the leading --)
      num-epochs: 60
    grid:                          # every combination of these values ...
      stepsize-groups: [scalar, resnet18_blocks]
    configs:                       # ... for each of these (a list value inside an entry is a sub-grid)
      - {alg-base: AdamW, alg-meta: fixed, alpha0: 1.0e-5}
      - {alg-base: AdamW, alg-meta: Adam, alpha0: 1.0e-6, stepsize-groups: [scalar, resnet18_blocks]}
    seeds: [0, 1, 2]               # or a count: 3 means 0, 1, 2
    run_name: "{alg-base}-{alg-meta}-{stepsize-groups}-s{seed}"   # default: the flags that vary, e.g. AdamW_Adam_a1e-06_s0
    slurm: {partition: gpu, gpus: 1, cpus_per_task: 8, mem: 32G, time: "24:00:00", throttle: 8}

Values: true -> `--flag`, false -> `--no-flag` when train.py has it (else left out), null -> left out
(train.py's default), a list under `fixed` -> several values (`--flag a b`). In grid/configs a list
means alternatives; write a list-valued flag as a string ("[3,12,47]"). grid/configs override fixed.
Relative paths are relative to the folder you run this script from (the jobs start there too).
YAML reads 1e-5 as text (fine for the command line); write 1.0e-5 to get a number.

Flags are checked against the experiment's own parser (its `parse_args`, else `train.py --help`)
before anything is written or submitted: an unknown flag or a bad value is one `error:` line.
sweep.py sets --seed, --run-name, --save-directory, --max-time and --resume / --start-over itself.

Preemption and time limits (the sbatch script does this for every task):
- train.py gets `--max-time` = slurm.time - slurm.stop_margin and stops itself with a checkpoint;
- SLURM sends USR1 to the batch shell slurm.signal_before seconds before the limit
  (`#SBATCH --signal=B:USR1@...`), which forwards it to train.py (checkpoint + exit);
- SIGTERM sent with `scancel --full --signal=TERM` reaches train.py directly (checkpoint + exit);
- then the task requeues itself (`scontrol requeue`, `#SBATCH --requeue`) and continues with
  `--resume` from the checkpoint. Not requeued by the script: a job that SLURM is ending (plain
  `scancel`, the time limit, preemption: SLURM requeues preempted jobs itself when the cluster's
  PreemptMode says so), a train.py that fails on its own (its exit code is the task's), a task
  restarted slurm.max_restarts times already. The next `submit` resumes such runs from their checkpoint.
Re-submitting a sweep skips the runs whose folder holds summary.json with "finished": true or
"diverged": true, and refuses while jobs of the same name are still queued (pass --force to submit
anyway). A task without a checkpoint to resume from starts its run over (--start-over): an earlier
attempt died before its first checkpoint. The sbatch script is scripts/sweep_job.sh filled in.
Logs: <save_directory>/logs/<run-name>.log (every attempt of the run, appended).
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `common` (its cli and runfolder modules need no torch)
from common import runfolder  # noqa: E402
from common.cli import ArgParser, UsageError, duration_seconds, error_line  # noqa: E402

JOB_TEMPLATE = Path(__file__).with_name("sweep_job.sh")  # the sbatch script, @FIELD@s filled in
CHECKER = Path(__file__).with_name("sweep_check.py")  # checks the runs with train.py's own parse_args

# sbatch settings; a sweep file's `slurm:` section overrides them
SLURM_DEFAULTS = {
    "partition": None,  # None: the cluster's default partition
    "account": None,
    "qos": None,
    "gpus": 1,  # --gres=gpu:N (0: none)
    "cpus_per_task": 8,
    "mem": "32G",
    "time": "24:00:00",  # SLURM format: "D-HH:MM:SS", "HH:MM:SS", "MM:SS" or minutes
    "throttle": 8,  # at most this many array tasks at once (--array=...%8); 0: no limit
    "stop_margin": 600,  # s; train.py's --max-time = time - stop_margin (checkpoint, then requeue)
    "signal_before": 300,  # s; USR1 to the batch shell this long before the limit (SLURM: +-60 s)
    "max_restarts": 50,  # give up requeueing a task after this many restarts
    "python": None,  # None: the interpreter running sweep.py
    "setup": [],  # shell lines run before training, e.g. ["module load cuda", "source .venv/bin/activate"]
    "extra": [],  # more sbatch options, e.g. ["--constraint=a100", "--nice=10"]
}
# default run names: flag -> prefix before its value (paper symbols); other flags appear as flag=value
NAME_PREFIXES = {
    "optimizer": "", "alg-base": "", "alg-meta": "", "stepsize-groups": "", "alpha0": "a", "lr": "lr",
    "gamma": "gamma", "meta-stepsize": "eta", "momentum-param-base": "rho", "normalizer-param-base": "lambda",
    "weight-decay-base": "kappa", "Lion-beta2-base": "c", "momentum-param-meta": "rhobar",
    "normalizer-param-meta": "lambdabar", "weight-decay-meta": "kappabar", "Lion-beta2-meta": "cbar",
}
TOP_LEVEL_KEYS = ("experiment", "name", "save_directory", "fixed", "grid", "configs", "seeds", "run_name", "slurm")
# flags sweep.py passes itself -> where a sweep file sets them instead
SET_BY_SWEEP = {"seed": "use `seeds:`", "run-name": "use `run_name:`", "save-directory": "use `save_directory:`",
                "max-time": "it is slurm.time - slurm.stop_margin", "resume": "every task resumes",
                "start-over": "a task starts over only when it has no checkpoint"}
CHECK_TIMEOUT = 300  # s for importing train.py and checking every run's flags


class SweepError(UsageError):
    """Bad sweep file or flag: printed as one `error: ...` line, exit code 2."""


@dataclass
class Job:
    index: int  # array task id (stable: position in the full job list)
    run_name: str
    seed: int
    flags: dict  # flag name (without --) -> value, in order
    argv: list = field(default_factory=list)  # train.py arguments without the ones sweep.py adds

    def command(self, python: str, train: Path, save_dir: Path) -> list[str]:
        return [python, str(train), *self.argv, "--seed", str(self.seed), "--run-name", self.run_name,
                "--save-directory", str(save_dir), "--resume"]


@dataclass
class Sweep:
    path: Path
    name: str
    experiment: str
    train: Path
    save_dir: Path
    jobs: list
    slurm: dict
    seeds: list


# --------------------------------------------------------------------------------------
# Reading and expanding a sweep file
# --------------------------------------------------------------------------------------


def load_file(path: Path) -> dict:
    """The sweep file as a dict (YAML: .yaml/.yml, TOML: .toml)."""
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SweepError(f"{path}: not valid YAML{where}: {problem}") from None
    elif suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SweepError(f"{path}: not valid TOML: {e}") from None
    else:
        raise SweepError(f"{path}: unknown sweep file type {suffix!r}; accepted: .yaml, .yml, .toml")
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping of {', '.join(TOP_LEVEL_KEYS)} at the top level")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """--set KEY=VALUE (dotted keys, YAML values): `slurm.partition=gpu`, `seeds=[0,1]`."""
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(f"--set {item!r}: expected KEY=VALUE, e.g. slurm.partition=gpu")
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SweepError(f"--set {item!r}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
    return data


def _flag_name(key, where: str) -> str:
    if not isinstance(key, str) or not key.strip("-"):
        raise SweepError(f"{where}: flag names must be text, got {key!r}")
    return key.lstrip("-")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping of flag: value, got {type(value).__name__}")
    return {_flag_name(k, where): v for k, v in value.items()}


def _alternatives(value) -> list:
    return list(value) if isinstance(value, list) else [value]


def _check_scalar(value, where: str):
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value)):
        raise SweepError(f"{where}: values must be numbers, text, true/false or null, got {value!r}")


def expand_grid(grid: dict, where: str) -> list[dict]:
    """Every combination of the grid's values (a list is alternatives), in file order."""
    for key, value in grid.items():
        if isinstance(value, list) and not value:
            raise SweepError(f"{where}.{key}: empty list (give at least one value)")
        for v in _alternatives(value):
            _check_scalar(v, f"{where}.{key}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(_alternatives(grid[k]) for k in keys))]


def _seeds(value, path: Path) -> list[int]:
    if value is None:
        return [0]
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise SweepError(f"{path}: seeds: a count must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise SweepError(f"{path}: seeds: repeated seed in {value}")
        return list(value)
    raise SweepError(f"{path}: seeds must be a list of integers or a count, got {value!r}")


def format_value(value) -> str:
    """A value as it appears on the command line and in run names."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def flag_args(name: str, value, options: set[str] | None = None) -> list[str]:
    """Command-line words for one flag: true -> --name, false -> --no-name (when it exists), null -> none."""
    if value is None:
        return []
    if value is True:
        return [f"--{name}"]
    if value is False:
        return [f"--no-{name}"] if options is not None and f"--no-{name}" in options else []
    if isinstance(value, list):
        return [f"--{name}", *(format_value(v) for v in value)]
    return [f"--{name}", format_value(value)]


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def default_run_name(flags: dict, name_keys: list[str], seed: int) -> str:
    """E.g. "HF_AdamW_Adam_a1e-06_resnet18_blocks_s0": the given flags (short names: NAME_PREFIXES), seed."""
    parts = [f"{NAME_PREFIXES[k]}{format_value(flags[k])}" if k in NAME_PREFIXES else f"{k}={format_value(flags[k])}"
             for k in name_keys if flags.get(k) is not None]
    parts.append(f"s{seed}")
    return _UNSAFE.sub("_", "_".join(parts)).strip("_")


def template_run_name(template: str, flags: dict, seed: int, path: Path) -> str:
    values = {k: format_value(v) for k, v in flags.items()}
    values.update({k.replace("-", "_"): v for k, v in values.items()}, seed=seed)
    try:
        name = template.format_map(values)
    except (KeyError, IndexError, ValueError) as e:
        raise SweepError(f"{path}: run_name {template!r}: field {e} has no value in every run "
                         f"(use flag names or seed; give the flag a value under fixed:)") from None
    name = _UNSAFE.sub("_", name).strip("_")
    if not name or name in (".", ".."):
        raise SweepError(f"{path}: run_name {template!r} gives an empty name")
    return name


def resolve_experiment(experiment, path: Path) -> Path:
    if not isinstance(experiment, str) or not experiment:
        raise SweepError(f"{path}: `experiment` is required: the folder of a train.py, e.g. cifar10")
    candidates = [REPO / experiment / "train.py", Path(experiment), Path(experiment) / "train.py"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    known = sorted(p.parent.name for p in REPO.glob("*/train.py"))
    raise SweepError(f"{path}: experiment {experiment!r} has no train.py; accepted: {', '.join(known)}")


def slurm_seconds(value) -> int:
    """SLURM time ("D-HH:MM:SS", "D-HH:MM", "D-HH", "HH:MM:SS", "MM:SS", minutes) in seconds."""
    return int(duration_seconds(value, bare_unit=60, decimals=False))


def check_slurm(slurm, path: Path) -> dict:
    if slurm is None:
        slurm = {}
    if not isinstance(slurm, dict):
        raise SweepError(f"{path}: slurm must be a mapping, got {type(slurm).__name__}")
    unknown = sorted(set(slurm) - set(SLURM_DEFAULTS))
    if unknown:
        raise SweepError(f"{path}: unknown slurm setting(s) {', '.join(unknown)}; accepted: {', '.join(SLURM_DEFAULTS)}")
    out = {**SLURM_DEFAULTS, **slurm}
    try:
        out["time_s"] = slurm_seconds(out["time"])
    except ValueError:
        raise SweepError(f"{path}: slurm.time {out['time']!r}: use D-HH:MM:SS, HH:MM:SS, MM:SS or minutes") from None
    margin = out["stop_margin"]
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not margin >= 0:
        raise SweepError(f"{path}: slurm.stop_margin must be a number of seconds >= 0, got {margin!r}")
    for key in ("gpus", "cpus_per_task", "throttle", "signal_before", "max_restarts"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 0:
            raise SweepError(f"{path}: slurm.{key} must be a non-negative integer, got {out[key]!r}")
    if out["cpus_per_task"] < 1:
        raise SweepError(f"{path}: slurm.cpus_per_task must be >= 1")
    if out["time_s"] <= out["stop_margin"]:
        raise SweepError(f"{path}: slurm.time ({out['time']}) must be longer than slurm.stop_margin "
                         f"({out['stop_margin']} s): train.py's --max-time is their difference")
    if not 0 < out["signal_before"] < out["time_s"] or out["signal_before"] > 65535:
        raise SweepError(f"{path}: slurm.signal_before must be between 1 and min(slurm.time, 65535) seconds")
    for key in ("setup", "extra"):
        if isinstance(out[key], str):
            out[key] = [out[key]]
        if not isinstance(out[key], list) or not all(isinstance(s, str) for s in out[key]):
            raise SweepError(f"{path}: slurm.{key} must be a list of text lines")
    out["python"] = str(out["python"] or sys.executable)
    return out


def read_sweep(path, overrides: list[str] = ()) -> Sweep:
    """Read, check and expand a sweep file into its jobs (flags not yet checked against train.py)."""
    path = Path(path)
    data = apply_overrides(load_file(path), list(overrides))
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], TOP_LEVEL_KEYS, n=1)
        raise SweepError(f"{path}: unknown key {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; accepted: {', '.join(TOP_LEVEL_KEYS)}")
    train = resolve_experiment(data.get("experiment"), path)
    name = data.get("name") or path.stem
    if not isinstance(name, str) or _UNSAFE.search(name):
        raise SweepError(f"{path}: name {name!r} must be letters, digits, '.', '_', '-' only")
    save_dir = data.get("save_directory") or f"outputs/{name}"
    if not isinstance(save_dir, str):
        raise SweepError(f"{path}: save_directory must be a path, got {save_dir!r}")
    fixed = _mapping(data.get("fixed"), f"{path}: fixed")
    for key, value in fixed.items():
        _check_scalar(value, f"{path}: fixed.{key}")
    grid = _mapping(data.get("grid"), f"{path}: grid")
    if "grid" in data and not grid:  # an empty grid would quietly run the fixed flags alone
        raise SweepError(f"{path}: grid is empty; give it flag: values to sweep, or remove it")
    configs = data.get("configs")
    if configs is None:
        configs = [{}]
    if not isinstance(configs, list) or not configs:
        raise SweepError(f"{path}: configs must be a non-empty list of mappings of flag: value")
    configs = [_mapping(c, f"{path}: configs[{i}]") for i, c in enumerate(configs)]
    sections = [("fixed", fixed), ("grid", grid)] + [(f"configs[{i}]", c) for i, c in enumerate(configs)]
    for key, hint in SET_BY_SWEEP.items():
        for section, flags in sections:
            if key in flags or key.replace("-", "_") in flags:
                raise SweepError(f"{path}: {section}: --{key} is set by sweep.py ({hint})")
    seeds = _seeds(data.get("seeds"), path)
    slurm = check_slurm(data.get("slurm"), path)

    points = []
    for i, config in enumerate(configs):
        both = sorted(set(config) & set(grid))
        if both:
            raise SweepError(f"{path}: configs[{i}] and grid both set {', '.join(both)}; keep it in one of them")
        for sub in expand_grid(config, f"{path}: configs[{i}]"):
            for combo in expand_grid(grid, f"{path}: grid"):
                points.append({**fixed, **sub, **combo})
    # default run names: key=value of the flags whose value differs between the sweep's configurations
    keys = list(dict.fromkeys(k for c in configs for k in c)) + [k for k in grid if not any(k in c for c in configs)]
    name_keys = [k for k in keys if len({format_value(p.get(k)) for p in points}) > 1]
    template = data.get("run_name")
    if template is not None and not isinstance(template, str):
        raise SweepError(f"{path}: run_name must be a text template like \"{{alg-base}}-s{{seed}}\"")
    jobs, seen = [], {}
    for flags in points:
        for seed in seeds:
            run_name = (template_run_name(template, flags, seed, path) if template
                        else default_run_name(flags, name_keys, seed))
            if run_name in seen:
                raise SweepError(f"{path}: runs {seen[run_name]} and {len(jobs)} would share the folder {run_name!r}; "
                                 f"make run_name tell them apart (or remove the duplicate configuration)")
            seen[run_name] = len(jobs)
            jobs.append(Job(index=len(jobs), run_name=run_name, seed=seed, flags=dict(flags)))
    return Sweep(path=path, name=name, experiment=str(data["experiment"]), train=train,
                 save_dir=Path(save_dir), jobs=jobs, slurm=slurm, seeds=seeds)


# --------------------------------------------------------------------------------------
# Checking the flags against the experiment's parser
# --------------------------------------------------------------------------------------

def _read_tagged(proc: subprocess.Popen, tag: str, err, train: Path) -> object:
    for line in proc.stdout:
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    proc.wait()
    err.seek(0)
    tail = ([line for line in err.read().splitlines() if line.strip()] or ["no output"])[-1]
    raise SweepError(f"cannot read the flags of {rel(train)} (python {rel(train)} --help fails: {tail})")


def check_flags(sweep: Sweep) -> None:
    """Fill every job's argv; raise SweepError on an unknown flag or a value train.py rejects."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(CHECKER), str(sweep.train)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=Path.cwd())
        timed_out = threading.Event()
        timer = threading.Timer(CHECK_TIMEOUT, lambda: (timed_out.set(), proc.kill()))
        timer.start()
        try:
            options = set(_read_tagged(proc, "SWEEP-OPTIONS ", err, sweep.train))
            names = list(dict.fromkeys(k for job in sweep.jobs for k in job.flags))
            for name in names:
                if f"--{name}" not in options:
                    close = difflib.get_close_matches(f"--{name.replace('_', '-')}", sorted(options), n=1)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    raise SweepError(f"{sweep.path}: unknown flag --{name} for {rel(sweep.train)}{hint}; "
                                     f"see python {rel(sweep.train)} --help")
            for job in sweep.jobs:
                job.argv = [w for k, v in job.flags.items() for w in flag_args(k, v, options)]
            argvs = [job.argv + ["--seed", str(job.seed), "--run-name", job.run_name] for job in sweep.jobs]
            proc.stdin.write(json.dumps(argvs) + "\n")
            proc.stdin.flush()
            errors = {int(k): v for k, v in _read_tagged(proc, "SWEEP-ERRORS ", err, sweep.train).items()}
        except SweepError:
            if timed_out.is_set():
                raise SweepError(f"reading the flags of {rel(sweep.train)} took more than {CHECK_TIMEOUT} s") from None
            raise
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if errors:
        i = min(errors)
        raise SweepError(f"{sweep.path}: run {i} ({sweep.jobs[i].run_name}): {rel(sweep.train)} rejects its flags: "
                         f"{errors[i].removeprefix('error: ')}")


def rel(path: Path) -> str:
    path = Path(path)
    for base in (Path.cwd(), REPO):
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            pass
    return str(path)


# --------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------


def run_finished(run_dir: Path) -> bool:
    """A run is complete when its folder has summary.json with "finished": true (docs/CONTRACTS.md)."""
    return runfolder.is_finished(run_dir)


def run_status(run_dir: Path) -> str:
    """finished, diverged, checkpoint or new (common/runfolder.py)."""
    return runfolder.run_state(run_dir)


# --------------------------------------------------------------------------------------
# The sbatch script
# --------------------------------------------------------------------------------------


def array_spec(indices: list[int], throttle: int = 0) -> str:
    """[0,1,2,5,7,8] -> "0-2,5,7-8" (plus "%throttle")."""
    parts, start = [], None
    for i, idx in enumerate(indices):
        if start is None:
            start = idx
        if i + 1 == len(indices) or indices[i + 1] != idx + 1:
            parts.append(str(start) if start == idx else f"{start}-{idx}")
            start = None
    spec = ",".join(parts)
    return f"{spec}%{throttle}" if throttle else spec


def sbatch_script(sweep: Sweep, jobs: list[Job], source: str = "") -> str:
    """The text of one sbatch script running `jobs` as a job array (task id = job index): the
    template scripts/sweep_job.sh with its @FIELD@s filled in."""
    s = sweep.slurm
    save_dir = sweep.save_dir.resolve()
    logs = save_dir / "logs"
    q = shlex.quote
    max_time = f"{s['time_s'] - s['stop_margin']:.3f}".rstrip("0").rstrip(".")  # seconds
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    header = [
        f"# Sweep {sweep.name!r} ({sweep.experiment}): written by scripts/sweep.py from {source or sweep.path} on {now}.",
        f"# {len(sweep.jobs)} runs; this job array runs the {len(jobs)} unfinished ones (task id = run index).",
        "# Resubmit with the same `sweep.py submit` command: finished runs are skipped.",
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --array={array_spec([j.index for j in jobs], s['throttle'])}",
    ]
    header += [f"#SBATCH --{key}={s[key]}" for key in ("partition", "account", "qos") if s[key]]
    if s["gpus"]:
        header.append(f"#SBATCH --gres=gpu:{s['gpus']}")
    header += [
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={s['cpus_per_task']}",
        f"#SBATCH --mem={s['mem']}",
        f"#SBATCH --time={s['time']}",
        f"#SBATCH --output={logs}/slurm_%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{s['signal_before']}",
        f"#SBATCH --chdir={Path.cwd()}",
        *(f"#SBATCH {opt}" for opt in s["extra"]),
    ]
    runs = [f"  {job.index}) RUN_NAME={q(job.run_name)}; SEED={job.seed}; "
            f"ARGS=({' '.join(q(w) for w in job.argv)}) ;;" for job in jobs]
    lines = {"@HEADER@": header, "@RUNS@": runs, "@SETUP@": list(s["setup"])}
    fields = {"@SAVE_DIR@": q(str(save_dir)), "@TRAIN@": q(str(sweep.train)), "@PYTHON@": q(s["python"]),
              "@RUN_STATE@": q(str(REPO / "common" / "runfolder.py")), "@MAX_TIME@": max_time,
              "@MAX_RESTARTS@": str(s["max_restarts"]), "@TIME@": str(s["time"]), "@STOP_MARGIN@": str(s["stop_margin"])}
    template = JOB_TEMPLATE.read_text().splitlines()
    top = next(i for i, line in enumerate(template) if "@HEADER@" in line)  # above: the template's own notes
    out = [template[0]]
    for line in template[top:]:
        marker = next((m for m in lines if m in line), None)
        if marker:
            out += lines[marker]
            continue
        for name, value in fields.items():
            line = line.replace(name, value)
        out.append(line)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def prepare(path: str, overrides: list[str]) -> Sweep:
    sweep = read_sweep(path, overrides)
    print(f"sweep {sweep.name}: checking {len(sweep.jobs)} runs against {rel(sweep.train)} ...", file=sys.stderr)
    check_flags(sweep)
    return sweep


ENDED = ("finished", "diverged")  # nothing left to run in these folders


def pending_jobs(sweep: Sweep) -> list[Job]:
    """The runs still to do: not finished, not diverged (rerunning a diverged run would diverge again)."""
    return [job for job in sweep.jobs if run_status(sweep.save_dir / job.run_name) not in ENDED]


def cmd_print(sweep: Sweep, args) -> int:
    todo = pending_jobs(sweep)
    print(f"# sweep {sweep.name} ({rel(sweep.train)}): {len(sweep.jobs)} runs, "
          f"{len(sweep.jobs) - len(todo)} finished or diverged, {len(todo)} to run; save directory {sweep.save_dir}")
    python = shlex.quote(Path(sweep.slurm["python"]).name)
    for job in sweep.jobs:
        status = run_status(sweep.save_dir / job.run_name)
        words = job.command(python, Path(rel(sweep.train)), sweep.save_dir)
        line = " ".join([words[0]] + [shlex.quote(w) for w in words[1:]])
        print(f"# [{job.index}] {job.run_name} ({status})")
        print(f"# {line}" if status in ENDED else line)
    return 0


def write_script(sweep: Sweep, out: str | None) -> tuple[Path | None, list[Job]]:
    todo = pending_jobs(sweep)
    done = len(sweep.jobs) - len(todo)
    print(f"sweep {sweep.name}: {len(sweep.jobs)} runs, {done} finished or diverged (skipped), {len(todo)} to run",
          file=sys.stderr)
    if not todo:
        return None, todo
    path = Path(out) if out else sweep.save_dir / f"{sweep.name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    (sweep.save_dir / "logs").mkdir(parents=True, exist_ok=True)
    path.write_text(sbatch_script(sweep, todo, rel(sweep.path)))
    return path, todo


def cmd_write(sweep: Sweep, args) -> int:
    path, _ = write_script(sweep, args.out)
    if path is None:
        print("nothing to write: every run has finished or diverged")
        return 0
    print(path)
    return 0


def queued_jobs(name: str) -> list[str]:
    proc = subprocess.run(["squeue", "-h", "--me", "-n", name, "-o", "%i"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError(f"squeue failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout.split()


def cmd_submit(sweep: Sweep, args) -> int:
    if shutil.which("sbatch") is None:
        raise SweepError("sbatch not found: submit on a SLURM login node (or use `write` and copy the script)")
    if not args.force:
        queued = queued_jobs(sweep.name)
        if queued:
            raise SweepError(f"jobs of sweep {sweep.name} are still queued or running ({' '.join(queued[:5])}); "
                             f"resubmit when they are done, or pass --force")
    path, todo = write_script(sweep, args.out)
    if path is None:
        print("nothing to submit: every run has finished or diverged")
        return 0
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError(f"sbatch {path} failed: {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job array {job_id} ({len(todo)} tasks) from {path}", file=sys.stderr)
    print(job_id)
    return 0


def main(argv=None) -> int:
    parser = ArgParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("command", choices=("print", "write", "submit"),
                        help="print: runs and commands; write: the sbatch script; submit: write + sbatch")
    parser.add_argument("sweep_file", help="YAML or TOML sweep file (see scripts/sweeps/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the file, e.g. slurm.partition=gpu, fixed.data-dir=/data, seeds=[0]")
    parser.add_argument("--out", help="where write/submit puts the sbatch script (default: <save_directory>/<name>.sbatch)")
    parser.add_argument("--force", action="store_true", help="submit even if jobs of this sweep are still queued")
    args = parser.parse_args(argv)
    try:
        sweep = prepare(args.sweep_file, args.overrides)
        return {"print": cmd_print, "write": cmd_write, "submit": cmd_submit}[args.command](sweep, args)
    except SweepError as e:
        print(error_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `sweep.py print ... | head`
        sys.stderr.close()
        sys.exit(0)
