"""Runs never lose or corrupt results (issue 18): the run-folder lock, resume without a checkpoint,
divergence, non-finite flags, file-system faults (read-only, not a folder, full disk, stale temp
files, permissions), SIGINT, and the shared stdlib modules (common/cli.py, common/runfolder.py).

Mostly on tests/toy_train.py (a linear model on the real harness: a subprocess starts in ~3 s);
the cifar10/train.py cases run the real ResNet-18 on a generated CIFAR-10 of 20 images.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checks import child_env as env  # noqa: E402
from cifar_fixtures import load_cifar10_train, write_fake_cifar10  # noqa: E402

from common import cli, harness, runfolder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "toy_train.py"
CIFAR = REPO / "cifar10" / "train.py"


def toy(out, name, *args, wait=True, **env_extra):
    cmd = [sys.executable, str(TOY), "--save-directory", str(out), "--run-name", name, *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**env_extra))
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def wait_ready(proc):
    line = proc.stdout.readline()  # "ready at step N": the folder is locked and the loop runs
    assert line.startswith("ready"), (line, proc.stderr.read() if proc.poll() is not None else "")


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line]


def one_error(proc, code, needle):
    lines = error_lines(proc.stderr)
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
        (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    return lines[0]


def read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro=False) -> a fresh tmpfs folder (root only; None where mounting is not allowed)."""
    mounted = []

    def mount(size="4m", ro=False):
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True).returncode:
            return None
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(scope="module")
def cifar_data(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"), n_train=20, n_test=10)


@pytest.fixture(scope="module")
def cifar_mod():
    return load_cifar10_train("cifar10_train_safety")


@pytest.fixture(autouse=True)
def _restore_signals_and_threads():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    harness._close_runs()
    for s, h in old.items():
        signal.signal(s, h)


def cifar_argv(data, out, *extra):
    return ["--data-dir", str(data), "--save-directory", str(out), "--batch-size", "10", "--eval-batch-size", "10",
            "--num-epochs", "1", "--device", "cpu", "--log-every", "1", *map(str, extra)]


# ---- one writer per run folder ------------------------------------------------------------


def test_second_process_on_a_locked_folder_fails_at_once_naming_the_holder(tmp_path):
    holder = toy(tmp_path, "r", "--steps", 100000, "--sleep", 0.01, wait=False)
    try:
        wait_ready(holder)
        second = toy(tmp_path, "r", "--resume")
        one_error(second, 1, f"run folder {tmp_path / 'r'} is in use by pid {holder.pid} on ")
    finally:
        holder.send_signal(signal.SIGTERM)
        _, stderr = holder.communicate(timeout=120)
    assert holder.returncode == 0 and "stopped (SIGTERM)" in stderr
    steps = [r["step"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no lines of the second process
    # a holder killed outright leaves its lock file, not its lock: the next run takes the folder
    holder = toy(tmp_path, "r", "--steps", 100000, "--sleep", 0.01, "--resume", wait=False)
    wait_ready(holder)
    holder.kill()
    holder.wait()
    assert (tmp_path / "r" / ".lock").exists()
    done = toy(tmp_path, "r", "--resume", "--steps", 30)
    assert done.returncode == 0, done.stderr
    assert runfolder.run_state(tmp_path / "r") == "finished" and not (tmp_path / "r" / ".lock").exists()


def test_a_requeued_slurm_task_waits_for_its_own_earlier_attempt(tmp_path):
    slurm = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "78"}
    gate = tmp_path / "gate"  # the first attempt holds the folder until the test creates this file
    first = toy(tmp_path, "r", "--steps", 5, "--hold-until", gate, wait=False, **slurm)
    again = None
    try:
        wait_ready(first)
        other = toy(tmp_path, "r", "--resume", "--steps", 5, SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="4")
        one_error(other, 1, "(SLURM job 77_3), since ")  # another task of the array: refused at once
        again = toy(tmp_path, "r", "--resume", "--steps", 5, wait=False, **slurm)  # the same task, requeued
        note = again.stderr.readline()
        assert note.startswith("note: waiting up to") and "(SLURM job 77_3)" in note, note
        gate.touch()  # the first attempt finishes and lets go: the requeued one goes on
        assert first.wait(timeout=300) == 0
        _, stderr = again.communicate(timeout=300)
        assert again.returncode == 0, stderr
    finally:
        for proc in (first, again):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert runfolder.run_state(tmp_path / "r") == "finished"


def test_lock_in_process_and_unused_folder_removed(tmp_path):
    parser = harness.ArgParser()
    harness.add_run_args(parser)
    args = parser.parse_args(["--save-directory", str(tmp_path / "a" / "b"), "--run-name", "r", "--device", "cpu"])
    run = harness.start_run(args, "x")
    holder = json.loads((run.dir / ".lock").read_text())
    assert holder["pid"] == os.getpid() and "since" in holder
    run.close()  # failed before writing anything: the folders it made are gone again
    assert not (tmp_path / "a").exists()


# ---- resume never destroys results ----------------------------------------------------------


def test_resume_of_a_finished_run_without_checkpoint_keeps_everything(cifar_mod, cifar_data, tmp_path):
    argv = cifar_argv(cifar_data, tmp_path, "--run-name", "r")
    assert cifar_mod.main(argv) == 0
    run_dir = tmp_path / "r"
    (run_dir / "checkpoint.pt").unlink()  # a common way to free disk
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(harness.UsageError, match="no checkpoint.pt to continue from but holds results"):
        cifar_mod.main([*argv, "--resume"])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert cifar_mod.main([*argv, "--resume", "--start-over"]) == 0  # asked for explicitly
    assert runfolder.is_finished(run_dir) and (run_dir / "checkpoint.pt").exists()


def folder_bytes(run_dir):
    return {p.name: p.read_bytes() for p in Path(run_dir).iterdir()}


def stopped_toy(out, name, step, *args):
    p = toy(out, name, "--steps", 100, "--stop-at-step", step, *args)
    assert p.returncode == 0 and "stopped (SIGTERM)" in p.stderr, p.stderr
    return Path(out) / name


def test_resume_refuses_a_checkpoint_of_another_run_and_changes_nothing(tmp_path):
    run_dir = stopped_toy(tmp_path / "a", "r", 9)
    other_seed = stopped_toy(tmp_path / "b", "r", 2, "--seed", 1)  # the same flags but the seed
    other_name = stopped_toy(tmp_path / "c", "s", 2)  # the same flags, another run
    for foreign, needle in ((other_seed, "belongs to another configuration than"),
                            (other_name, "belongs to the run 's', not 'r'")):
        (run_dir / "checkpoint.pt").write_bytes((foreign / "checkpoint.pt").read_bytes())
        before = folder_bytes(run_dir)
        p = toy(tmp_path / "a", "r", "--steps", 12, "--resume")
        one_error(p, 2, needle)
        assert folder_bytes(run_dir) == before  # metrics, config, checkpoint as they were


def test_resume_cuts_metrics_only_at_a_line_boundary(tmp_path):
    run_dir = stopped_toy(tmp_path, "r", 4)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0].replace("{", '{"padding": 1234567, ', 1) + "".join(lines[1:]))
    before = folder_bytes(run_dir)
    p = toy(tmp_path, "r", "--steps", 6, "--resume")
    one_error(p, 2, "falls inside a line); nothing was changed")
    assert folder_bytes(run_dir) == before


