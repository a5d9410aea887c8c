"""What a run writes as it goes (rank 0): config.json (written here only), metrics.jsonl (one line
per log) and the wandb run. Nothing is written until `open`, so a run that fails on bad input first
leaves nothing behind. Takes values; common/harness.py's `Run` holds one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import secrets
import string
import sys

import numpy as np
import torch

from common import runfolder
from common.runfolder import CONFIG, METRICS, WANDB_ID, RunFolderError

__all__ = ["MetricLog", "flags_record", "plain", "run_config", "to_python"]


def to_python(value):
    """A one-element tensor or a numpy number as a Python number; other tensors and arrays as lists."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def plain(value):
    """`value` with the tensors and numpy numbers inside its dicts, lists and tuples as Python values."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return to_python(value)


def flags_record(flags: dict) -> dict:
    """The run's flags (argparse dest -> value) as config.json and wandb record them."""
    return {k: to_python(v) for k, v in flags.items()}


def run_config(flags: dict, experiment: str) -> dict:
    """config.json of a run's first start: its flags, the experiment, the command line and the start time."""
    return {**flags_record(flags), "experiment": experiment, "command": list(sys.argv),
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


class MetricLog:
    """`folder`: the run folder (a runfolder.RunFolder: writes go to the folder the run holds);
    `wandb`: None, or dict(project=, entity=, name=, config=) for wandb.init."""

    def __init__(self, folder: runfolder.RunFolder, wandb: dict | None = None):
        self.folder, self._wandb_settings = folder, wandb
        self._file = None
        self.wandb = None  # the wandb run once open

    def open(self, config: dict | None) -> None:
        """config.json from `config` (None: keep the one there), metrics.jsonl for appending, wandb."""
        if config is not None:
            self.write_config(config)
        self._file = self.folder.open_append(METRICS)
        if self._wandb_settings is not None:
            self._init_wandb(**self._wandb_settings)

    def write_config(self, config: dict) -> None:
        self.folder.write_json(CONFIG, config)

    def _init_wandb(self, project, entity, name, config):
        import wandb  # optional: only with --wandb

        id_file = self.folder.path / WANDB_ID
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            self.folder.write(WANDB_ID, lambda f: f.write(run_id.encode()))
        self.wandb = wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow", config=config,
                                dir=str(self.folder.path))
        # our own step as the x axis: after a resume the steps between the checkpoint and the
        # interruption are logged again, which wandb's monotonic internal step would drop
        self.wandb.define_metric("step")
        self.wandb.define_metric("*", step_metric="step")

    def write(self, record: dict) -> None:
        """One line in metrics.jsonl, one wandb.log."""
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise RunFolderError(runfolder.describe_os_error(e, self.folder.path / METRICS)) from None
        if self.wandb is not None:
            self.wandb.log(record)

    def offset(self) -> int:
        """The length of metrics.jsonl written so far (0 before `open`)."""
        if self._file is None:
            return 0
        self._file.flush()
        return self._file.tell()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
