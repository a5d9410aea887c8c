"""scripts/quickstart.py: the offline digits quick start (issue 9)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "quickstart.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_reduced_grid_writes_table_figure_and_numbers(tmp_path):
    out = tmp_path / "qs"
    proc = run_script("--alphas", "1e-5,1e-3", "--seeds", "2", "--num-epochs", "2", "--save-directory", str(out))
    assert proc.returncode == 0, proc.stderr
    for label in ("fixed-step AdamW", "MetaOptimize (AdamW, Adam)", "DoG", "Prodigy", "Mechanic (Adam)",
                  "gdtuo (Adam, Adam)", "D-Adaptation Adam", "Schedule-Free AdamW"):
        assert f"\n{label} " in proc.stdout, label
    assert "1e-05" in proc.stdout and "1e-03" in proc.stdout and "| r_eps (relative) |" in proc.stdout
    assert (out / "table.txt").read_text().strip() in proc.stdout
    for name in ("quickstart.png", "quickstart.pdf"):
        assert (out / name).stat().st_size > 1000
    with open(out / "quickstart.csv") as f:
        rows = list(csv.DictReader(f))
    methods = ["fixed", "metaoptimize", "dog", "prodigy", "mechanic", "gdtuo", "dadapt", "schedulefree"]
    assert len(rows) == len(methods) * 2 * 2  # methods x alphas x seeds
    assert [r["method"] for r in rows[::4]] == methods
    result = json.loads((out / "quickstart.json").read_text())
    assert list(result["summary"]) == methods
    steps = 2 * 22  # 2 epochs of ceil(1347 / 64) = 22 mini-batches
    for run in result["runs"]:
        assert len(run["step_sizes"]) == steps
        assert 0.0 <= run["test_acc"] <= 1.0
        if run["method"] in ("fixed", "schedulefree"):  # these never move their step size (no warm-up here)
            assert run["step_sizes"][0] == pytest.approx(run["alpha0"], rel=1e-6)
            assert run["step_sizes"][-1] == pytest.approx(run["alpha0"], rel=1e-6)
    # the initial value reaches each method: Mechanic's and DoG's first steps scale with it
    by = {(r["method"], r["alpha0"], r["seed"]): r for r in result["runs"]}
    for method in ("dog", "gdtuo"):
        assert by[(method, 1e-3, 0)]["step_sizes"][0] > 10 * by[(method, 1e-5, 0)]["step_sizes"][0], method


def test_methods_flag_chooses_the_arms(tmp_path):
    proc = run_script("--alphas", "1e-3", "--seeds", "1", "--num-epochs", "1", "--methods", "fixed,prodigy",
                      "--save-directory", str(tmp_path), "--record", str(tmp_path / "rec" / "qs"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "quickstart.json").read_text())
    assert list(result["summary"]) == ["fixed", "prodigy"] and len(result["runs"]) == 2
    assert (tmp_path / "quickstart.png").stat().st_size > 1000  # no MetaOptimize arm: no trajectory panel
    record = json.loads((tmp_path / "rec" / "qs.json").read_text())  # --record: table, timings, command
    assert record["raw"]["runs"] == 2 and record["raw"]["wall_time_s"] > 0
    assert record["command"].startswith("python3 scripts/quickstart.py --alphas 1e-3")
    assert (tmp_path / "table.txt").read_text().strip() in (tmp_path / "rec" / "qs.md").read_text()


def test_full_batch_and_seed_list(tmp_path):
    proc = run_script("--alphas", "1e-3", "--seeds", "4,7", "--num-epochs", "3", "--batch-size", "0",
                      "--save-directory", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((tmp_path / "quickstart.json").read_text())["runs"]
    assert sorted({r["seed"] for r in runs}) == [4, 7]
    assert all(len(r["step_sizes"]) == 3 for r in runs)  # one step per epoch


def load_script():
    spec = importlib.util.spec_from_file_location("quickstart", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flag, value", [
    ("--alphas", "1e-3,abc"), ("--alphas", "-1e-3"), ("--seeds", "0"), ("--seeds", "1,x"), ("--seeds", "1,1"),
    ("--num-epochs", "0"), ("--batch-size", "-2"), ("--meta-stepsize", "-1"), ("--gamma", "1.5"),
    ("--alg-base", "nope"), ("--alg-meta", "nope"), ("--normalizer-param-meta", "1.2"), ("--methods", "fixed,adam"),
])
def test_bad_input_is_one_error_line_naming_the_flag(capsys, flag, value):
    quickstart = load_script()  # in process: parsing never trains, so no subprocess is needed
    with pytest.raises(SystemExit) as exit_info:
        quickstart.parse_args([flag, value])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and flag in last, last


def test_bad_input_from_the_command_line_exits_2_before_training(tmp_path):
    proc = run_script("--gamma", "-0.5", "--save-directory", str(tmp_path / "never"))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("quickstart.py: error: --gamma ")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_full_grid_metaoptimize_is_robust_to_alpha0(tmp_path):
    # the default grid (5 alpha0 x 3 seeds) of the two arms the paper's claim is about
    proc = run_script("--methods", "fixed,metaoptimize", "--save-directory", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "quickstart.json").read_text())["summary"]
    fixed, meta = summary["fixed"], summary["metaoptimize"]
    # Worst/best are over alpha0 of the mean test accuracy over the 3 default seeds (0, 1, 2).
    # Margins from measured numbers: 24 seeds run with the defaults, split into 8 disjoint
    # triples (0-2, 3-5, ..., 21-23), gave per triple
    #   fixed best (always alpha0 1e-3)          0.970 .. 0.975
    #   MetaOptimize worst                        0.953 .. 0.961  (fixed best - it: 0.010 .. 0.020)
    #   fixed worst (always alpha0 1e-6)          0.110 .. 0.179  (fixed best - it: 0.796 .. 0.861)
    # Seeds 0-2 alone: 0.974, 0.955, 0.142. The margins below are about twice the worst
    # triple's gap (4 points vs 2.0) and well inside the far-below gap (50 points vs >= 78),
    # so a change of seeds or of torch's numerics does not flip them; the run is seeded and
    # deterministic on CPU anyway.
    assert meta["worst"] >= fixed["best"] - 0.04
    assert fixed["worst"] <= fixed["best"] - 0.50
    assert meta["worst"] >= fixed["worst"] + 0.50


@pytest.mark.slow
def test_learning_rate_free_baselines_learn_from_both_ends_of_the_grid(tmp_path):
    proc = run_script("--alphas", "1e-6,1e-2", "--seeds", "1", "--methods", "dog,prodigy,mechanic,gdtuo,dadapt,schedulefree",
                      "--save-directory", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "quickstart.json").read_text())["summary"]
    # Measured with the defaults (seed 0, results/quickstart.md has seeds 0-2): the learning-rate-free
    # baselines reach 0.942 .. 0.978 from initial values 1e-6 and 1e-2 (any seed: >= 0.936);
    # Schedule-Free AdamW, whose lr is not tuned, 0.051 at lr 1e-6. Far-off margins only.
    for method in ("dog", "prodigy", "mechanic", "gdtuo", "dadapt"):
        assert summary[method]["worst"] >= 0.85, method
    assert summary["schedulefree"]["rows"][0]["mean"] <= 0.3