def test_resume_accepts_an_old_checkpoint_without_its_identity(tmp_path):
    run_dir = stopped_toy(tmp_path, "r", 4)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for key in ("run_name", "config_hash"):
        del ckpt["harness"][key]
    torch.save(ckpt, run_dir / "checkpoint.pt")
    p = toy(tmp_path, "r", "--steps", 6, "--resume")
    assert p.returncode == 0 and "ready at step 4" in p.stdout, p.stderr
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 7))


# ---- divergence ---------------------------------------------------------------------------


def test_divergence_stops_keeps_the_last_finite_checkpoint_and_says_so(tmp_path):
    p = toy(tmp_path, "nan", "--steps", 40, "--nan-at", 13, "--log-every", 5, "--checkpoint-every", 10)
    line = one_error(p, harness.EXIT_DIVERGED, "diverged at step 15: a weight is not finite")
    assert "the checkpoint of step 10 (the last finite state) is kept" in line  # checked at logs only
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["finished"] is False and summary["diverged"] is True
    assert (summary["diverged_at_step"], summary["checkpoint_step"]) == (15, 10)
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert max(r["step"] for r in read_jsonl(tmp_path / "nan" / "metrics.jsonl")) == 10  # no non-finite line
    assert runfolder.run_state(tmp_path / "nan") == "diverged"
    again = toy(tmp_path, "nan", "--steps", 40, "--resume")  # nothing to resume: said, not retrained
    one_error(again, harness.EXIT_DIVERGED, "diverged at step 15 (see its summary.json); nothing to resume")
    assert json.loads((tmp_path / "nan" / "summary.json").read_text()) == summary


