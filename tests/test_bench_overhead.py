"""scripts/bench_overhead.py (the paper's Table 1) in its --quick mode: every row runs on both real
model families and the results file records the table and the raw measurements."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_overhead.py"


def run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_record(stem: Path, experiments, methods):
    data = json.loads(stem.with_suffix(".json").read_text())
    text = stem.with_suffix(".md").read_text()
    assert data["command"].startswith("python3 scripts/bench_overhead.py --quick") and data["device"] == "cpu"
    assert set(data["raw"]) == set(experiments)
    for exp in experiments:
        rows = data["raw"][exp]["methods"]
        assert list(rows) == methods, list(rows)
        for name, row in rows.items():
            assert len(row["seconds_per_iteration"]) == 1 and row["seconds_per_iteration"][0] > 0, name
            assert row["peak_memory_bytes"] > 0, name  # model copy + gradients + state + activations
        for name in methods:
            assert f"| {name} |" in text
    assert "| AdamW (torch, foreach) | " in text and "| 1.00 |" in text  # the reference row
    return data


def test_quick_metaoptimize_rows_on_the_transformer(tmp_path):
    stem = tmp_path / "res" / "overhead"
    proc = run("--quick", "--experiments", "tinystories", "--methods", "metaoptimize", "--record", str(stem))
    assert proc.returncode == 0, proc.stderr
    data = check_record(stem, ["tinystories"], ["AdamW (torch, foreach)", "AdamW (torch, fused)",
                                                "MetaOptimize (AdamW, Lion) scalar", "MetaOptimize (AdamW, Lion) blocks",
                                                "MetaOptimize (Lion, Lion) scalar"])
    rows = data["raw"]["tinystories"]["methods"]
    # the blocks row really has the model's 7 transformer blocks (56 tensors, as the 15M model)
    assert rows["MetaOptimize (AdamW, Lion) blocks"]["spec"]["stepsize_groups"] == "transformer_blocks_15m"


@pytest.mark.slow
def test_quick_every_row_on_both_models(tmp_path):
    stem = tmp_path / "overhead"
    proc = run("--quick", "--memory-in-process", "--record", str(stem))  # the child path: the test above
    assert proc.returncode == 0, proc.stderr
    methods = ["AdamW (torch, foreach)", "AdamW (torch, fused)", "MetaOptimize (AdamW, Lion) scalar",
               "MetaOptimize (AdamW, Lion) blocks", "MetaOptimize (Lion, Lion) scalar", "DoG (+ averaging)", "Prodigy",
               "Mechanic (Adam)", "gdtuo (Adam, Adam)"]
    data = check_record(stem, ["imagenet", "tinystories"], methods)
    gdtuo = data["raw"]["imagenet"]["methods"]["gdtuo (Adam, Adam)"]["peak_memory_bytes"]
    adamw = data["raw"]["imagenet"]["methods"]["AdamW (torch, foreach)"]["peak_memory_bytes"]
    assert gdtuo > adamw  # gdtuo keeps the last update's graph and its hyper-optimizer's state


def test_bad_flags_are_one_error_line(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_overhead"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)  # parsing runs no benchmark
    for args, flag in ((["--experiments", "mnist"], "--experiments"), (["--steps", "0"], "--steps"),
                       (["--dim", "50", "--n-heads", "6"], "--dim"), (["--warmup", "0"], "--warmup")):
        with pytest.raises(SystemExit) as e:
            module.parse_args(args)
        assert e.value.code == 2, args
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and flag in last, last
