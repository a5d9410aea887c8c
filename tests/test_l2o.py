"""l2o/: the learned optimizer, meta-training, evaluation and MNIST/digits data (issue 16)."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from l2o_fixtures import assert_diverged, nan_weights_after, run_as_script
from lion_pytorch import Lion

from common import harness, runfolder
from common.data import DatasetError, load_mnist
from l2o import evaluate, meta_train
from l2o.data import StepBatches, load_dataset, resolve_dataset
from l2o.learned import LearnedOptimizer, load_network
from l2o.lion_sgd import LionSGD
from l2o.meta import Trajectory, TruncatedBPTT, unroll
from l2o.networks import LSTMOptimizer, network_record, preprocess_gradients
from l2o.tasks import OPTIMIZEES, MLPTask, seeded_optimizee

REPO = Path(__file__).resolve().parents[1]
# a meta-training small enough for tests: digits, 2 epochs x 2 runs x 40 steps, unroll 20
TINY_META = ["--preset", "cpu", "--epochs", "2", "--runs-per-epoch", "2", "--steps-per-run", "40",
             "--meta-test-runs", "2", "--meta-test-steps", "40", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the scripts do: tiny nets, and a shared CPU makes more threads contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    """A finished tiny meta-training on digits (relu optimizee)."""
    out = tmp_path_factory.mktemp("meta")
    assert meta_train.main([*TINY_META, "--save-directory", str(out), "--run-name", "m"]) == 0
    return out / "m"


def digits_task(seed=0, optimizee="relu"):
    data = load_dataset("digits", None)
    model = seeded_optimizee(optimizee, 64, seed)
    return MLPTask(model, StepBatches(data.train_x, data.train_y, 32, seed=seed, device="cpu"),
                   (data.test_x, data.test_y))


# --------------------------------------------------------------------------------------
# the network and LearnedOptimizer
# --------------------------------------------------------------------------------------


def test_preprocessing_on_known_values():
    g = torch.tensor([1.0, -1e-3, 1e-6, 0.0, -1e-5, 2.0])
    out = preprocess_gradients(g, p=10.0)
    e10 = math.exp(10.0)
    expected = torch.tensor([[math.log(1.0 + 1e-8) / 10, 1.0], [math.log(1e-3 + 1e-8) / 10, -1.0],
                             [-1.0, 1e-6 * e10], [-1.0, 0.0], [-1.0, -1e-5 * e10], [math.log(2.0 + 1e-8) / 10, 1.0]])
    torch.testing.assert_close(out, expected)
    # the threshold e^-p: just above keeps log/sign, just below switches to (-1, e^p g)
    t = math.exp(-10.0)
    edge = preprocess_gradients(torch.tensor([t * 1.001, t * 0.999], dtype=torch.float64), p=10.0)
    assert edge[0, 1] == 1.0 and edge[0, 0] == pytest.approx(-1.0, abs=1e-3)
    assert edge[1, 0] == -1.0 and edge[1, 1] == pytest.approx(0.999, rel=1e-6)


def test_learned_optimizer_equals_the_functional_unroll():
    torch.manual_seed(0)
    net = LSTMOptimizer()
    task = digits_task()
    traj, _ = unroll(net, task, Trajectory.start(net, task), 25, train=False)
    model = seeded_optimizee("relu", 64, 0)
    opt = LearnedOptimizer(model.parameters(), net)
    for t in range(25):
        x, y = task.batches(t)
        opt.zero_grad()
        F.nll_loss(model(x), y).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), traj.params[name]), name


def test_unroll_through_given_weights():
    """What first-order MAML (M-L2O) builds on: an unroll through explicit (e.g. adapted) weights equals
    the network's own, and the meta-gradient reaches those weights."""
    torch.manual_seed(0)
    net = LSTMOptimizer()
    task = digits_task()
    start = Trajectory.start(net, task)
    _, own = unroll(net, task, start, 5)
    weights = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    _, given = unroll(net, task, start, 5, weights=weights)
    assert torch.equal(own.detach(), given.detach())
    given.sum().log().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights.values())
    assert all(p.grad is None for p in net.parameters())


def test_learned_optimizer_state_round_trip(tmp_path):
    torch.manual_seed(0)
    net = LSTMOptimizer()
    task = digits_task()

    def steps(model, opt, ts):
        for t in ts:
            x, y = task.batches(t)
            opt.zero_grad()
            F.nll_loss(model(x), y).backward()
            opt.step()

    model = seeded_optimizee("relu", 64, 0)
    opt = LearnedOptimizer(model.parameters(), net)
    steps(model, opt, range(5))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "s.pt")
    steps(model, opt, range(5, 10))

    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    other = seeded_optimizee("relu", 64, 1)
    other.load_state_dict(saved["model"])
    fresh = LearnedOptimizer(other.parameters(), LSTMOptimizer())  # other weights: the state carries the network
    fresh.load_state_dict(saved["opt"])
    steps(other, fresh, range(5, 10))
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lstm network"):
        LearnedOptimizer(other.parameters(), LSTMOptimizer(hidden_size=8)).load_state_dict(saved["opt"])