def test_divergence_of_the_step_sizes_and_of_a_logged_loss(tmp_path):
    parser = harness.ArgParser()
    harness.add_run_args(parser)
    args = parser.parse_args(["--save-directory", str(tmp_path), "--run-name", "r", "--device", "cpu",
                              "--log-every", "1"])
    run = harness.start_run(args, "x")
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.resume(model, optimizer)
    run.log_step(optimizer, 1, {"train/loss": 1.0})
    optimizer.param_groups[0]["lr"] = float("inf")
    with pytest.raises(harness.Diverged, match="at step 2: the step size of block 0 is inf"):
        run.log_step(optimizer, 2)
    run = harness.start_run(harness.check_args(parser.parse_args(
        ["--save-directory", str(tmp_path), "--run-name", "s", "--device", "cpu"])), "x")
    run.log({"test/acc": float("nan")}, 1)  # an accuracy is not watched; a loss is
    with pytest.raises(harness.Diverged, match="at step 2: test/loss is nan"):
        run.log({"test/loss": float("nan")}, 2)
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["checkpoint_step"] is None


def test_cifar10_nan_run_is_diverged_not_finished(cifar_data, tmp_path):
    p = subprocess.run([sys.executable, str(CIFAR), *cifar_argv(cifar_data, tmp_path, "--run-name", "nan"),
                        "--alg-base", "SGD", "--alg-meta", "fixed", "--alpha0", "1e30"],
                       capture_output=True, text=True, env=env(), timeout=300)
    one_error(p, 3, "diverged at step ")
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["diverged"] is True and summary["finished"] is False and "best test acc" not in p.stdout


def _write_run(root, name, seed, acc, summary):
    run = root / name
    run.mkdir(parents=True)
    config = {"experiment": "cifar10", "optimizer": "HF", "alg_meta": "SGD", "alpha0": 1e-3, "seed": seed,
              "run_name": name}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": 10 * e, "time": e, "epoch": e, "test/acc": a,
                                                           "train/loss": 1.0 / e}) + "\n"
                                               for e, a in enumerate(acc, 1)))
    (run / "summary.json").write_text(json.dumps(summary))


