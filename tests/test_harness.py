"""common/harness.py: flags, run folder, metrics, atomic checkpoints, resume, stopping, errors, DDP."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from checks import free_port

from common import harness, stop_control
from common.optimizers import MetaOptimize


def make_args(tmp_path, *argv):
    parser = harness.ArgParser()
    harness.add_run_args(parser)
    return parser.parse_args(["--save-directory", str(tmp_path / "out"), "--device", "cpu", *argv])


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def _restore_signals():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in old.items():
        signal.signal(s, h)


# ---- --max-time -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("00:05:00", 300.0), ("1:00:00", 3600.0), ("05:30", 330.0), ("90", 90.0), ("2.5", 2.5),
    ("1-00:00:00", 86400.0), ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5), ("1-12", 1.5 * 86400),
    ("0:00:01.5", 1.5), (None, None), ("none", None), (120, 120.0),
])
def test_parse_max_time(text, seconds):
    assert harness.parse_max_time(text) == seconds


@pytest.mark.parametrize("text", ["abc", "1:99", "1:2:3:4", "-5", "0", "00:00:00", "1h", "1-", "x-01:00:00", "::"])
def test_parse_max_time_rejects(text):
    with pytest.raises(ValueError, match="--max-time") as e:
        harness.parse_max_time(text)
    assert "HH:MM:SS" in str(e.value)


# ---- flags and errors -----------------------------------------------------------------------


def test_run_args_defaults(tmp_path):
    parser = harness.ArgParser()
    harness.add_run_args(parser)
    a = parser.parse_args([])
    assert (a.seed, a.run_name, a.save_directory, a.max_time, a.device, a.resume, a.log_every, a.compile,
            a.amp, a.wandb, a.wandb_project, a.wandb_entity) == (
        0, None, "outputs", None, "auto", False, 100, False, "none", False, "metaoptimize", None)


def test_argparse_error_is_one_line(capsys):
    parser = harness.ArgParser(prog="train.py")
    harness.add_run_args(parser)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--amp", "fp8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --amp") and "bf16" in err[0]


@pytest.mark.parametrize("exc", [ValueError("--alg-base: unknown value 'x'"), harness.UsageError("--foo is bad")])
def test_run_main_turns_bad_input_into_one_line(exc, capsys):
    def main():
        raise exc

    with pytest.raises(SystemExit) as e:
        harness.run_main(main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {exc}\n"


def test_run_main_dataset_error_and_exit_codes(capsys):
    from common.data import DatasetError

    def bad():
        raise DatasetError("cifar10: data/cifar-10-batches-py is missing\nand no network")

    with pytest.raises(SystemExit) as e:
        harness.run_main(bad)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: cifar10: data/cifar-10-batches-py is missing and no network\n"
    for ret, code in ((None, 0), (0, 0), (3, 3)):
        with pytest.raises(SystemExit) as e:
            harness.run_main(lambda r=ret: r)
        assert e.value.code == code
    with pytest.raises(KeyError):  # a bug is not bad input: full traceback
        harness.run_main(lambda: {}["x"])


def test_run_main_in_a_subprocess(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""
        from common import harness
        def main():
            parser = harness.ArgParser(); harness.add_run_args(parser)
            harness.start_run(parser.parse_args(), "x")
        harness.run_main(main)
    """))
    p = subprocess.run([sys.executable, str(script), "--max-time", "soon", "--save-directory", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith("error: --max-time") and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_device_and_log_every(tmp_path):
    with pytest.raises(harness.UsageError, match="--device"):
        harness.start_run(make_args(tmp_path, "--device", "tpu"), "x")
    if not torch.cuda.is_available():
        with pytest.raises(harness.UsageError, match="--device cuda: CUDA is not available"):
            harness.start_run(make_args(tmp_path, "--device", "cuda"), "x")
    with pytest.raises(harness.UsageError, match="--log-every"):
        harness.start_run(make_args(tmp_path, "--log-every", "0"), "x")
    with pytest.raises(harness.UsageError, match="--run-name"):
        harness.start_run(make_args(tmp_path, "--run-name", "a/b"), "x")
    with pytest.raises(harness.UsageError, match="--resume needs --run-name"):
        harness.start_run(make_args(tmp_path, "--resume"), "x")


def test_auto_device_and_helpers(tmp_path):
    run = harness.start_run(make_args(tmp_path, "--device", "auto"), "x")
    assert run.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert harness.setup_distributed() == (0, 1, 0) and harness.is_main()
    args = make_args(tmp_path, "--amp", "bf16")
    with harness.amp_context(args, "cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    assert not harness.grad_scaler(args, "cpu").is_enabled()
    assert harness.grad_scaler(make_args(tmp_path, "--amp", "fp16"), "cpu").is_enabled()
    model = torch.nn.Linear(2, 2)
    assert harness.maybe_compile(model, args) is model
    assert harness.unwrap(harness.distribute(model, "cpu")) is model
    run.close()


# ---- run folder, metrics, checkpoints --------------------------------------------------------


def test_nothing_written_before_first_log(tmp_path):
    run = harness.start_run(make_args(tmp_path, "--run-name", "r"), "x")
    assert run.dir == tmp_path / "out" / "r" and [p.name for p in run.dir.iterdir()] == [".lock"]  # locked only
    run.log({"epoch": 1, "train/loss": torch.tensor(0.5)}, step=10)
    config = json.loads((run.dir / "config.json").read_text())
    assert config["experiment"] == "x" and config["run_name"] == "r" and config["seed"] == 0
    assert isinstance(config["command"], list) and "start_time" in config and "log_every" in config
    (rec,) = lines(run.dir / "metrics.jsonl")
    assert rec["step"] == 10 and rec["epoch"] == 1 and rec["train/loss"] == 0.5 and isinstance(rec["time"], float)
    run.finish({"final": {"test/acc": 50.0}, "best": {"test/acc": 60.0, "epoch": 2}})
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["finished"] is True and summary["final"] == {"test/acc": 50.0}
    assert summary["best"] == {"test/acc": 60.0, "epoch": 2} and summary["wall_time"] >= 0


def test_default_run_name_is_a_timestamp(tmp_path):
    run = harness.start_run(make_args(tmp_path), "x")
    assert run.name[:8].isdigit() and run.args.run_name == run.name
    run.close()


def test_log_step_keys_and_log_every(tmp_path):
    run = harness.start_run(make_args(tmp_path, "--run-name", "r", "--log-every", "5"), "x")
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = MetaOptimize(params, stepsize_groups="layerwise", alpha0=1e-3)
    assert not run.is_log_step(3)
    run.log_step(opt, 3)  # not a log step: nothing written
    assert run.is_log_step(5)
    run.log_step(opt, 5, {"train/loss": 1.0})
    wide = MetaOptimize([torch.nn.Parameter(torch.randn(100))], stepsize_groups="weightwise", alpha0=1e-3)
    assert run.is_log_step(10)
    run.log_step(wide, 10)
    sgd = torch.optim.SGD(params, lr=0.1)
    assert run.is_log_step(15)
    run.log_step(sgd, 15)
    a, b, c = lines(run.dir / "metrics.jsonl")
    assert sorted(k for k in a if k.startswith("step_size")) == [f"step_size/block_{i}" for i in range(3)]
    assert a["step_size/block_2"] == pytest.approx(1e-3) and a["train/loss"] == 1.0 and "lr" not in a
    assert {"step_size/min", "step_size/median", "step_size/max"} <= set(b) and "step_size/block_0" not in b
    assert c["step_size/block_0"] == pytest.approx(0.1) and c["lr"] == pytest.approx(0.1)
    run.close()


def test_existing_run_needs_resume(tmp_path):
    run = harness.start_run(make_args(tmp_path, "--run-name", "r"), "x")
    run.save_checkpoint({"a": 1})
    run.close()
    before = (run.dir / "checkpoint.pt").read_bytes()
    with pytest.raises(harness.UsageError, match="--resume"):
        harness.start_run(make_args(tmp_path, "--run-name", "r"), "x")
    assert (run.dir / "checkpoint.pt").read_bytes() == before
    # a folder from a run that died before logging anything is reused without --resume
    (tmp_path / "out" / "empty").mkdir()
    harness.start_run(make_args(tmp_path, "--run-name", "empty"), "x").close()


def test_atomic_checkpoint_keeps_old_file_on_failure(tmp_path, monkeypatch):
    run = harness.start_run(make_args(tmp_path, "--run-name", "r"), "x")
    run.save_checkpoint({"value": torch.tensor([1.0])})
    good = (run.dir / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(10)  # half a file on disk, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(harness.RunFolderError, match="cannot write .*checkpoint.pt: disk full"):
        run.save_checkpoint({"value": torch.tensor([2.0])})
    monkeypatch.undo()
    assert (run.dir / "checkpoint.pt").read_bytes() == good
    assert sorted(p.name for p in run.dir.iterdir()) == [".lock", "checkpoint.pt", "config.json", "metrics.jsonl"]
    run.close()


def test_resume_truncates_metrics_and_restores_rng(tmp_path, capsys):
    run = harness.start_run(make_args(tmp_path, "--run-name", "r"), "x")
    for s in range(3):
        run.log({"train/loss": float(s)}, step=s)
    torch.rand(3), np.random.rand(), random.random()
    run.save_checkpoint({"step": 3, "w": torch.arange(4.0)})
    expected = (torch.rand(5), np.random.rand(3), [random.random() for _ in range(3)])
    for s in range(3, 6):
        run.log({"train/loss": float(s)}, step=s)  # lost: after the checkpoint
    run.close()

    before = (run.dir / "metrics.jsonl").read_bytes()
    with pytest.raises(harness.UsageError, match="changed flags: --seed 0 -> 7; --seed would change what"):
        harness.start_run(make_args(tmp_path, "--run-name", "r", "--resume", "--seed", "7"), "x").load_checkpoint()
    harness._close_runs()
    assert (run.dir / "metrics.jsonl").read_bytes() == before  # refused before anything changed
    run = harness.start_run(make_args(tmp_path, "--run-name", "r", "--resume"), "x")
    state = run.load_checkpoint()
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4.0)) and "harness" not in state
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    assert [r["step"] for r in lines(run.dir / "metrics.jsonl")] == [0, 1, 2]
    run.log({"train/loss": 3.0}, step=3)
    assert [r["step"] for r in lines(run.dir / "metrics.jsonl")] == [0, 1, 2, 3]
    run.close()


class FakeClock:
    """time.monotonic for the harness only: moves when the test says so."""

    def __init__(self, now=1000.0):
        self.now = now

    def monotonic(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_elapsed_time_adds_up_over_resumes_with_a_fake_clock(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(harness, "time", clock)  # the harness's clock; pytest keeps the real one
    run = harness.start_run(make_args(tmp_path, "--run-name", "r"), "x")
    clock.advance(7.0)
    run.log({"train/loss": 1.0}, step=1)
    run.save_checkpoint({"step": 1})  # 7 s of training kept
    clock.advance(5.0)  # trained after the checkpoint: lost with the interruption
    run.log({"train/loss": 2.0}, step=2)
    run.close()
    saved = torch.load(run.dir / "checkpoint.pt", weights_only=True)["harness"]["elapsed"]
    assert saved == 7.0

    clock.advance(600.0)  # waiting in the queue is not training time
    run = harness.start_run(make_args(tmp_path, "--run-name", "r", "--resume"), "x")
    assert run.load_checkpoint()["step"] == 1 and run.elapsed() == 7.0
    clock.advance(3.0)
    run.log({"train/loss": 2.5}, step=2)
    run.save_checkpoint({"step": 2})
    run.close()
    assert torch.load(run.dir / "checkpoint.pt", weights_only=True)["harness"]["elapsed"] == 10.0

    clock.advance(50.0)
    run = harness.start_run(make_args(tmp_path, "--run-name", "r", "--resume"), "x")
    run.load_checkpoint()
    clock.advance(2.5)
    run.finish({"final": {}})
    assert [(r["step"], r["time"]) for r in lines(run.dir / "metrics.jsonl")] == [(1, 7.0), (2, 10.0)]
    assert json.loads((run.dir / "summary.json").read_text())["wall_time"] == 12.5


def test_resume_without_checkpoint_never_destroys_results(tmp_path):
    run = harness.start_run(make_args(tmp_path, "--run-name", "r"), "x")
    run.log({"train/loss": 1.0}, step=1)
    run.finish({"final": {"train/loss": 1.0}})  # a finished run whose checkpoint was deleted (or never written)
    before = {p.name: p.read_bytes() for p in run.dir.iterdir()}
    with pytest.raises(harness.UsageError, match="no checkpoint.pt to continue from .*--start-over"):
        harness.start_run(make_args(tmp_path, "--run-name", "r", "--resume"), "x")
    assert {p.name: p.read_bytes() for p in run.dir.iterdir()} == before  # untouched, lock released
    # asked for explicitly: the old results go, a fresh run starts
    run = harness.start_run(make_args(tmp_path, "--run-name", "r", "--resume", "--start-over"), "x")
    assert run.load_checkpoint() is None and sorted(p.name for p in run.dir.iterdir()) == [".lock"]
    run.close()
    # an empty folder, or none: --resume is a fresh start; a folder it made and never used is removed
    run = harness.start_run(make_args(tmp_path, "--run-name", "new", "--resume"), "x")
    assert run.load_checkpoint() is None
    run.close()
    assert not run.dir.exists()


def test_resume_rejects_other_experiment_and_garbage(tmp_path):
    run = harness.start_run(make_args(tmp_path, "--run-name", "r"), "x")
    run.save_checkpoint({})
    run.close()
    with pytest.raises(harness.UsageError, match="is a x run, not y"):
        harness.start_run(make_args(tmp_path, "--run-name", "r", "--resume"), "y").load_checkpoint()
    (run.dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(harness.UsageError, match="cannot read"):
        harness.start_run(make_args(tmp_path, "--run-name", "r", "--resume"), "x").load_checkpoint()


# ---- stopping ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_stop_flag(tmp_path, sig):
    run = harness.start_run(make_args(tmp_path), "x")
    assert not run.should_stop()
    os.kill(os.getpid(), sig)
    assert run.should_stop() and run.stop_reason == sig.name
    run.close()
    assert signal.getsignal(sig) != run._on_signal


def test_max_time_counts_process_wall_time(tmp_path, monkeypatch):
    # --max-time counts from process start; pytest's process may be minutes old by now
    monkeypatch.setattr(stop_control, "PROCESS_START", time.monotonic())
    run = harness.start_run(make_args(tmp_path, "--max-time", "00:01:00"), "x")
    assert run.max_time == 60.0 and not run.should_stop()
    monkeypatch.setattr(stop_control, "PROCESS_START", stop_control.PROCESS_START - 61)
    assert run.should_stop() and "--max-time" in run.stop_reason
    run.close()


# ---- DDP (gloo, 2 processes) -----------------------------------------------------------------


def _ddp_worker(rank, port, out_dir, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parser = harness.ArgParser()
    harness.add_run_args(parser)
    args = parser.parse_args(["--save-directory", out_dir, "--device", "cpu", "--log-every", "1"])
    run = harness.start_run(args, "ddp")
    model = harness.distribute(torch.nn.Linear(3, 1), run.device)
    stopped_at = None
    for step in range(1, 3 * harness.DDP_STOP_CHECK_EVERY):
        if rank == 1 and step == 5:
            run._stop_flag = True  # as if only this rank got the signal
        run.log({"train/loss": 1.0}, step)
        if run.should_stop():
            stopped_at = step
            break
    run.save_checkpoint({"model": harness.unwrap(model).state_dict()})
    run.close()
    with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
        json.dump({"name": run.name, "stopped_at": stopped_at, "is_main": run.is_main}, f)
    harness.cleanup_distributed()


@pytest.mark.slow
def test_ddp_ranks_agree(tmp_path):
    port = free_port()
    (tmp_path / "res").mkdir()
    torch.multiprocessing.spawn(_ddp_worker, args=(port, str(tmp_path / "out"), str(tmp_path / "res")), nprocs=2)
    r0, r1 = (json.loads((tmp_path / "res" / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["name"] == r1["name"] and r0["is_main"] and not r1["is_main"]
    assert r0["stopped_at"] == r1["stopped_at"] == harness.DDP_STOP_CHECK_EVERY
    run_dir = tmp_path / "out" / r0["name"]
    assert (run_dir / "checkpoint.pt").exists()
    assert len(lines(run_dir / "metrics.jsonl")) == harness.DDP_STOP_CHECK_EVERY  # rank 0 only


# ---- a non-finite gradient at the meta update (issue 28) -------------------------------------


@pytest.mark.parametrize("impl, around", [("foreach", False), ("fused", False), (None, True)])
def test_a_nan_gradient_skips_the_meta_update_and_is_counted_in_the_log(tmp_path, impl, around):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    if around:
        opt = MetaOptimize.around(torch.optim.AdamW(model.parameters(), lr=1e-2), alg_meta="Adam", alpha0=1.0,
                                  meta_stepsize=1e-2)
    else:
        opt = MetaOptimize(model, alg_meta="Adam", alpha0=1e-2, meta_stepsize=1e-2, impl=impl,
                           normalizer_param_meta=0.999, momentum_param_meta=0.9)
    for step in (1, 2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if step == 2:
            model[0].weight.grad[0, 0] = float("nan")  # one element: z of the scalar block is nan
            beta = opt._beta.clone()
            meta = {k: v.clone() for k, v in opt._meta_state.items()}
        opt.step()
        if step == 2:  # that step's meta update is skipped: beta and the meta state as they were
            assert torch.equal(opt._beta, beta) and all(torch.equal(opt._meta_state[k], v) for k, v in meta.items())
    assert impl != "fused" or opt._impl.meta_fn is not None  # the C meta update's keep mask
    assert torch.isfinite(opt.step_sizes()).all() and int(opt.skipped_nonfinite) == 1
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.isfinite(weights).sum() == weights.numel() - 1  # only the weight whose gradient was nan
    assert int(opt.state_dict()["meta"]["skipped_nonfinite"]) == 1
    run = harness.start_run(make_args(tmp_path, "--run-name", "r", "--log-every", "1"), "x")
    run.resume(model, opt)
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0  # the weight the nan reached: else the log's divergence check stops the run
    run.log_step(opt, 2)
    assert lines(run.dir / "metrics.jsonl")[-1]["meta/skipped_nonfinite"] == 1
    run.close()


# ---- changed flags on --resume (issue 28 item 5) ---------------------------------------------


def test_changed_flags_on_resume_are_applied_and_recorded_or_refused(tmp_path):
    def start(*argv, wd=0.1, eta=1e-3, epochs=2):
        args = make_args(tmp_path, "--run-name", "r", *argv)
        args.weight_decay_base, args.meta_stepsize, args.num_epochs = wd, eta, epochs
        run = harness.start_run(args, "x")
        model = torch.nn.Linear(3, 2)
        opt = MetaOptimize(model, weight_decay_base=wd, meta_stepsize=eta, alpha0=1e-2)
        return run, model, opt

    run, model, opt = start()
    run.resume(model, opt)
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    run.checkpoint({"step": 1})
    run.close()
    run, model, opt = start("--resume", wd=0.2, eta=1e-2)
    assert run.resume(model, opt)["step"] == 1
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2] and opt.meta_hp["meta_stepsize"] == 1e-2
    config = json.loads((run.dir / "config.json").read_text())
    assert (config["weight_decay_base"], config["meta_stepsize"]) == (0.2, 1e-2)
    assert sorted((c["step"], c["flag"], c["old"], c["new"]) for c in config["changes"]) == [
        (1, "--meta-stepsize", 1e-3, 1e-2), (1, "--weight-decay-base", 0.1, 0.2)]
    run.checkpoint({"step": 1})
    run.close()
    before = {p.name: p.read_bytes() for p in run.dir.iterdir()}
    run, model, opt = start("--resume", wd=0.2, eta=1e-2, epochs=3)
    with pytest.raises(harness.UsageError, match="--num-epochs 2 -> 3; --num-epochs would change what the checkpoint"):
        run.resume(model, opt)
    run.close()
    assert {p.name: p.read_bytes() for p in run.dir.iterdir()} == before
    run, model, opt = start("--resume", wd=0.2, eta=1e-2)  # the same identity after the changes; none new
    assert run.resume(model, opt)["step"] == 1
    assert len(json.loads((run.dir / "config.json").read_text())["changes"]) == 2
    run.close()


def test_check_args_checks_metaoptimize_flags_without_building_an_optimizer(monkeypatch):
    from common import specs
    from common.optim_flags import add_optimizer_args

    parser = harness.ArgParser()
    harness.add_run_args(parser)
    add_optimizer_args(parser)

    def no_build(*args, **kwargs):
        raise AssertionError("the check built a MetaOptimize")

    monkeypatch.setattr(specs, "MetaOptimize", no_build)
    harness.check_args(parser.parse_args(["--alg-base", "Lion", "--Lion-beta2-base", ".99"]))
    for argv, message in ((["--alpha0", "0"], "--alpha0 must be a finite number in (0.0, inf), got 0.0"),
                          (["--alg-base", "Lion"], "--Lion-beta2-base is required by --alg-base='Lion' but is unset"),
                          (["--hessian", "hvp", "--alg-meta", "fixed"], "--hessian: a fixed step size keeps no trace")):
        with pytest.raises(ValueError) as e:
            harness.check_args(parser.parse_args(argv))
        assert str(e.value).startswith(message), e.value
