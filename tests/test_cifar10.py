"""cifar10/train.py on a generated dataset in the official `cifar-10-batches-py` layout.

The model is the real ResNet-18; runs are kept short with 20 training images in batches of 10
(2 optimizer steps per epoch). Training runs are called in-process (no torch import per run);
the command-line behaviour (paper command, --help, errors, SIGTERM) runs train.py in subprocesses.
"""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checks import assert_same  # noqa: E402
from cifar_fixtures import write_fake_cifar10  # noqa: E402
from wandb_records import assert_wandb_matches_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "cifar10" / "train.py"
EPOCH_KEYS = {"step", "time", "epoch", "train/loss", "train/acc", "test/loss", "test/acc", "images_per_s"}

# the paper's (base, meta) settings for CIFAR-10 (spec section 7); -1 = unset
PAPER = {
    "AdamW+Adam": "--alg-base AdamW --weight-decay-base .1 --normalizer-param-base .999 --momentum-param-base .9 "
                  "--Lion-beta2-base -1 --alg-meta Adam --momentum-param-meta .9 --normalizer-param-meta .999 "
                  "--Lion-beta2-meta -1",
    "Lion+Lion": "--alg-base Lion --weight-decay-base .1 --normalizer-param-base -1 --momentum-param-base .99 "
                 "--Lion-beta2-base .9 --alg-meta Lion --momentum-param-meta .99 --normalizer-param-meta -1 "
                 "--Lion-beta2-meta .9",
    "RMSProp+Adam": "--alg-base RMSProp --weight-decay-base .1 --normalizer-param-base .999 --momentum-param-base -1 "
                    "--Lion-beta2-base -1 --alg-meta Adam --momentum-param-meta .9 --normalizer-param-meta .999 "
                    "--Lion-beta2-meta -1",
    "SGDm+Adam": "--alg-base SGDm --weight-decay-base .1 --normalizer-param-base -1 --momentum-param-base .9 "
                 "--Lion-beta2-base -1 --alg-meta Adam --momentum-param-meta .9 --normalizer-param-meta .999 "
                 "--Lion-beta2-meta -1",
}
README_COMMAND = (
    "--optimizer HF --alg-base AdamW --weight-decay-base .1 --normalizer-param-base .999 --momentum-param-base .9 "
    "--Lion-beta2-base -1 --alg-meta Lion --meta-stepsize 1e-3 --alpha0 1e-6 --stepsize-groups scalar "
    "--weight-decay-meta 0 --normalizer-param-meta -1 --momentum-param-meta .99 --Lion-beta2-meta .9 --seed 0 "
    "--gamma 1 --run-name 1 --save-directory outputs --max-time 00:05:00"
)