def test_summarize_and_plot_show_a_diverged_seed(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import plot
    import summarize

    root = tmp_path / "runs"
    _write_run(root, "s0", 0, [50, 60], {"finished": True})
    _write_run(root, "s1", 1, [52, 64], {"finished": True})
    _write_run(root, "s2", 2, [51, 90], {"finished": False, "diverged": True, "diverged_at_step": 15})
    _, rows, _ = summarize.summarize(summarize.load_runs([root]), ["test/acc"])
    (row,) = rows
    assert (row["runs"], row["finished"], row["diverged"]) == (3, 2, 1)
    assert row["final test/acc"][0] == pytest.approx(62) and row["final test/acc"][2] == 2  # not 71.3 over 3
    assert summarize.main([str(root), "--metrics", "test/acc"]) == 0
    out = capsys.readouterr().out
    assert "3 runs, 1 configurations; mean ± std over seeds; 1 diverged (left out of the statistics)" in out
    assert "| 3 (2; 1 diverged) | 62.00 ± 2.83 (n=2; 1 diverged) |" in out
    # a run from before the harness checked: a non-finite loss in its metrics is a divergence too
    with open(root / "s1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "time": 3, "train/loss": float("nan")}) + "\n")
    _, rows, _ = summarize.summarize(summarize.load_runs([root]), ["test/acc"])
    assert rows[0]["diverged"] == 2 and rows[0]["final test/acc"][2] == 1
    assert plot.main([str(root), "--out", str(tmp_path / "figs"), "--formats", "png"]) == 0
    data = json.loads((tmp_path / "figs" / "plot_data.json").read_text())
    series = data["cifar10_test_acc"]["series"]
    assert series[0]["label"].endswith("(2/3 diverged)") and series[0]["runs"] == [str(root / "s0")]
    assert sum(1 for s in series if s.get("diverged")) == 2  # each diverged run drawn on its own
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert plot.main([str(root), "--out", str(tmp_path / "afile" / "figs"), "--formats", "png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {tmp_path / 'afile' / 'figs'}: cannot write figures there (Not a directory)"], err


# ---- non-finite and negative flag values ----------------------------------------------------


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["--meta-stepsize", "inf"], "argument --meta-stepsize: must be a finite number, got inf"),
    (["--weight-decay-base", "nan"], "argument --weight-decay-base: must be a finite number, got nan"),
    (["--weight-decay-base", "inf"], "argument --weight-decay-base: must be a finite number"),
    (["--gamma", "nan"], "argument --gamma: must be a finite number"),
    (["--alpha0", "-inf"], "argument --alpha0: must be a finite number"),
    (["--dog-lr", "nan"], "argument --dog-lr: must be a finite number"),
    (["--prodigy-growth-rate", "nan"], "argument --prodigy-growth-rate: must be a finite number"),
])
def test_non_finite_flag_values_are_refused(cifar_mod, flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cifar_mod.parse_args(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_negative_and_infinite_values_that_mean_something(cifar_mod):
    with pytest.raises(ValueError, match=r"--alpha0 must be a finite number in \(0.0, inf\), got -0.001"):
        cifar_mod.parse_args(["--alpha0", "-1e-3"])  # a value, not an unknown option
    assert cifar_mod.parse_args(["--prodigy-growth-rate", "inf"]).prodigy_growth_rate == math.inf  # the default
    assert cifar_mod.parse_args(["--Lion-beta2-base", "-1", "--gamma", "1e-0"]).Lion_beta2_base == -1


def test_non_finite_meta_flags_end_to_end(cifar_data, tmp_path):
    cases = ((["--meta-stepsize", "inf"], "--meta-stepsize"), (["--weight-decay-base", "nan"], "--weight-decay-base"),
             (["--alpha0", "-1e-3"], "--alpha0 must be a finite number in (0.0, inf), got -0.001"))
    procs = [subprocess.Popen([sys.executable, str(CIFAR), *cifar_argv(cifar_data, tmp_path), *flags], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env()) for flags, _ in cases]
    for proc, (_, needle) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=300)
        one_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 2, needle)
    assert not any(tmp_path.iterdir())


def test_optimizer_rejects_non_finite_hyperparameters_itself():
    import argparse

    from common.optim_flags import add_optimizer_args, check_optimizer_args

    args = add_optimizer_args(argparse.ArgumentParser()).parse_args([])  # not the harness parser
    args.meta_stepsize = math.inf
    with pytest.raises(ValueError, match="--meta-stepsize"):
        check_optimizer_args(args)


