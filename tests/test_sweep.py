"""scripts/sweep.py, scripts/summarize.py, scripts/plot.py and scripts/sweeps/*.yaml.

Fast tests: sweep files (parsing, expansion, errors), the sbatch script text, summarize and plot
on synthetic run folders written in the docs/CONTRACTS.md layout. Slow tests (marked `slow`):
a real single-node SLURM cluster on localhost (tests/slurm_cluster.py) runs tiny CIFAR-10 sweeps
on generated data: a 2x2 sweep to the end, its table and figures, a resubmit, signals + requeue +
resume, a plain scancel, and a bad sweep file that never reaches sbatch.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # slurm_cluster, cifar_fixtures, script_modules
from script_modules import load_script  # noqa: E402

sweep = load_script("sweep")
summarize = load_script("summarize")
plot = load_script("plot")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


SWEEP_YAML = """\
experiment: cifar10
name: demo
save_directory: {out}
fixed: {{num-epochs: 2, batch-size: 4, alpha0: 1.0e-3}}
grid:
  stepsize-groups: [scalar, resnet18_blocks]
configs:
  - {{alg-base: AdamW, alg-meta: fixed}}
  - {{alg-base: Lion, alg-meta: Lion, alpha0: [1.0e-6, 1.0e-5]}}
seeds: [0, 1]
slurm: {{partition: short, gpus: 2, cpus_per_task: 3, mem: 5G, time: "01:00:00", throttle: 4,
        stop_margin: 120, signal_before: 90, setup: ["module load cuda"], extra: ["--nice=5"]}}
"""

SWEEP_TOML = """\
experiment = "cifar10"
name = "demo"
save_directory = "{out}"
seeds = [0, 1]

[fixed]
num-epochs = 2
batch-size = 4
alpha0 = 1e-3

[grid]
stepsize-groups = ["scalar", "resnet18_blocks"]

[[configs]]
alg-base = "AdamW"
alg-meta = "fixed"

[[configs]]
alg-base = "Lion"
alg-meta = "Lion"
alpha0 = [1e-6, 1e-5]