@pytest.fixture(scope="module")
def train_mod():
    spec = importlib.util.spec_from_file_location("cifar10_train", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"), n_train=20, n_test=10)


@pytest.fixture(autouse=True)
def _one_thread():
    """ResNet-18 on a shared CPU: one thread is several times faster than two under contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    torch.set_num_threads(n)
    for s, h in old.items():
        signal.signal(s, h)


def base_argv(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--save-directory", str(out), "--batch-size", "10",
            "--eval-batch-size", "10", "--num-epochs", "1", "--device", "cpu", "--log-every", "1", *extra]


def read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def load_ckpt(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def subprocess_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # no network: refuse at once
        env[k] = "http://127.0.0.1:9"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    env.update(extra)
    return env


def cli(*argv, cwd=None):
    return subprocess.Popen([sys.executable, str(TRAIN), *argv], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- interface ------------------------------------------------------------------------------


def test_defaults_are_the_papers(train_mod):
    a = train_mod.parse_args([])
    assert (a.optimizer, a.alg_base, a.alg_meta, a.alpha0, a.meta_stepsize, a.gamma, a.stepsize_groups) == (
        "HF", "AdamW", "Lion", 1e-6, 1e-3, 1.0, "scalar")
    assert (a.weight_decay_base, a.normalizer_param_base, a.momentum_param_base, a.Lion_beta2_base) == (
        0.1, 0.999, 0.9, -1)
    assert (a.weight_decay_meta, a.normalizer_param_meta, a.momentum_param_meta, a.Lion_beta2_meta) == (
        0.0, -1, 0.99, 0.9)
    assert (a.num_epochs, a.batch_size, a.data_dir, a.augment, a.seed, a.save_directory, a.max_time) == (
        60, 100, "./data", False, 0, "outputs", None)
    assert (a.log_every, a.amp, a.compile, a.wandb, a.resume, a.stop_at_step) == (
        100, "none", False, False, False, None)
    b = train_mod.parse_args(README_COMMAND.split())
    assert (b.run_name, b.max_time) == ("1", "00:05:00")
    assert {k: v for k, v in vars(b).items() if k not in ("run_name", "max_time")} == {
        k: v for k, v in vars(a).items() if k not in ("run_name", "max_time")}


def test_help_from_the_cifar10_folder():
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO / "cifar10", env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    flags = ["--optimizer", "--alg-base", "--alg-meta", "--alpha0", "--meta-stepsize", "--gamma", "--stepsize-groups",
             "--weight-decay-base", "--normalizer-param-base", "--momentum-param-base", "--Lion-beta2-base",
             "--weight-decay-meta", "--normalizer-param-meta", "--momentum-param-meta", "--Lion-beta2-meta",
             "--lr", "--warmup-steps", "--num-epochs", "--batch-size", "--data-dir", "--augment", "--seed",
             "--run-name", "--save-directory", "--max-time", "--device", "--resume", "--log-every", "--compile",
             "--amp", "--wandb", "--wandb-project", "--wandb-entity"]
    for flag in flags:
        assert flag in text, flag
    for symbol in ["[kappa]", "[rho]", "[lambda]", "[c]", "[kappa_bar]", "[rho_bar]", "[lambda_bar]", "[c_bar]",
                   "[eta]", "[alpha0]", "[gamma]"]:
        assert symbol in text, symbol
    assert "--stop-at-step" not in text  # test-only flag stays hidden


# ---- training runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("groups, num_blocks", [("scalar", 1), ("resnet18_blocks", 6)])
@pytest.mark.parametrize("combo", list(PAPER))
def test_one_epoch_each_paper_combo(train_mod, data_dir, tmp_path, capsys, combo, groups, num_blocks):
    out = tmp_path / "out"
    argv = base_argv(data_dir, out, "--run-name", "r", "--alpha0", "1e-6", "--stepsize-groups", groups,
                     *PAPER[combo].split())
    assert train_mod.main(argv) == 0
    run_dir = out / "r"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl",
                                                         "summary.json"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["experiment"] == "cifar10" and config["alg_base"] == combo.split("+")[0]
    assert config["stepsize_groups"] == groups and config["batch_size"] == 10 and config["command"]
    assert set(vars(train_mod.parse_args([]))) <= set(config)

    records = read_jsonl(run_dir / "metrics.jsonl")
    step_lines = [r for r in records if "epoch" not in r]
    (epoch_line,) = [r for r in records if "epoch" in r]
    assert [r["step"] for r in step_lines] == [1, 2] and epoch_line["step"] == 2 and epoch_line["epoch"] == 1
    keys = [f"step_size/block_{i}" for i in range(num_blocks)]
    for r in step_lines:
        assert sorted(k for k in r if k.startswith("step_size/")) == keys
        assert all(v > 0 and math.isfinite(v) for k, v in r.items() if k.startswith("step_size/"))
    assert set(epoch_line) == EPOCH_KEYS
    assert all(math.isfinite(epoch_line[k]) for k in EPOCH_KEYS)
    assert 0 <= epoch_line["train/acc"] <= 100 and 0 <= epoch_line["test/acc"] <= 100

    record = {k: v for k, v in epoch_line.items() if k not in ("step", "time")}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True and summary["final"] == record
    assert summary["best"] == {"test/acc": epoch_line["test/acc"], "epoch": 1} and summary["wall_time"] > 0

    ckpt = load_ckpt(run_dir)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["scheduler"]) == (1, 0, 2, None)
    assert ckpt["history"] == [record] and ckpt["best"] == summary["best"]
    assert len(ckpt["model"]) > 62 and "harness" in ckpt
    meta = ckpt["optimizer"]["meta"]
    assert meta["alg_base"] == combo.split("+")[0] and meta["beta"].numel() == num_blocks and meta["step"] == 2
    assert (meta["momentum"] != 0).all(), "no meta-gradient reached a block"  # z = h.g at step 2
    assert len(ckpt["optimizer"]["state"]) == 62 and all("trace" in s for s in ckpt["optimizer"]["state"].values())

    stdout = capsys.readouterr().out
    assert f"best test acc {epoch_line['test/acc']:.2f}% (epoch 1), final test acc {epoch_line['test/acc']:.2f}%" \
        in stdout


def test_adamw_cosine_baseline(train_mod, data_dir, tmp_path):
    out = tmp_path / "out"
    argv = base_argv(data_dir, out, "--run-name", "b", "--optimizer", "AdamW", "--lr", "1e-3",
                     "--warmup-steps", "1", "--num-epochs", "2")
    assert train_mod.main(argv) == 0
    lrs = [r["lr"] for r in read_jsonl(out / "b" / "metrics.jsonl") if "lr" in r]
    # warm-up to 1e-3 over 1 step, then cosine to 0 over the remaining 3 steps
    assert lrs == pytest.approx([1e-3, 1e-3 * (1 + math.cos(math.pi / 3)) / 2, 1e-3 * (1 + math.cos(2 * math.pi / 3)) / 2,
                                 0.0], abs=1e-12)
    ckpt = load_ckpt(out / "b")
    assert ckpt["scheduler"]["last_epoch"] == 4 and ckpt["step"] == 4


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in records]


@pytest.mark.parametrize("opt", [["--stepsize-groups", "resnet18_blocks"],
                                 ["--optimizer", "AdamW", "--warmup-steps", "2"]], ids=["HF-blocks", "AdamW-cosine"])
def test_resume_equals_uninterrupted(train_mod, data_dir, tmp_path, opt):
    out = tmp_path / "out"
    common = base_argv(data_dir, out, "--num-epochs", "2", *opt)
    assert train_mod.main([*common, "--run-name", "full"]) == 0

    # stop after step 1 (--max-time: this process started long ago), then mid-epoch 2, then finish
    assert train_mod.main([*common, "--run-name", "part", "--max-time", "1"]) == 0
    ckpt = load_ckpt(out / "part")
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (0, 1, 1)
    assert not (out / "part" / "summary.json").exists()
    assert train_mod.main([*common, "--run-name", "part", "--resume", "--stop-at-step", "3"]) == 0
    ckpt = load_ckpt(out / "part")
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 1, 3)
    assert train_mod.main([*common, "--run-name", "part", "--resume"]) == 0

    full, part = load_ckpt(out / "full"), load_ckpt(out / "part")
    for key in ("model", "optimizer", "scheduler", "epoch", "batch", "step", "epoch_sums", "best"):
        assert_same(full[key], part[key], key)
    assert _strip_timing(full["history"]) == _strip_timing(part["history"])
    assert _strip_timing(read_jsonl(out / "full" / "metrics.jsonl")) == \
        _strip_timing(read_jsonl(out / "part" / "metrics.jsonl"))
    sf, sp = (json.loads((out / r / "summary.json").read_text()) for r in ("full", "part"))
    assert sf["best"] == sp["best"] and sf["final"]["test/acc"] == sp["final"]["test/acc"]


@pytest.mark.slow
def test_wandb_offline_records_step_size_curves(data_dir, tmp_path):
    out = tmp_path / "out"
    argv = base_argv(data_dir, out, "--run-name", "w", "--wandb", "--wandb-project", "test",
                     "--stepsize-groups", "resnet18_blocks")
    # in its own process, as users run it: wandb's service and its files end with the process
    p = cli(*argv)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    # every metrics line is a wandb history row, value by value; the summary holds final and best
    # (across resumes by real signals: tests/test_experiments_resume.py)
    rows, summary = assert_wandb_matches_metrics(out / "w", runs=1)
    keys = [f"step_size/block_{i}" for i in range(6)]
    assert [r["step"] for r in rows if set(keys) <= set(r)] == [1, 2]  # every block's curve
    assert summary["test/acc"] == rows[-1]["test/acc"] and summary["best/epoch"] == 1


# ---- command line: the paper's command, signals, errors ------------------------------------------


@pytest.mark.slow
def test_readme_command_from_another_folder(tmp_path):
    write_fake_cifar10(tmp_path / "data", n_train=20, n_test=10)  # ./data, the default --data-dir
    p = cli(*README_COMMAND.split(), "--num-epochs", "1", "--batch-size", "10", "--eval-batch-size", "10",
            cwd=tmp_path)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    assert stdout.strip().splitlines()[-1].startswith("best test acc ")
    assert json.loads((tmp_path / "outputs" / "1" / "summary.json").read_text())["finished"] is True
    assert json.loads((tmp_path / "outputs" / "1" / "config.json").read_text())["max_time"] == "00:05:00"


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", n_train=60, n_test=10)  # 6 batches per epoch
    argv = base_argv(data, tmp_path / "out", "--run-name", "s")
    metrics = tmp_path / "out" / "s" / "metrics.jsonl"
    p = cli(*argv)
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):  # first step done
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert "stopped (SIGTERM)" in stderr and "--resume" in stderr
    ckpt = load_ckpt(tmp_path / "out" / "s")
    assert ckpt["epoch"] == 0 and 1 <= ckpt["batch"] < 6 and ckpt["step"] == ckpt["batch"]
    assert not (tmp_path / "out" / "s" / "summary.json").exists()
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, ckpt["step"] + 1))

    p = cli(*argv, "--resume", "--batch-size", "20")  # another data order: refused, checkpoint untouched
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 2, stderr
    last = stderr.strip().splitlines()[-1]  # a changed --batch-size is refused before the checkpoint loads
    assert last.startswith("error: --resume: ") and "changed flags: --batch-size 10 -> 20" in last
    p = cli(*argv, "--resume")
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    assert "best test acc" in stdout
    records = read_jsonl(metrics)
    assert [r["step"] for r in records if "epoch" not in r] == [1, 2, 3, 4, 5, 6]  # no duplicates, no gaps
    assert [r["epoch"] for r in records if "epoch" in r] == [1]
    assert json.loads((tmp_path / "out" / "s" / "summary.json").read_text())["finished"] is True


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(data_dir, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty-data"
    existing = out / "taken"
    existing.mkdir(parents=True)
    (existing / "checkpoint.pt").write_bytes(b"earlier run")
    (existing / "metrics.jsonl").write_text('{"step": 1}\n')
    cases = {
        "alg-base": (["--alg-base", "Adamax"], "--alg-base"),
        "lion": (["--alg-base", "Lion", "--momentum-param-base", ".99"], "--Lion-beta2-base"),
        "max-time": (["--max-time", "5 minutes"], "--max-time"),
        "no-data": (["--data-dir", str(empty)], "download"),
        # a bad optimizer flag is reported first, not the missing dataset it would have downloaded
        "flag-before-data": (["--data-dir", str(empty), "--alg-meta", "Adam"], "--normalizer-param-meta"),
        "taken": (["--run-name", "taken"], "--resume"),
        "amp": (["--amp", "fp8"], "--amp"),
        "batch": (["--batch-size", "0"], "--batch-size"),
    }
    procs = {name: cli(*base_argv(data_dir, out), *argv) for name, (argv, _) in cases.items()}  # all at once
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 2, (name, stderr)
        err = stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and cases[name][1] in err[0], (name, stderr)
        assert "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["taken"]  # no run folder was created
    assert (existing / "checkpoint.pt").read_bytes() == b"earlier run"
    assert (existing / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not list(empty.rglob("*.part")) and not (empty / "cifar-10-batches-py").exists()