@pytest.mark.slow
def test_huge_lion_meta_step_is_a_divergence_not_a_crash(cifar_data, tmp_path):
    p = subprocess.run([sys.executable, str(CIFAR), *cifar_argv(cifar_data, tmp_path, "--run-name", "lion"),
                        "--alg-meta", "Lion", "--meta-stepsize", "100", "--num-epochs", "3", "--log-every", "100"],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.returncode in (0, 3)


# ---- file-system faults -----------------------------------------------------------------------


def test_unusable_save_directory_is_one_line_before_any_data_work(tmp_path, tmpfs):
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file", "a part of the path is a file"), (tmp_path / "file" / "sub", "is a file")]
    ro = tmpfs("1m", ro=True)
    if ro is not None:
        cases.append((ro, "read-only file system"))
    elif os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases.append((locked, "permission denied"))
    # the last case through cifar10/train.py, whose --data-dir does not exist: the save directory goes first
    procs = [toy(save_dir, "r", wait=False) for save_dir, _ in cases[:-1]]
    procs.append(subprocess.Popen([sys.executable, str(CIFAR), *cifar_argv(tmp_path / "no-data", cases[-1][0])],
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env()))
    for proc, (save_dir, needle) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=300)
        line = one_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 2,
                         f"error: --save-directory {save_dir}: cannot write ")
        assert needle in line, line
    assert not (tmp_path / "no-data").exists()


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(cifar_mod, cifar_data, tmpfs, monkeypatch, capsys):
    disk = tmpfs("8m")  # config and metrics fit, a ResNet-18 checkpoint (180 MB) does not
    if disk is None:  # no mount here: the same error as the kernel's, from the writer
        disk = Path(str(cifar_data) + "-out-" + uuid.uuid4().hex[:6])

        def no_space(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(SystemExit) as e:
        harness.run_main(lambda: cifar_mod.main(cifar_argv(cifar_data, disk, "--run-name", "r")))
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert e.value.code == 1 and err == [f"error: cannot write {disk / 'r' / 'checkpoint.pt'}: no space left on "
                                         f"device (the disk is full)"], err
    assert sorted(p.name for p in (disk / "r").iterdir()) == ["config.json", "metrics.jsonl"]  # no temp file, no lock


def test_stale_temp_files_go_and_files_follow_the_umask(tmp_path):
    assert toy(tmp_path, "r", "--steps", 10).returncode == 0
    stale = tmp_path / "r" / ".checkpoint.pt.0a1b2c3d.tmp"  # what a SIGKILL during a checkpoint leaves
    stale.write_bytes(b"\0" * 100_000)
    other = tmp_path / "r" / "notes.tmp"  # not ours: kept
    other.write_text("mine")
    old = os.umask(0o027)
    try:
        assert toy(tmp_path, "r", "--steps", 20, "--resume").returncode == 0
    finally:
        os.umask(old)
    assert not stale.exists() and other.exists()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "r").iterdir() if p.name != "notes.tmp"}
    # config.json is written again by the resume: it records the changed --steps
    assert modes == {"checkpoint.pt": 0o640, "config.json": 0o640, "metrics.jsonl": 0o644, "summary.json": 0o640}
    assert [c["flag"] for c in json.loads((tmp_path / "r" / "config.json").read_text())["changes"]] == ["--steps"]


# ---- signals ----------------------------------------------------------------------------------