[slurm]
partition = "short"
gpus = 2
cpus_per_task = 3
mem = "5G"
time = "01:00:00"
throttle = 4
stop_margin = 120
signal_before = 90
setup = ["module load cuda"]
extra = ["--nice=5"]
"""


def fill_argv(s):
    """What check_flags does, without starting train.py (unit tests)."""
    for job in s.jobs:
        job.argv = [w for k, v in job.flags.items() for w in sweep.flag_args(k, v)]
    return s


# ---- sweep files: parsing and expansion -----------------------------------------------------


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
def test_sweep_file_expands_configs_grid_and_seeds(tmp_path, fmt):
    text = (SWEEP_YAML if fmt == "yaml" else SWEEP_TOML).format(out=tmp_path / "out")
    s = sweep.read_sweep(write(tmp_path / f"demo.{fmt}", text))
    assert s.name == "demo" and s.train == REPO / "cifar10" / "train.py" and s.seeds == [0, 1]
    # (1 AdamW config + 2 Lion alpha0 values) x 2 stepsize groups x 2 seeds
    assert len(s.jobs) == 12 and [j.index for j in s.jobs] == list(range(12))
    first = s.jobs[0]
    assert first.flags == {"num-epochs": 2, "batch-size": 4, "alpha0": 1e-3, "alg-base": "AdamW",
                           "alg-meta": "fixed", "stepsize-groups": "scalar"}
    assert first.seed == 0 and s.jobs[1].seed == 1
    lion = [j for j in s.jobs if j.flags["alg-base"] == "Lion"]
    assert sorted({j.flags["alpha0"] for j in lion}) == [1e-6, 1e-5]  # configs override fixed
    # default names: the flags that vary (paper symbols as prefixes) and the seed; all distinct
    assert first.run_name == "AdamW_fixed_a0.001_scalar_s0"
    assert lion[0].run_name == "Lion_Lion_a1e-06_scalar_s0"
    assert len({j.run_name for j in s.jobs}) == 12
    assert s.slurm["time_s"] == 3600 and s.slurm["setup"] == ["module load cuda"]


def test_run_name_template_seed_count_and_overrides(tmp_path):
    f = write(tmp_path / "t.yaml", "experiment: cifar10\ngrid: {alpha0: [1.0e-4, 1.0e-3]}\nseeds: 3\n"
                                   "run_name: 'x-{alpha0}-{alg_base}-s{seed}'\nfixed: {alg-base: Lion}\n")
    s = sweep.read_sweep(f, ["slurm.partition=gpu", "seeds=[5]", "fixed.num-epochs=7"])
    assert [j.run_name for j in s.jobs] == ["x-0.0001-Lion-s5", "x-0.001-Lion-s5"]
    assert s.slurm["partition"] == "gpu" and s.jobs[0].flags["num-epochs"] == 7
    assert s.name == "t" and s.save_dir == Path("outputs/t")
    assert [j.seed for j in sweep.read_sweep(f).jobs] == [0, 1, 2, 0, 1, 2]


def test_flag_args_values():
    options = {"--dog-averaging", "--no-dog-averaging", "--augment"}
    assert sweep.flag_args("augment", True, options) == ["--augment"]
    assert sweep.flag_args("augment", False, options) == []
    assert sweep.flag_args("dog-averaging", False, options) == ["--no-dog-averaging"]
    assert sweep.flag_args("alpha0", None, options) == []
    assert sweep.flag_args("alpha0", 1e-5) == ["--alpha0", "1e-05"]
    assert sweep.flag_args("alpha0", "1e-5") == ["--alpha0", "1e-5"]  # YAML's 1e-5 is text: passed as written
    assert sweep.flag_args("betas", [0.9, 0.99]) == ["--betas", "0.9", "0.99"]


@pytest.mark.parametrize("text, expected", [
    ("10", 600), ("05:30", 330), ("01:00:00", 3600), ("2-00:00:00", 172800), ("1-12", 129600),
    ("1-00:30", 86400 + 1800),
])
def test_slurm_time(text, expected):
    assert sweep.slurm_seconds(text) == expected


def test_array_spec():
    assert sweep.array_spec([0, 1, 2, 3]) == "0-3"
    assert sweep.array_spec([0, 1, 2, 5, 7, 8], 3) == "0-2,5,7-8%3"
    assert sweep.array_spec([4]) == "4"


BAD_FILES = [
    ("bad.yaml", "experiment: cifar10\ngrid: {alpha0: [1, 2}\n", "not valid YAML (line 2"),
    ("bad.toml", "experiment = cifar10\n", "not valid TOML"),
    ("bad.json", "{}", "unknown sweep file type '.json'"),
    ("bad.yaml", "- just\n- a list\n", "expected a mapping"),
    ("bad.yaml", "experiment: cifar10\ngird: {alpha0: [1]}\n", "unknown key 'gird' (did you mean 'grid'?)"),
    ("bad.yaml", "fixed: {alpha0: 1}\n", "`experiment` is required"),
    ("bad.yaml", "experiment: mnist\n", "experiment 'mnist' has no train.py; accepted: cifar10"),
    ("bad.yaml", "experiment: cifar10\ngrid: [alpha0, 1]\n", "grid must be a mapping"),
    ("bad.yaml", "experiment: cifar10\ngrid: {alpha0: []}\n", "grid.alpha0: empty list"),
    ("bad.yaml", "experiment: cifar10\ngrid: {}\n", "grid is empty"),
    ("bad.yaml", "experiment: cifar10\ngrid:\n", "grid is empty"),
    ("bad.yaml", "experiment: cifar10\nfixed: {alpha0: {a: 1}}\n", "fixed.alpha0: values must be"),
    ("bad.yaml", "experiment: cifar10\nconfigs: {alpha0: 1}\n", "configs must be a non-empty list"),
    ("bad.yaml", "experiment: cifar10\nseeds: [0, x]\n", "seeds must be a list of integers"),
    ("bad.yaml", "experiment: cifar10\nfixed: {seed: 3}\n", "--seed is set by sweep.py (use `seeds:`)"),
    ("bad.yaml", "experiment: cifar10\ngrid: {max-time: [1]}\n", "--max-time is set by sweep.py"),
    ("bad.yaml", "experiment: cifar10\nslurm: {partitoin: gpu}\n", "unknown slurm setting(s) partitoin"),
    ("bad.yaml", "experiment: cifar10\nslurm: {time: 1h}\n", "slurm.time '1h'"),
    ("bad.yaml", "experiment: cifar10\nslurm: {time: '00:05:00', stop_margin: 600}\n", "must be longer than"),
    ("bad.yaml", "experiment: cifar10\nslurm: {gpus: -1}\n", "slurm.gpus must be a non-negative integer"),
    ("bad.yaml", "experiment: cifar10\ngrid: {alpha0: [1, 2]}\nrun_name: same\n", "would share the folder 'same'"),
    ("bad.yaml", "experiment: cifar10\ngrid: {alpha0: [1]}\nrun_name: '{lr}'\n", "run_name '{lr}': field 'lr'"),
    ("bad.yaml", "experiment: cifar10\ngrid: {alpha0: [1]}\nconfigs: [{alpha0: 2}]\n", "both set alpha0"),
]


@pytest.mark.parametrize("name, text, message", BAD_FILES)
def test_malformed_sweep_files_are_clear_errors(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(sweep.SweepError) as e:
        sweep.read_sweep(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_bad_sweep_file_cli_error_and_nothing_submitted(tmp_path):
    """Unknown flag / bad value: one `error:` line naming the file and flag, exit 2, sbatch never called."""
    bin_dir = tmp_path / "bin"
    calls = tmp_path / "sbatch_calls"
    for tool in ("sbatch", "squeue"):
        write(bin_dir / tool, f"#!/bin/sh\necho \"$0 $*\" >> {calls}\nexit 0\n").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    unknown = write(tmp_path / "unknown.yaml", "experiment: cifar10\nsave_directory: out\n"
                                               "grid: {alpah0: [1.0e-4, 1.0e-3]}\n")
    bad_value = write(tmp_path / "value.toml", "experiment = 'cifar10'\nsave_directory = 'out'\n"
                                               "[grid]\nnum-epochs = [2, 'two']\n")
    missing = tmp_path / "missing.yaml"
    # values only the experiment's own checks know (more in test_sweep_check_uses_the_experiments_own_checks)
    base = write(tmp_path / "base.yaml", "experiment: cifar10\nsave_directory: out\n"
                                         "grid: {alg-base: [AdamW, Foo]}\n")
    ts = write(tmp_path / "ts.yaml", "experiment: tinystories\nsave_directory: out\nfixed: {dropout: 1}\n")
    blocks = write(tmp_path / "blocks.yaml", "experiment: cifar10\nsave_directory: out\n"
                                             "fixed: {stepsize-groups: '[1,2]'}\n")  # cannot fit ResNet-18
    cases = [(unknown, "unknown flag --alpah0 for cifar10/train.py (did you mean --alpha0?)"),
             (bad_value, "--num-epochs: invalid int value: 'two'"), (missing, "no such sweep file"),
             (base, ("run 1 (Foo_s0): cifar10/train.py rejects its flags: ", "--alg-base", "'Foo'")),
             (ts, "run 0 (s0): tinystories/train.py rejects its flags: --dropout must be in [0, 1)"),
             (blocks, "rejects its flags: --stepsize-groups: block sizes [1, 2] add up to 3, but the optimizer "
                      "was given 62 parameter tensors")]
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / "sweep.py"), "submit", str(path)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for path, _ in cases]
    for p, (path, expected) in zip(procs, cases):  # started together: each imports torch to check
        stdout, stderr = p.communicate(timeout=300)
        proc = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, proc.stderr
        expected = expected if isinstance(expected, tuple) else (expected,)
        assert len(errors) == 1 and str(path.name) in errors[0] and all(e in errors[0] for e in expected), proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not calls.exists(), "sbatch/squeue must not run for a bad sweep file"
    assert not (tmp_path / "out").exists()


def test_sweep_check_uses_the_experiments_own_checks():
    """scripts/sweep_check.py runs each run's argv through train.py's parse_args: names and values."""
    from cifar_fixtures import load_cifar10_train

    check = load_script("sweep_check")
    train = load_cifar10_train("cifar10_train_sweep_check")
    assert check.rejection(train.parse_args, ["--gamma", "0.5", "--alpha0", "1e-5"]) is None
    for argv, needle in [(["--gamma", "1.5"], "--gamma"), (["--alg-meta", "Foo"], "'Foo'"),
                         (["--meta-stepsize", "inf"], "argument --meta-stepsize: must be a finite number, got inf"),
                         (["--alpha0", "-1e-3"], "--alpha0 must be a finite number in (0.0, inf), got -0.001"),
                         (["--num-epochs", "0"], "--num-epochs must be a positive integer"),
                         (["--max-time", "soon"], "--max-time: cannot read 'soon'"),
                         (["--stepsize-groups", "[1,2]"], "--stepsize-groups: block sizes [1, 2] add up to 3")]:
        message = check.rejection(train.parse_args, argv)
        assert message and needle in message and "\n" not in message, (argv, message)
    options = check.OPTION.findall(check.help_text(REPO / "cifar10" / "train.py", train.parse_args))
    assert "--alpha0" in options and "--stop-at-step" not in options  # hidden test flags are not offered


# ---- the sbatch script ----------------------------------------------------------------------


def test_sbatch_script_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = fill_argv(sweep.read_sweep(write(tmp_path / "demo.yaml", SWEEP_YAML.format(out="out"))))
    done = s.save_dir / s.jobs[1].run_name
    write(done / "summary.json", json.dumps({"finished": True, "final": {}}))
    write(s.save_dir / s.jobs[2].run_name / "summary.json", json.dumps({"finished": False}))  # not finished
    todo = sweep.pending_jobs(s)
    assert [j.index for j in todo] == [0] + list(range(2, 12))
    text = sweep.sbatch_script(s, todo)
    out = (tmp_path / "out").resolve()
    for line in ["#SBATCH --job-name=demo", "#SBATCH --array=0,2-11%4", "#SBATCH --partition=short",
                 "#SBATCH --gres=gpu:2", "#SBATCH --cpus-per-task=3", "#SBATCH --mem=5G", "#SBATCH --time=01:00:00",
                 f"#SBATCH --output={out}/logs/slurm_%A_%a.out", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@90", f"#SBATCH --chdir={tmp_path}", "#SBATCH --nice=5",
                 "MAX_TIME=3480  # seconds: --time (01:00:00) minus stop_margin (120 s)", "module load cuda",
                 f"SAVE_DIR={out}", f"TRAIN={REPO / 'cifar10' / 'train.py'}",
                 "  0) RUN_NAME=AdamW_fixed_a0.001_scalar_s0; SEED=0; ARGS=(--num-epochs 2 --batch-size 4 "
                 "--alpha0 0.001 --alg-base AdamW --alg-meta fixed --stepsize-groups scalar) ;;"]:
        assert line in text.splitlines(), line
    assert "  1) " not in text  # finished: skipped
    assert '--max-time "$MAX_TIME" "$START"' in text and 'scontrol requeue "$TASK"' in text
    assert "START=--resume" in text and "START=--start-over" in text  # --resume from a checkpoint, else afresh
    assert "trap on_usr1 USR1" in text and 'kill -USR1 "$CHILD"' in text
    assert text.index("#SBATCH --job-name") < text.index("set -u")  # every #SBATCH line before the first command
    syntax = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    # no GPUs, no partition: no such lines
    s.slurm.update(gpus=0, partition=None)
    text = sweep.sbatch_script(s, todo)
    assert "--gres" not in text and "--partition" not in text


def test_sbatch_template_and_scripts_pass_shellcheck(tmp_path, monkeypatch):
    """scripts/sweep_job.sh is a real bash file: shellcheck checks it as it stands and as sweep.py fills it in."""
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:  # a system tool: skipped on a fresh machine, as the SLURM tests are; CI must run it
        why = "shellcheck missing (apt-get install -y shellcheck)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the shellcheck test must run: {why}")
        pytest.skip(why)
    monkeypatch.chdir(tmp_path)
    s = fill_argv(sweep.read_sweep(write(tmp_path / "demo.yaml", SWEEP_YAML.format(out="o u t"))))
    s.jobs[0].argv += ["--data-dir", "/path with 'quotes' and $dollars"]
    script = write(tmp_path / "demo.sbatch", sweep.sbatch_script(s, s.jobs))
    for path in (sweep.JOB_TEMPLATE, script):
        proc = subprocess.run([shellcheck, "--shell=bash", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    assert not re.search(r"@[A-Z_]+@", script.read_text())  # every field filled in


def test_print_lists_runs_and_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    s = fill_argv(sweep.read_sweep(write(tmp_path / "demo.yaml", SWEEP_YAML.format(out="out"))))
    write(s.save_dir / s.jobs[0].run_name / "summary.json", '{"finished": true}')
    write(s.save_dir / s.jobs[1].run_name / "checkpoint.pt", "x")
    assert sweep.cmd_print(s, None) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# sweep demo (cifar10/train.py): 12 runs, 1 finished or diverged, 11 to run")
    assert out[1] == "# [0] AdamW_fixed_a0.001_scalar_s0 (finished)"
    assert re.match(r"# python\S* cifar10/train.py ", out[2]) and out[3] == "# [1] AdamW_fixed_a0.001_scalar_s1 (checkpoint)"
    assert re.match(r"python\S* cifar10/train.py --num-epochs 2 ", out[4]) and out[4].endswith(
        "--seed 1 --run-name AdamW_fixed_a0.001_scalar_s1 --save-directory out --resume")


# ---- the paper's sweep files ----------------------------------------------------------------

SWEEP_FILES = sorted((SCRIPTS / "sweeps").glob("*.yaml"))
# tensors of the models the named step-size groups are for
GROUP_TENSORS = {"resnet18_blocks": 62, "transformer_blocks_15m": 56, "resnet50_blocks": 161}


# the paper's values, run by run: tests/test_paper.py


@pytest.mark.slow
def test_paper_sweep_files_pass_their_train_py_and_build_optimizers():
    """Every run of every sweep file parses with its train.py (one check per experiment) and its
    optimizer flags build an optimizer that takes a step."""
    import argparse

    import torch

    from common import harness
    from common.optim_flags import add_optimizer_args, build_optimizer
    from l2o.evaluate import OWN

    l2o_own_optimizers = set(OWN.values())
    by_experiment = {}
    for p in SWEEP_FILES:
        s = sweep.read_sweep(p)
        by_experiment.setdefault(s.train, []).append(s)
    for sweeps in by_experiment.values():
        merged = sweeps[0]
        merged.jobs = [j for s in sweeps for j in s.jobs]
        sweep.check_flags(merged)  # raises SweepError naming the file and the run
        parser = add_optimizer_args(argparse.ArgumentParser(allow_abbrev=False))
        for argv in {tuple(j.argv) for j in merged.jobs}:
            if "--optimizer" in argv and argv[argv.index("--optimizer") + 1] in l2o_own_optimizers:
                continue  # built by l2o/evaluate.py itself (learned, Adam, SGD, Lion with --lr grid, ...)
            args, _ = parser.parse_known_args(list(argv))
            n = GROUP_TENSORS.get(args.stepsize_groups, 4)
            params = [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]
            opt = build_optimizer(params, args)
            loss = sum((q * q).sum() for q in params)
            harness.graph_backward(loss, opt)  # create_graph=True for a --hessian trace
            opt.step()


# ---- summarize and plot on synthetic run folders --------------------------------------------


def write_run(root: Path, name: str, config: dict, records: list[dict], finished=True, summary=None) -> Path:
    """A run folder as common/harness.py writes it (docs/CONTRACTS.md)."""
    run = root / name
    base = {"experiment": "cifar10", "optimizer": "HF", "alg_base": "AdamW", "alg_meta": "Adam", "alpha0": 1e-6,
            "stepsize_groups": "scalar", "num_epochs": 3, "seed": 0, "run_name": name, "save_directory": str(root),
            "data_dir": "/data", "device": "cpu", "log_every": 1, "resume": False, "max_time": None,
            "command": ["cifar10/train.py"], "start_time": "2025-01-01T00:00:00+00:00"}
    write(run / "config.json", json.dumps({**base, **config}, indent=2))
    write(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if finished:
        epochs = [r for r in records if "epoch" in r]
        final = {k: v for k, v in (epochs[-1] if epochs else {}).items() if k not in ("step", "time")}
        write(run / "summary.json", json.dumps(summary or {"finished": True, "final": final, "best": {}, "wall_time": 1}))
    return run


def cifar_records(accs, step_sizes=None, blocks=1):
    records, step = [], 0
    for epoch, acc in enumerate(accs, start=1):
        for _ in range(2):
            step += 1
            alpha = step_sizes(step) if step_sizes else 1e-6
            records.append({"step": step, "time": step * 0.1,
                            **{f"step_size/block_{b}": alpha * (b + 1) for b in range(blocks)}})
        records.append({"step": step, "time": step * 0.1, "epoch": epoch, "train/loss": 2.0 / epoch,
                        "test/loss": 2.5 / epoch, "test/acc": acc})
    return records


@pytest.fixture
def cifar_runs(tmp_path):
    root = tmp_path / "runs"
    accs = {  # (alg_meta, stepsize_groups, alpha0) -> test/acc per epoch of seeds 0, 1, 2
        ("Adam", "scalar", 1e-6): [[10, 20, 30], [12, 22, 32], [14, 24, 34]],
        ("Adam", "scalar", 1e-5): [[20, 30, 40], [22, 32, 42], [24, 34, 44]],
        ("Adam", "resnet18_blocks", 1e-6): [[30, 40, 50], [34, 44, 54]],
        ("fixed", "scalar", 1e-5): [[5, 6, 7], [5, 6, 7], [5, 6]],  # last seed unfinished
    }
    for (meta, groups, alpha0), per_seed in accs.items():
        for seed, acc in enumerate(per_seed):
            grows = (lambda s, a=alpha0: a * (1 + 0.1 * s)) if meta != "fixed" else None
            write_run(root / "sweep", f"{meta}_{groups}_{alpha0}_s{seed}",
                      {"alg_meta": meta, "stepsize_groups": groups, "alpha0": alpha0, "seed": seed},
                      cifar_records(acc, grows, blocks=6 if groups != "scalar" else 1), finished=len(acc) == 3)
    return root, accs


def test_summarize_groups_seeds_mean_std(cifar_runs, tmp_path, capsys):
    root, accs = cifar_runs
    runs = summarize.load_runs([root])
    assert len(runs) == 11
    keys, rows, common = summarize.summarize(runs, ["test/acc", "train/loss"])
    assert keys == ["alg_meta", "alpha0", "stepsize_groups"]  # seed, run_name and paths are not configuration
    assert common["experiment"] == "cifar10" and "seed" not in common and "data_dir" not in common
    by = {(r["alg_meta"], r["stepsize_groups"], r["alpha0"]): r for r in rows}
    row = by[("Adam", "scalar", 1e-6)]
    assert row["runs"] == 3 and row["finished"] == 3
    assert row["final test/acc"][0] == pytest.approx(32) and row["final test/acc"][1] == pytest.approx(2)
    assert row["best train/loss"][0] == pytest.approx(2 / 3)
    fixed = by[("fixed", "scalar", 1e-5)]
    assert fixed["runs"] == 3 and fixed["finished"] == 2
    assert fixed["final test/acc"][0] == pytest.approx((7 + 7 + 6) / 3)  # an unfinished run counts with its last value
    assert fixed["best test/acc"][0] == pytest.approx((7 + 7 + 6) / 3)

    csv_path = tmp_path / "t" / "table.csv"
    assert summarize.main([str(root), "--csv", str(csv_path), "--metrics", "test/acc"]) == 0
    out = capsys.readouterr().out
    assert "11 runs, 4 configurations" in out and "shared: experiment=cifar10, optimizer=HF" in out
    assert "| alg_meta | alpha0 | stepsize_groups | runs (finished) | final test/acc | best test/acc |" in out
    assert "| Adam | 1e-06 | scalar | 3 (3) | 32.00 ± 2.00 | 32.00 ± 2.00 |" in out
    assert "| fixed | 1e-05 | scalar | 3 (2) | 6.67 ± 0.58 | 6.67 ± 0.58 |" in out
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ("alg_meta,alpha0,stepsize_groups,runs,finished,diverged,final test/acc mean,"
                        "final test/acc std,final test/acc n,best test/acc mean,best test/acc std,best test/acc n")
    assert any(line.startswith("Adam,1e-06,scalar,3,3,0,32.0,2.0,3,") for line in lines[1:]) and len(lines) == 5


def test_summarize_default_metrics_single_run_and_errors(tmp_path, capsys):
    run = write_run(tmp_path / "one", "r", {}, cifar_records([50, 60, 70]))
    assert summarize.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "final test/acc | best test/acc | final test/loss" in out and "| 1 (1) | 70.00 | 70.00 |" in out
    assert summarize.main([str(tmp_path / "nope")]) == 2
    assert summarize.main([str(tmp_path)]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert summarize.main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'nope'}: no such folder" in err and "no run folders" in err


def test_summarize_reads_a_wandb_project():
    class FakeRun:
        def __init__(self, i, alpha0, accs):
            self.id, self.name, self.state = f"id{i}", f"run{i}", "finished"
            self.config = {"experiment": "cifar10", "alpha0": alpha0, "seed": i, "run_name": f"run{i}", "_wandb": {}}
            self.rows = [{"_step": k, "step": k, "test/acc": a, "epoch": k} for k, a in enumerate(accs, 1)]
            self.summary = {"test/acc": accs[-1], "best/test/acc": max(accs), "_runtime": 3}

        def scan_history(self):
            return iter(self.rows)

    class FakeApi:
        def runs(self, path):
            assert path == "me/proj"
            return [FakeRun(0, 1e-6, [1, 5, 3]), FakeRun(1, 1e-6, [2, 4, 6]), FakeRun(2, 1e-5, [9, 9, 9])]

    runs = summarize.load_wandb_runs("me/proj", api=FakeApi())
    keys, rows, _ = summarize.summarize(runs, ["test/acc"])
    assert keys == ["alpha0"] and [r["runs"] for r in rows] == [2, 1] and rows[0]["finished"] == 2
    assert rows[0]["final test/acc"][0] == pytest.approx(4.5) and rows[0]["best test/acc"][0] == pytest.approx(5.5)


def continual_records(seed_offset):
    records = []
    for task in range(3):
        for k in range(1, 5):
            step = task * 4 + k
            rec = {"step": step, "time": step, "task": task, "online/acc": 10.0 * task + k + seed_offset,
                   "step_size/block_0": 1e-4 * (1 + step / 100)}
            if k == 4:
                rec.update({"task/train_acc": 50.0, "task/test_acc": 40.0 + task})
            records.append(rec)
    return records


def test_plot_picks_the_figures_the_runs_support(cifar_runs, tmp_path, capsys):
    root, accs = cifar_runs
    for seed in range(2):
        write_run(root / "continual", f"c{seed}", {"experiment": "continual_cifar100", "gamma": 0.999, "seed": seed},
                  continual_records(seed))
    for seed in range(2):  # TinyStories-like: validation loss against iterations, no epochs
        write_run(root / "ts", f"t{seed}", {"experiment": "tinystories", "alg_meta": "fixed", "seed": seed},
                  [{"step": s, "time": s, "val/loss": 5.0 / s + seed} for s in (10, 20, 30)])
    out = tmp_path / "figs"
    assert plot.main([str(root), "--out", str(out)]) == 0
    data = json.loads((out / "plot_data.json").read_text())
    expected = {"cifar10_test_acc", "cifar10_train_loss", "cifar10_alpha0_test_acc",
                "cifar10_step_sizes_AdamW_Adam_alpha0=1e-06_scalar", "cifar10_step_sizes_AdamW_Adam_alpha0=1e-05_scalar",
                "cifar10_step_sizes_AdamW_Adam_alpha0=1e-06_resnet18_blocks",
                "continual_cifar100_online_acc", "continual_cifar100_task_test_acc",
                "continual_cifar100_step_sizes_AdamW_Adam",
                "tinystories_val_loss"}
    assert set(data) == expected  # no step-size figure for fixed steps
    for name in expected:
        for fmt in ("png", "pdf"):
            f = out / f"{name}.{fmt}"
            assert f.stat().st_size > 1000, f
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    curves = {s["label"]: s for s in data["cifar10_test_acc"]["series"]}
    assert data["cifar10_test_acc"]["x"] == "epoch"
    adam = curves["AdamW+Adam α0=1e-06 scalar"]
    assert adam["x"] == [1, 2, 3] and adam["mean"] == pytest.approx([12, 22, 32]) and adam["std"] == pytest.approx([2] * 3)
    assert len(adam["runs"]) == 3 and all("Adam_scalar_1e-06_s" in r for r in adam["runs"])
    fixed = curves["AdamW fixed α=1e-05"]
    assert fixed["x"] == [1, 2]  # the epochs every seed reached
    blocks = data["cifar10_step_sizes_AdamW_Adam_alpha0=1e-06_resnet18_blocks"]["series"]
    assert [s["label"] for s in blocks] == [f"block {b}" for b in range(6)]
    assert blocks[5]["mean"][0] == pytest.approx(6e-6 * 1.1)
    robust = {s["label"]: s for s in data["cifar10_alpha0_test_acc"]["series"]}
    assert set(robust) == {"AdamW+Adam scalar"}  # the only method run with several alpha0
    assert robust["AdamW+Adam scalar"]["x"] == [1e-6, 1e-5] and robust["AdamW+Adam scalar"]["mean"] == \
        pytest.approx([32, 42])
    online = data["continual_cifar100_online_acc"]
    assert online["task_switches"] == [4, 8]
    assert online["series"][0]["mean"][:4] == pytest.approx([1.5, 2.5, 3.5, 4.5])
    assert data["tinystories_val_loss"]["x"] == "step"

    figures = plot.make_figures(summarize.load_runs([root / "sweep"]))
    fig, _ = figures["cifar10_step_sizes_AdamW_Adam_alpha0=1e-06_scalar"]
    assert fig.axes[0].get_yscale() == "log"
    fig, _ = figures["cifar10_test_acc"]
    assert len(fig.axes[0].collections) >= 3  # shaded +- std bands
    assert plot.main([str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert plot.main([str(root), "--out", str(out), "--formats", "gif"]) == 2
    assert "accepted: png, pdf, svg" in capsys.readouterr().err


# ---- a real SLURM cluster -------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm():
    import slurm_cluster

    missing = slurm_cluster.missing_binaries()
    if missing or os.geteuid() != 0:
        why = (f"SLURM binaries missing: {', '.join(missing)} (apt-get install -y slurm-wlm munge)" if missing
               else "the test cluster needs root")
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the SLURM tests must run: {why}")
        pytest.skip(why)
    cluster = slurm_cluster.SlurmCluster.start()  # a failure to start is an error, never a skip
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
    from cifar_fixtures import write_fake_cifar10

    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"), n_train=4, n_test=2)


def tiny_sweep(path: Path, data: Path, name: str, epochs: int, grid: str, seeds="[0, 1]", time_limit="00:10:00"):
    return write(path, f"""\
