"""The league (league/): AlgoPerf's scoring against hand-computed profiles, the targets reproduced by
the calibration command, steps_to_target against the runs' own metrics logs, --quick end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from league import scoring
from league.run import load_targets, main, read_metrics, result
from league.workloads import WORKLOADS

INF = math.inf
W = ["w1", "w2", "w3"]


def runs_of(table: dict) -> list[dict]:
    """Records from {(method, workload, grid): [time per seed]}."""
    return [{"method": m, "workload": w, "grid": g, "seed": s, "steps_to_target": t}
            for (m, w, g), times in table.items() for s, t in enumerate(times)]


# w1: A fastest, B twice as slow, C misses on 2 of 3 seeds; w2: A and B tie, C twice as slow;
# w3: every method misses
HAND = runs_of({
    ("A", "w1", None): [10, 9, 11], ("B", "w1", None): [20, None, 20], ("C", "w1", None): [None, None, 5],
    ("A", "w2", None): [30, 30, 30], ("B", "w2", None): [30, 31, 29], ("C", "w2", None): [60, 60, 60],
    ("A", "w3", None): [None] * 3, ("B", "w3", None): [None] * 3, ("C", "w3", None): [None] * 3,
})


def test_median_counts_a_miss_as_infinite():
    assert scoring.median_time([10, None, 12]) == 12
    assert scoring.median_time([None, None, 5]) == INF
    assert scoring.median_time([3, float("nan"), 4]) == 4  # NaN (diverged) is a miss too


def test_scores_match_hand_computed_profiles():
    times = scoring.method_times(HAND)
    assert times["A"] == {"w1": 10, "w2": 30, "w3": INF}
    assert times["C"]["w1"] == INF  # the median of (miss, miss, 5)
    r = scoring.ratios(times, W)
    assert r["A"] == {"w1": 1.0, "w2": 1.0, "w3": INF}
    assert r["B"] == {"w1": 2.0, "w2": 1.0, "w3": INF}  # a tie: both ratio 1
    assert r["C"] == {"w1": INF, "w2": 2.0, "w3": INF}
    assert scoring.profile(r["A"], W, 1.0) == pytest.approx(2 / 3)
    assert scoring.profile(r["B"], W, 1.0) == pytest.approx(1 / 3)
    assert scoring.profile(r["B"], W, 2.0) == pytest.approx(2 / 3)
    assert scoring.profile(r["C"], W, 4.0) == pytest.approx(1 / 3)
    s = scoring.scores(HAND, W, ["A", "B", "C", "D"])
    # the workload every method misses adds 0 to every score but counts in the mean; D never ran
    assert s == pytest.approx({"A": 2 / 3, "B": (2 / 3 + 1) / 3, "C": (2 / 3) / 3, "D": 0.0})
    # the closed form is the integral of the profile from 1 to 4, over 3
    n = 30000
    for m in "ABC":
        integral = sum(scoring.profile(r[m], W, 1 + 3 * (i + 0.5) / n) for i in range(n)) * 3 / n
        assert s[m] == pytest.approx(integral / 3, abs=1e-3)


def test_external_tuning_takes_the_best_grid_value():
    runs = runs_of({("A", "w1", 0.1): [50, 40, 60], ("A", "w1", 1.0): [None, 12, 8], ("A", "w1", 10.0): [None] * 3,
                    ("B", "w1", 1.0): [24, 24, 24]})
    assert scoring.method_times(runs) == {"A": {"w1": 12}, "B": {"w1": 24}}
    assert scoring.scores(runs, ["w1"], ["A", "B"]) == pytest.approx({"A": 1.0, "B": 2 / 3})


def test_a_diverged_run_is_a_miss(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"finished": False, "diverged": True}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 15, "val/acc": 0.99, "train_time": 0.1}) + "\n")
    got = result(tmp_path, WORKLOADS["digits_mlp"], 0.5)
    assert got["steps_to_target"] is None and got["wall_to_target_s"] is None


def test_calibration_reproduces_the_recorded_target(tmp_path):
    recorded = load_targets()["breast_cancer"]
    targets = tmp_path / "targets.json"
    found = main(["--calibrate", "--workloads", "breast_cancer", "--workers", "1", "--save-directory",
                  str(tmp_path), "--targets", str(targets)])
    assert found["breast_cancer"]["lr"] == recorded["lr"]
    assert found["breast_cancer"]["target"] == pytest.approx(recorded["target"], rel=1e-6)
    assert json.loads(targets.read_text())["targets"]["breast_cancer"]["target"] == found["breast_cancer"]["target"]


def test_quick_league_end_to_end(tmp_path, capsys):
    record = main(["--quick", "--workers", "1", "--save-directory", str(tmp_path)])
    root = tmp_path / "league_quick"
    on_disk = json.loads((root / "league.json").read_text())
    assert set(on_disk) >= {"workloads", "runs", "scores"}
    assert set(on_disk["workloads"]) == {"digits_mlp", "lasso"}
    assert set(on_disk["workloads"]["lasso"]) == {"metric", "target", "budget"}
    keys = {"method", "ruleset", "workload", "seed", "grid", "steps_to_target", "wall_to_target_s", "final_metric"}
    assert all(set(r) == keys for r in on_disk["runs"])
    assert {r["ruleset"] for r in on_disk["runs"]} == {"self_tuning", "external_tuning"}
    assert all(r["grid"] is None for r in on_disk["runs"] if r["ruleset"] == "self_tuning")
    for ruleset in ("self_tuning", "external_tuning"):
        for kind in ("steps", "wall"):
            s = on_disk["scores"][ruleset][kind]
            assert set(s) == {"AdamW", "MO(AdamW,Adam)", "Prodigy"} and all(0 <= v <= 1 for v in s.values())
    assert max(on_disk["scores"]["external_tuning"]["steps"].values()) > 0  # someone reached a target
    assert (root / "league.md").read_text().count("| AdamW |") == 2
    assert (root / "profile_self_tuning.png").stat().st_size > 0 and (root / "profile_external_tuning.png").exists()

    # each run's steps_to_target is the first logged step whose metric meets the target
    folders = sorted(p.parent for p in root.glob("runs/*/*/*/metrics.jsonl"))
    assert len(folders) == 30  # 2 workloads x 3 methods x 5 grid values (one of them the default) x 1 seed
    checked = 0
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        wl, target = WORKLOADS[config["workload"]], on_disk["workloads"][config["workload"]]["target"]
        logged = [(r["step"], r[wl.metric], r["train_time"]) for r in read_metrics(folder)]
        assert [s for s, _, _ in logged] == list(range(wl.eval_every, wl.budget + 1, wl.eval_every))
        first = next(((s, t) for s, v, t in logged if (v >= target if wl.higher_is_better else v <= target)),
                     (None, None))
        mine = [r for r in on_disk["runs"] if r["workload"] == config["workload"] and r["method"] == config["method"]
                and r["seed"] == config["seed"] and r["grid"] == config["grid"]]
        for r in mine:
            assert (r["steps_to_target"], r["wall_to_target_s"]) == first
            assert r["final_metric"] == logged[-1][1]
            checked += 1
    assert checked >= 30 and any(r["steps_to_target"] is not None for r in on_disk["runs"])

    # a second call resumes: nothing is run again, and the numbers are the same
    capsys.readouterr()
    again = main(["--quick", "--workers", "1", "--save-directory", str(tmp_path)])
    assert "0 runs to do (30 already done)" in capsys.readouterr().err
    assert again["runs"] == record["runs"]


def test_bad_input_is_one_error_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--seeds", "2", "--save-directory", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --seeds must be an odd count")
    with pytest.raises(SystemExit):
        main(["--workloads", "nope", "--save-directory", str(tmp_path)])
    assert "unknown workload(s) nope" in capsys.readouterr().err


def test_targets_file_is_recorded_with_its_command():
    doc = json.loads((Path(__file__).resolve().parents[1] / "league" / "targets.json").read_text())
    assert doc["command"].startswith("python3 league/run.py --calibrate")
    assert set(doc["targets"]) == set(WORKLOADS)