def test_sigint_saves_like_sigterm_and_a_second_one_aborts(tmp_path):
    p = toy(tmp_path, "r", "--steps", 100000, "--sleep", 0.01, wait=False)
    wait_ready(p)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and "stopped (SIGINT) at step " in stderr and "plus --resume" in stderr, stderr
    step = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"]
    assert step == read_jsonl(tmp_path / "r" / "metrics.jsonl")[-1]["step"] > 0
    p = toy(tmp_path, "r", "--steps", 100000, "--sleep", 3, "--resume", wait=False)
    wait_ready(p)
    time.sleep(1.0)  # inside the first step's 3 s sleep
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)  # before the loop reached a step boundary: stop at once
    _, stderr = p.communicate(timeout=120)
    assert p.returncode != 0 and "KeyboardInterrupt" in stderr
    assert not (tmp_path / "r" / ".lock").exists()  # the lock went with the process
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] >= step


# ---- the shared stdlib modules ----------------------------------------------------------------


def test_stdlib_modules_import_without_torch():
    code = ("import sys; sys.path.insert(0, 'scripts'); import summarize, sweep, plot; "
            "from common import cli, runfolder; assert 'torch' not in sys.modules, 'torch imported'")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("text, bare, seconds", [
    ("90", 1, 90), ("90", 60, 5400), ("05:30", 1, 330), ("1:00:00", 1, 3600), ("2-03:04:05", 60, 183845),
    ("1-12", 1, 129600), ("1-00:30", 1, 88200), ("0:00:01.5", 1, 1.5),
])
def test_one_duration_parser(text, bare, seconds):
    assert cli.duration_seconds(text, bare_unit=bare) == seconds


def test_check_number_for_the_lead():
    assert cli.check_number("0.5", "--gamma", low=0, high=1) == 0.5
    assert cli.require_finite(3, "meta_stepsize") == 3.0
    for value, needle in ((math.inf, "--meta-stepsize must be a finite number"), ("x", "must be a number"),
                          (math.nan, "finite")):
        with pytest.raises(ValueError, match=needle):
            cli.require_finite(value, "meta_stepsize")
    with pytest.raises(ValueError, match=r"--gamma must be in \[0, 1\], got 1.5"):
        cli.check_number(1.5, "gamma", low=0, high=1)
    assert cli.check_number(math.inf, "--growth", low=1, allow_inf=True) == math.inf