experiment: cifar10
name: {name}
save_directory: out/{name}
fixed: {{num-epochs: {epochs}, batch-size: 4, eval-batch-size: 2, data-dir: {data}, device: cpu, log-every: 1,
        alg-base: AdamW, alg-meta: Lion}}
grid: {grid}
seeds: {seeds}
slurm: {{gpus: 0, cpus_per_task: 1, mem: 500M, time: "{time_limit}", stop_margin: 60, signal_before: 30, throttle: 2}}
""")


def run_script(cluster, cwd, *args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=cluster.env, capture_output=True,
                          text=True, timeout=timeout)


def submit(cluster, cwd, sweep_file):
    proc = run_script(cluster, cwd, SCRIPTS / "sweep.py", "submit", sweep_file)
    assert proc.returncode == 0, proc.stderr
    return proc


def all_jobs(cluster):
    return cluster.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split()


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def epochs_logged(run_dir: Path) -> int:
    try:
        return sum("epoch" in r for r in read_metrics(run_dir))
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_cluster_sweep_table_figures_and_resubmit(slurm, fake_cifar, tmp_path):
    """A 2x2 sweep (alpha0 x seed) runs to the end as one job array; summarize and plot read it;
    a resubmit finds every run finished and submits nothing."""
    t0 = time.monotonic()
    f = tiny_sweep(tmp_path / "grid.yaml", fake_cifar, "grid", epochs=2, grid="{alpha0: [1.0e-4, 1.0e-3]}")
    proc = submit(slurm, tmp_path, f)
    job = proc.stdout.strip()
    assert re.fullmatch(r"\d+", job) and "4 runs, 0 finished or diverged (skipped), 4 to run" in proc.stderr
    states = slurm.wait_done(job, timeout=600)
    out = (tmp_path / "out" / "grid").resolve()
    names = ["a0.0001_s0", "a0.0001_s1", "a0.001_s0", "a0.001_s1"]
    logs = {n: (out / "logs" / f"{n}.log").read_text() for n in names}
    assert sorted(states) == [f"{job}_{i}" for i in range(4)] and set(states.values()) == {"COMPLETED"}, (states, logs)
    for n in names:
        assert sweep.run_finished(out / n), logs[n]
        assert f"--run-name {n} --save-directory {out} --max-time 540 --start-over" in logs[n]  # nothing to resume

    table = run_script(slurm, tmp_path, SCRIPTS / "summarize.py", out, "--csv", tmp_path / "table.csv")
    assert table.returncode == 0, table.stderr
    assert "4 runs, 2 configurations" in table.stdout
    rows = [line for line in table.stdout.splitlines() if line.startswith("| 0.00")]
    assert len(rows) == 2 and all("| 2 (2) |" in r for r in rows), table.stdout
    finals = [read_metrics(out / n)[-1]["test/acc"] for n in ("a0.001_s0", "a0.001_s1")]
    cell = summarize._cell((sum(finals) / 2, abs(finals[0] - finals[1]) / 2 ** 0.5, 2))
    assert f"| 0.001 | 2 (2) | {cell} | " in table.stdout, table.stdout
    assert len((tmp_path / "table.csv").read_text().splitlines()) == 3

    figs = tmp_path / "figs"
    proc = run_script(slurm, tmp_path, SCRIPTS / "plot.py", out, "--out", figs)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(figs.glob("*.png"))
    assert {p.stem for p in pngs} >= {"cifar10_test_acc", "cifar10_train_loss", "cifar10_alpha0_test_acc"}
    assert all(p.stat().st_size > 1000 for p in pngs)
    data = json.loads((figs / "plot_data.json").read_text())
    for series in data["cifar10_test_acc"]["series"]:
        runs = sorted(Path(r).name for r in series["runs"])
        assert len(runs) == 2 and runs[0].rsplit("_", 1)[0] == runs[1].rsplit("_", 1)[0]
        per_run = [[r["test/acc"] for r in read_metrics(out / n) if "test/acc" in r] for n in runs]
        assert series["mean"] == pytest.approx([sum(v) / 2 for v in zip(*per_run)])

    before = all_jobs(slurm)
    again = run_script(slurm, tmp_path, SCRIPTS / "sweep.py", "submit", f)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stderr
    assert "4 runs, 4 finished or diverged (skipped), 0 to run" in again.stderr
    assert all_jobs(slurm) == before
    print(f"\ncluster 2x2 sweep + summarize + plot + resubmit: {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
def test_cluster_signals_requeue_and_resume(slurm, fake_cifar, tmp_path):
    """USR1 to the batch shell (as `--signal=B:USR1@...` sends it) and SIGTERM to the whole job
    (as a preemption does): train.py checkpoints, the task requeues itself and resumes from the
    checkpoint with --resume, and the run ends with every epoch logged once."""
    t0 = time.monotonic()
    epochs = 16
    f = tiny_sweep(tmp_path / "sig.yaml", fake_cifar, "sig", epochs=epochs, grid="{alpha0: [1.0e-3]}")
    job = submit(slurm, tmp_path, f).stdout.strip()
    out = (tmp_path / "out" / "sig").resolve()
    runs = [out / "s0", out / "s1"]
    for i, (run, how) in enumerate(zip(runs, (["--batch", "--signal=USR1"], ["--full", "--signal=TERM"]))):
        wait_for(lambda run=run: epochs_logged(run) >= 1, 300, f"{run.name} to log its first epoch")
        slurm.run("scancel", *how, f"{job}_{i}")
    states = slurm.wait_done(job, timeout=600)
    logs = [(out / "logs" / f"{run.name}.log").read_text() for run in runs]
    assert set(states.values()) == {"COMPLETED"}, (states, logs)
    for run, log, sig in zip(runs, logs, ("USR1", "TERM")):
        assert f"after SIG{sig}" in log and "requeueing" in log, log
        assert "restart 1" in log and f"resuming from {run}/checkpoint.pt" in log, log
        assert re.search(r"resumed .* at epoch \d+", log), log  # train.py loaded the checkpoint
        assert sweep.run_finished(run)
        records = read_metrics(run)
        assert [r["epoch"] for r in records if "epoch" in r] == list(range(1, epochs + 1))
        steps = [r["step"] for r in records if "epoch" not in r]
        assert steps == list(range(1, epochs + 1))  # one step per epoch, none repeated or lost
    print(f"\ncluster signals + requeue + resume: {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
def test_cluster_time_limit_margin_stops_requeues_and_resumes(slurm, fake_cifar, tmp_path):
    """slurm.time 5 minutes minus a 299.9 s margin: train.py gets --max-time 0.1, so its first attempt
    stops itself with a checkpoint after one step (mid-epoch); the task requeues, resumes and finishes.
    (signal_before 1: SLURM sends the USR1 warning up to a minute early, which would race the margin.)"""
    t0 = time.monotonic()
    f = tiny_sweep(tmp_path / "limit.yaml", fake_cifar, "limit", epochs=1, grid="{alpha0: [1.0e-3]}", seeds="[0]",
                   time_limit="05:00")
    f.write_text(f.read_text().replace("stop_margin: 60, signal_before: 30", "stop_margin: 299.9, signal_before: 1"))
    job = submit(slurm, tmp_path, f).stdout.strip()
    states = slurm.wait_done(job, timeout=600)
    out = (tmp_path / "out" / "limit").resolve()
    log = (out / "logs" / "s0.log").read_text()
    assert states == {f"{job}_0": "COMPLETED"}, log
    assert "--max-time 0.1 --resume" in log and "stopped (--max-time 0.1)" in log and "restart 1" in log, log
    assert "restart 2" not in log
    assert sweep.run_finished(out / "s0")
    assert [r["epoch"] for r in read_metrics(out / "s0") if "epoch" in r] == [1]
    print(f"\ncluster --max-time stop + requeue: {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
def test_cluster_plain_scancel_is_not_requeued(slurm, fake_cifar, tmp_path):
    f = tiny_sweep(tmp_path / "stop.yaml", fake_cifar, "stop", epochs=30, grid="{alpha0: [1.0e-3]}", seeds="[0]")
    job = submit(slurm, tmp_path, f).stdout.strip()
    run = tmp_path / "out" / "stop" / "s0"
    wait_for(lambda: epochs_logged(run) >= 1, 300, "the first epoch")
    slurm.run("scancel", job)
    states = slurm.wait_done(job, timeout=120)
    time.sleep(8)  # longer than the cluster's requeue delay: a requeued task would be back by now
    log = (tmp_path / "out" / "stop" / "logs" / "s0.log").read_text()
    assert slurm.job_states(job) == {f"{job}_0": "CANCELLED"} == states, log
    assert "SIGTERM as the job ends" in log and "not requeued" in log and "restart 1" not in log
    assert (run / "checkpoint.pt").exists() and not sweep.run_finished(run)


@pytest.mark.slow
def test_cluster_bad_sweep_file_submits_nothing(slurm, tmp_path):
    before = all_jobs(slurm)
    bad = write(tmp_path / "bad.yaml", "experiment: cifar10\ngrid: {alpha0: [1.0e-4], momentum: [0.9]}\n")
    proc = run_script(slurm, tmp_path, SCRIPTS / "sweep.py", "submit", bad.name)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("error: bad.yaml: unknown flag --momentum for cifar10")
    assert all_jobs(slurm) == before and not (tmp_path / "outputs").exists()
