"""What a wandb offline run recorded: the history rows and the summary of `run-<id>.wandb` files.

    rows, summary = wandb_history(run_dir / "wandb")   # every offline run of the folder, oldest first

A `.wandb` file is wandb's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0),
then records in 32 KiB blocks, each with a 7-byte header (CRC-32 of type + data, length, type:
full, first, middle, last), as LevelDB's log format. Each record is a `wandb_internal_pb2.Record`
(protobuf, from the wandb package). wandb 0.31 reads these files only in its Go core, so the tests
read them here.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """The protobuf records of one .wandb file, in order (each checksum checked)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (path, ident, magic, version)
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # no room for a header: the rest of the block is padding
            pos += BLOCK - pos % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if (checksum, length, kind) == (0, 0, 0):  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, (path, pos)
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _items(items) -> dict:
    return {"/".join(item.nested_key) if item.nested_key else item.key: json.loads(item.value_json) for item in items}


def wandb_history(wandb_dir: Path) -> tuple[list[dict], dict]:
    """(history rows of every offline run under `wandb_dir`, oldest run first, without wandb's own
    `_step`, `_runtime`, `_timestamp` keys; the summary the last run ended with)."""
    runs = sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    rows, summary = [], {}
    for path in runs:
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({k: v for k, v in _items(record.history.item).items() if not k.startswith("_")})
            elif kind == "summary":
                summary.update(_items(record.summary.update))
    return rows, summary


def assert_wandb_matches_metrics(run_dir: Path, runs: int | None = None) -> tuple[list[dict], dict]:
    """Every line of metrics.jsonl is a wandb history row with the same keys and values (in order,
    over the offline runs of every segment of a resumed run), and the wandb summary holds
    summary.json's final and best values. `runs`: the number of offline runs expected."""
    run_dir = Path(run_dir)
    if runs is not None:
        assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == runs
    rows, summary = wandb_history(run_dir / "wandb")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines), (len(rows), len(lines))
    for i, (row, line) in enumerate(zip(rows, lines)):
        assert row == line, (i, row, line)
    done = json.loads((run_dir / "summary.json").read_text())
    for key, value in (done.get("final") or {}).items():
        assert summary[key] == value, key
    for key, value in (done.get("best") or {}).items():
        assert summary[f"best/{key}"] == value, key
    return rows, summary