def test_run_folder_state_command(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    state = lambda: subprocess.run([sys.executable, str(REPO / "common" / "runfolder.py"), "state", str(run)],  # noqa: E731
                                   capture_output=True, text=True, timeout=60).stdout.strip()
    assert state() == "new"
    (run / "checkpoint.pt").write_bytes(b"x")
    assert state() == "checkpoint"
    (run / "summary.json").write_text('{"finished": false, "diverged": true}')
    assert state() == "diverged"
    (run / "summary.json").write_text('{"finished": true}')
    assert state() == "finished"
    (run / "summary.json").write_text("{broken")  # being written: not an end yet
    assert state() == "checkpoint"


def test_step_size_figures_leave_diverged_runs_out_and_say_so(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import plot

    root = tmp_path / "runs"
    for name, seed, sizes, summary in (("s0", 0, [1e-3, 2e-3], {"finished": True}),
                                       ("s1", 1, [1e-3, 4e-3], {"finished": True}),
                                       ("s2", 2, [1e-3, 9.0], {"finished": False, "diverged": True,
                                                               "diverged_at_step": 25})):
        _write_run(root, name, seed, [50, 60], summary)
        with open(root / name / "metrics.jsonl", "a") as f:
            for step, size in zip((10, 20), sizes):
                f.write(json.dumps({"step": step, "time": 1, "step_size/block_0": size,
                                    "step_size/block_1": size / 2}) + "\n")
    assert plot.main([str(root), "--out", str(tmp_path / "figs"), "--formats", "png"]) == 0
    data = json.loads((tmp_path / "figs" / "plot_data.json").read_text())
    (name,) = [k for k in data if "_step_sizes_" in k]
    figure = data[name]
    assert figure["diverged_left_out"] == 1 and figure["config"].endswith("(1/3 diverged)")
    block_0 = next(s for s in figure["series"] if s["label"] == "block 0")
    assert block_0["runs"] == [str(root / "s0"), str(root / "s1")]
    assert block_0["mean"] == pytest.approx([1e-3, 3e-3])  # 9.0 of the diverged run would make it 4.3
    assert plot.main([str(root), "--kind", "block-panels", "--name", "blocks", "--out", str(tmp_path / "b"),
                      "--formats", "png"]) == 0
    panels = json.loads((tmp_path / "b" / "plot_data.json").read_text())["blocks"]["panels"]
    assert all(s["runs"] == [str(root / "s0"), str(root / "s1")] and s["label"].endswith("(1/3 diverged)")
               for p in panels for s in p["series"])


# ---- a run holds its folder, not a path (issue 28 item 2) ------------------------------------


def test_a_run_whose_folder_is_replaced_stops_and_writes_nothing_into_the_new_one(tmp_path):
    first = toy(tmp_path, "r", "--steps", 1000, "--sleep", 0.02, "--checkpoint-every", 5, wait=False)
    wait_ready(first)
    run_dir = tmp_path / "r"
    deadline = time.monotonic() + 60
    while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    import shutil

    shutil.rmtree(run_dir)  # deleted while it runs; a new run of the same name claims a new folder there
    hold = tmp_path / "go"
    second = toy(tmp_path, "r", "--steps", 0, "--hold-until", hold, wait=False)
    wait_ready(second)  # holds the new folder's lock, has written nothing yet
    _, stderr = first.communicate(timeout=120)
    first.stderr = stderr
    one_error(first, 1, "was deleted or replaced while this run ran")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing of the first run's
    assert json.loads((run_dir / ".lock").read_text())["pid"] == second.pid  # its lock file stays
    hold.touch()
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    assert runfolder.is_finished(run_dir) and [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == []


# ---- killed before its first checkpoint; an fp16 overflow (issue 28 item 6) -------------------


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path):
    proc = toy(tmp_path, "r", "--steps", 1000, "--sleep", 0.02, "--checkpoint-every", 10000, wait=False)
    wait_ready(proc)
    run_dir = tmp_path / "r"
    deadline = time.monotonic() + 60
    while len(read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []) < 3 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    assert runfolder.has_results(run_dir) == ["metrics.jsonl"]
    again = toy(tmp_path, "r", "--steps", 5)  # without --resume: the refusal says what to type
    line = one_error(again, 2, "add --resume to the same command to start it again")
    assert "no checkpoint yet" in line
    resumed = toy(tmp_path, "r", "--steps", 5, "--resume")
    assert resumed.returncode == 0 and "ready at step 0" in resumed.stdout, resumed.stderr
    assert "starting it from the beginning" in resumed.stderr
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert runfolder.is_finished(run_dir)


def test_an_fp16_overflow_the_scaler_skipped_is_not_divergence(tmp_path):
    parser = harness.ArgParser()
    harness.add_run_args(parser)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for name, scaling in (("fp16", True), ("fp32", False)):
        args = parser.parse_args(["--save-directory", str(tmp_path), "--run-name", name, "--device", "cpu"])
        run = harness.start_run(args, "x")
        run.resume(model, optimizer, None, torch.amp.GradScaler("cpu", enabled=scaling))
        run.log({"train/loss": 1.0}, 1)
        if not scaling:
            with pytest.raises(harness.Diverged, match="at step 2: train/loss is inf"):
                run.log({"train/loss": float("inf")}, 2)
            continue
        run.log({"train/loss": float("inf")}, 2)  # one overflow: a null in the log, the run goes on
        run.log({"train/loss": 0.5}, 3)
        run.log({"train/loss": float("nan")}, 4)
        with pytest.raises(harness.Diverged, match="at step 5: train/loss is nan"):  # persisting: divergence
            run.log({"train/loss": float("nan")}, 5)
        assert [r["train/loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")] == [1.0, None, 0.5, None]
