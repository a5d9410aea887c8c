"""A run holds its folder, not its path (issue 28 item 2): `runfolder.RunFolder` keeps the claimed
folder open, checks it against the path before each write and writes through it. In-process, fast;
tests/test_run_safety.py holds the same end to end (a run whose folder is replaced)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from common import runfolder
from common.runfolder import RunFolder, RunFolderError


@pytest.fixture
def claimed(tmp_path):
    folder = RunFolder(tmp_path / "out" / "r")
    folder.claim(resume=False, start_over=False)
    yield folder
    folder.release()


def test_a_folder_deleted_and_made_again_is_caught_even_where_its_inode_number_comes_back(claimed, monkeypatch):
    path = claimed.path
    claimed.write_json(runfolder.CONFIG, {"a": 1})
    before = os.stat(path)
    shutil.rmtree(path)  # deleted while the run holds it; a new run of the same name makes a new one
    path.mkdir()
    with pytest.raises(RunFolderError, match="was deleted or replaced"):
        claimed.check()
    # ext4 hands a freed inode number straight back (a stat of the path then looks the same): the
    # held folder has no links left, whatever the path's stat says
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: before if os.fspath(p) == str(path) else real_stat(p, *a, **k))
    with pytest.raises(RunFolderError, match="was deleted or replaced"):
        claimed.write_json(runfolder.SUMMARY, {"finished": True})
    monkeypatch.undo()
    assert list(path.iterdir()) == [] and claimed.lost
    claimed.release()
    assert path.is_dir()  # a lost folder's path is another run's: nothing removed there


def test_writes_go_into_the_held_folder_whatever_the_path_names_now(claimed, tmp_path):
    moved = tmp_path / "moved"
    claimed.path.rename(moved)
    claimed.path.mkdir()  # another run's folder now
    runfolder.atomic_write(claimed.path / "x.json", lambda f: f.write(b"{}"), dir_fd=claimed.fd)
    assert (moved / "x.json").read_bytes() == b"{}" and list(claimed.path.iterdir()) == []
    with pytest.raises(RunFolderError, match="was deleted or replaced"):
        claimed.open_append(runfolder.METRICS)
    assert not (claimed.path / runfolder.METRICS).exists()


def test_files_of_the_held_folder_and_release(claimed):
    claimed.write_json(runfolder.CONFIG, {"a": 1})
    with claimed.open_append(runfolder.METRICS) as f:
        f.write('{"step": 1}\n{"step": 2}\n')
    claimed.truncate(runfolder.METRICS, 12)
    claimed.truncate("missing.jsonl", 0)  # nothing to cut
    assert json.loads((claimed.path / runfolder.CONFIG).read_text()) == {"a": 1}
    assert (claimed.path / runfolder.METRICS).read_text() == '{"step": 1}\n'
    for name in (runfolder.CONFIG, runfolder.METRICS):
        (claimed.path / name).unlink()
    claimed.release()
    assert not claimed.path.parent.exists()  # the folders it made, empty again, are gone
    claimed.release()  # twice is fine