def test_lion_sgd_ends_are_sgd_and_lion():
    for fraction, reference in [(0.0, lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)),
                                (1.0, lambda p: Lion(p, lr=0.005, betas=(0.9, 0.99)))]:
        finals = []
        for make in (lambda p, f=fraction: LionSGD(p, lion_fraction=f), reference):
            torch.manual_seed(0)
            w = torch.nn.Parameter(torch.randn(7))
            opt = make([w])
            for _ in range(5):
                opt.zero_grad()
                (w.sin() * torch.arange(7.0)).sum().backward()
                opt.step()
            finals.append(w.detach().clone())
        assert torch.equal(*finals), fraction


# --------------------------------------------------------------------------------------
# meta-training
# --------------------------------------------------------------------------------------


def test_meta_training_beats_the_untrained_network(meta_run):
    summary = json.loads((meta_run / "summary.json").read_text())
    assert summary["finished"] and summary["meta_steps"] == 8
    assert summary["best"]["meta_test/loss_sum"] < 0.8 * summary["initial"]["meta_test/loss_sum"]
    config = json.loads((meta_run / "config.json").read_text())
    assert config["dataset"] == "digits" and config["experiment"] == "l2o_meta"
    records = [json.loads(line) for line in (meta_run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "meta_test/loss_sum" in records[0]
    assert sum("meta/objective" in r for r in records) == 8
    network, meta_config = load_network(meta_run)
    assert isinstance(network, LSTMOptimizer) and meta_config["optimizee"] == "relu"


def test_meta_training_resume_equals_uninterrupted(tmp_path, meta_run):
    argv = [*TINY_META, "--save-directory", str(tmp_path), "--run-name", "r"]
    assert meta_train.main([*argv, "--stop-at-step", "3"]) == 0  # stops mid-run (run 2, step 20)
    assert not (tmp_path / "r" / "summary.json").exists()
    assert meta_train.main([*argv, "--resume"]) == 0
    a = torch.load(meta_run / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    for key in ("model", "best_network"):  # the network's last and best weights
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["history"] == b["history"]
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "time"}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(meta_run / "metrics.jsonl") == strip(tmp_path / "r" / "metrics.jsonl")


def test_meta_training_divergence_keeps_the_last_finite_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    nan_weights_after(monkeypatch, TruncatedBPTT, 3)  # run 2's first unroll; its second gets a NaN objective
    run_dir = tmp_path / "nan"
    argv = [*TINY_META, "--save-directory", str(tmp_path), "--run-name", "nan"]
    assert_diverged(run_dir, *run_as_script(meta_train.main, argv, capsys), 4, "meta/objective is nan", kept=2)
    network, _ = load_network(run_dir, "last")  # the network after run 1, finite
    assert all(torch.isfinite(p).all() for p in network.parameters())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # --log-every 1: the non-finite step is never written
    with pytest.raises(harness.Diverged, match="diverged at step 4 .*nothing to resume"):
        meta_train.main([*argv, "--resume"])


def test_meta_training_with_symmetry_regularisation(tmp_path):
    argv = [*TINY_META, "--epochs", "1", "--runs-per-epoch", "1", "--save-directory", str(tmp_path)]
    assert meta_train.main([*argv, "--run-name", "reg", "--reg", "all", "--reg-beta", "0.5"]) == 0
    records = [json.loads(line) for line in (tmp_path / "reg" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["meta/penalty"] > 0 for r in records if "meta/objective" in r)
    out = subprocess.run([sys.executable, str(REPO / "l2o" / "meta_train.py"), *argv, "--run-name", "bad",
                          "--reg", "scale"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("error: --reg scale: the optimizee has no scale symmetry "
                                                   "(it has: rescale, translation)")


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------

OPTIMIZERS = {
    "L2O": [],
    "Adam": ["--lr", "1e-3"],
    "SGD": ["--lr", "0.1"],
    "Lion": ["--lr", "1e-3"],
    "LionSGD": ["--lion-fraction", "0.25"],
    "HF": ["--alg-base", "AdamW", "--alg-meta", "Adam", "--alpha0", "1e-4", "--normalizer-param-meta", "0.999"],
}


@pytest.mark.parametrize("optimizee", list(OPTIMIZEES))
def test_evaluate_runs_every_optimizer_on_every_optimizee(tmp_path, meta_run, optimizee):
    for method, flags in OPTIMIZERS.items():
        extra = ["--checkpoint", str(meta_run)] if method == "L2O" else []
        argv = ["--optimizer", method, *flags, *extra, "--optimizee", optimizee, "--data", "digits",
                "--num-steps", "4", "--probe-every", "2", "--noise-every", "4", "--noise-samples", "3",
                "--hist-steps", "1", "--eval-every", "2", "--batch-size", "32", "--save-directory", str(tmp_path),
                "--run-name", method]
        assert evaluate.main(argv) == 0, method
        records = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
        kinds = {k.split("/")[1] for r in records for k in r if k.startswith("sym/")}
        assert "translation" in kinds and ("rescale" in kinds) == optimizee.startswith(("relu", "leaky"))
        assert ("scale" in kinds) == (optimizee == "relu_bn")
        assert "noise/update/tail_index" in records[4] and "update_abs/hist" in records[1]
        assert json.loads((tmp_path / method / "summary.json").read_text())["finished"]


def test_evaluate_lr_grid_and_resume(tmp_path):
    base = ["--optimizer", "Adam", "--lr", "grid", "--lr-grid", "1e-3,0.1,3", "--grid-runs", "1", "--grid-steps", "20",
            "--data", "digits", "--num-steps", "30", "--noise-every", "10", "--noise-samples", "3",
            "--save-directory", str(tmp_path)]
    assert evaluate.main([*base, "--run-name", "a"]) == 0
    assert evaluate.main([*base, "--run-name", "b", "--stop-at-step", "13"]) == 0
    shutil.rmtree(tmp_path / ".lr_grid")  # a resumed run without the cache computes the same grid again
    assert evaluate.main([*base, "--run-name", "b", "--resume"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["lr"] == 0.1 and set(summary["lr_grid"]) == {"0.001", "0.1", "3"}
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "time"}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["lr_used"] == 0.1
    grid_files = sorted((tmp_path / ".lr_grid").iterdir())  # run b reused a's grid; no temp file is left
    assert [p.suffix for p in grid_files] == [".json", ".lock"] and grid_files[0].stem == grid_files[1].stem
    assert grid_files[0].name.startswith("Adam-relu-")


def test_lr_grid_is_computed_once_by_concurrent_runs(tmp_path):
    """A run that needs a grid another run is computing waits for it and reads its result; a temp
    file a killed writer of that grid left is removed (not another grid's: that writer may be alive)."""
    argv = ["--optimizer", "Adam", "--lr", "grid", "--lr-grid", "1e-3,0.1", "--grid-runs", "1", "--grid-steps", "5",
            "--problem", "quadratic_ood", "--num-steps", "5", "--save-directory", str(tmp_path)]
    key, cache = evaluate.grid_cache(evaluate.parse_args(argv))
    cache.parent.mkdir()
    stale, other = (cache.parent / f".{name}.0123abcd.tmp" for name in (cache.name, "other.json"))
    with runfolder.waiting_lock(cache.with_suffix(".lock")):  # this process computes the grid
        stale.write_text('{"key": ')
        other.write_text("")
        proc = subprocess.Popen([sys.executable, str(REPO / "l2o" / "evaluate.py"), *argv, "--run-name", "waits"],
                                stderr=subprocess.PIPE, text=True, cwd=REPO)
        lines = []
        while not (lines and lines[-1].startswith("note: waiting for")):
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)  # the run ended without waiting
        assert f"pid {os.getpid()} on " in lines[-1]
        runfolder.write_json(cache, {"key": key, "lr": 0.0123, "scores": {"0.001": 2.0, "0.1": 1.0}})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert json.loads((tmp_path / "waits" / "summary.json").read_text())["lr"] == 0.0123  # not a grid of its own
    assert not stale.exists() and other.exists()


def test_evaluate_divergence_is_reported_as_such(tmp_path, capsys):
    argv = ["--optimizer", "SGD", "--lr", "1e30", "--data", "digits", "--num-steps", "30", "--noise-every", "0",
            "--save-directory", str(tmp_path), "--run-name", "nan"]
    assert_diverged(tmp_path / "nan", *run_as_script(evaluate.main, argv, capsys), 2, "train/loss is nan", kept=None)
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "L2O"], "error: --optimizer L2O needs --checkpoint"),
    (["--optimizer", "Foo"], "error: --optimizer: unknown value 'Foo'"),
    (["--optimizer", "L2O", "--checkpoint", "/nonexistent"], "error: no meta-training checkpoint at /nonexistent"),
    (["--optimizer", "Adam", "--lr", "-1"], "error: argument --lr: expected 'grid' or a positive number"),
    (["--optimizer", "Adam", "--data", "mnist", "--no-download", "--data-dir", "/nonexistent"],
     "error: mnist: /nonexistent/MNIST/raw/train-images-idx3-ubyte is missing and downloading is off"),
])
def test_evaluate_bad_input_is_one_error_line(tmp_path, argv, message):
    out = subprocess.run([sys.executable, str(REPO / "l2o" / "evaluate.py"), *argv, "--save-directory", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------------------
# MNIST idx files (torchvision's layout), generated in the exact format
# --------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format: zero bytes, dtype code 0x08 (ubyte), rank, big-endian int32 dims, raw data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train=300, n_test=50, gz=False) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = (rng.random((n, 28, 28)) * 60 + labels[:, None, None] * 19).clip(0, 255)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    if gz:
        for f in list(raw.iterdir()):
            (raw / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    return raw


def test_mnist_idx_files_load_and_are_chosen_by_auto(tmp_path):
    write_mnist(tmp_path)
    data = load_mnist(tmp_path, download=False)
    assert data.train_x.shape == (300, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_y.shape == (50,) and data.num_classes == 10
    assert resolve_dataset("auto", tmp_path) == "mnist" and resolve_dataset("auto", tmp_path / "x") == "digits28"
    argv = ["--optimizer", "SGD", "--lr", "0.1", "--data-dir", str(tmp_path), "--num-steps", "3", "--noise-every", "0",
            "--save-directory", str(tmp_path / "runs"), "--run-name", "m"]
    assert evaluate.main(argv) == 0
    config = json.loads((tmp_path / "runs" / "m" / "config.json").read_text())
    assert config["data"] == "auto" and config["dataset"] == "mnist"


def test_mnist_truncated_file_is_a_dataset_error(tmp_path):
    raw = write_mnist(tmp_path)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, download=False)


def test_digits_shapes():
    small, big = load_dataset("digits", None), load_dataset("digits28", None)
    assert small.train_x.shape == (1347, 1, 8, 8) and big.train_x.shape == (1347, 1, 28, 28)
    assert torch.equal(small.train_y, big.train_y) and int(small.train_x.max()) == 255


def test_network_record_round_trip():
    net = LSTMOptimizer(hidden_size=7, output_scale=0.05)
    record = network_record(net)
    assert record["name"] == "lstm" and record["config"]["hidden_size"] == 7


# --------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------


def test_plot_draws_the_learned_optimizer_figures(tmp_path, meta_run):
    sys.path.insert(0, str(REPO / "scripts"))
    import plot

    reg = tmp_path / "meta"
    assert meta_train.main([*TINY_META, "--epochs", "1", "--runs-per-epoch", "1", "--reg", "all",
                            "--save-directory", str(reg), "--run-name", "reg"]) == 0
    evals = tmp_path / "eval"
    common = ["--optimizee", "relu", "--data", "digits", "--num-steps", "30", "--probe-every", "5", "--noise-every",
              "10", "--noise-samples", "3", "--hist-steps", "1,5", "--save-directory", str(evals)]
    runs = {"l2o": ["--optimizer", "L2O", "--checkpoint", str(meta_run)],
            "l2o-reg": ["--optimizer", "L2O", "--checkpoint", str(reg / "reg")],
            "adam": ["--optimizer", "Adam", "--lr", "0.01"], "sgd": ["--optimizer", "SGD", "--lr", "0.1"],
            "mo": ["--optimizer", "HF", "--alg-base", "SGD", "--alg-meta", "Adam", "--alpha0", "0.01",
                   "--normalizer-param-meta", "0.999", "--weight-decay-base", "0"],
            "ls1": ["--optimizer", "LionSGD", "--lion-fraction", "0.25"],
            "ls2": ["--optimizer", "LionSGD", "--lion-fraction", "0.75"]}
    for name, argv in runs.items():
        for seed in ("0", "1"):
            assert evaluate.main([*argv, *common, "--run-name", f"{name}-{seed}", "--seed", seed]) == 0
    out = tmp_path / "figs"
    assert plot.main([str(evals), str(reg), str(meta_run.parent), "--out", str(out), "--formats", "png"]) == 0
    data = json.loads((out / "plot_data.json").read_text())
    assert set(data) == {"l2o_sym_relu", "l2o_noise_relu", "l2o_hist_relu", "l2o_reg_relu", "l2o_lion_sgd_relu",
                         "l2o_meta_test"}
    labels = {s["label"] for s in data["l2o_sym_relu"]["series"]}
    assert {"L2O", "Adam lr=0.01", "SGD m=0.9 lr=0.1", "MetaOptimize SGD+Adam", "gradient"} <= labels
    assert [p["lion_fraction"] for p in data["l2o_lion_sgd_relu"]["points"][:2]] == [0.25, 0.75]
    assert "L2O reg=all β=0.1" in {s["label"] for s in data["l2o_reg_relu"]["series"]}
    assert data["l2o_hist_relu"]["steps"] == [1, 5]
