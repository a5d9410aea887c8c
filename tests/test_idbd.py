"""idbd/train.py: Sutton's (1992) tracking task with LMS, IDBD and MetaOptimize (issue 15).

The learners of one run are IDBD step for step; the short tracking task shows Sutton's findings (IDBD
below the best LMS, the irrelevant inputs' step sizes below the relevant ones'); resume is bit-exact;
bad flags are one error line; plot.py draws the two figures from the run folders; the sweep files pass
the experiment's own parser.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_modules import load_script, load_train  # noqa: E402

from common import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
it = load_train("idbd")
pytestmark = pytest.mark.usefixtures("one_thread")


def argv(out, name, *extra):
    return ["--save-directory", str(out), "--run-name", name, "--device", "cpu", *map(str, extra)]


def read_metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# --------------------------------------------------------------------------------------
# The task and the learners
# --------------------------------------------------------------------------------------


def test_the_stream_flips_one_relevant_sign_every_20_examples_and_replays_from_any_chunk():
    task = it.TrackingTask([4, 9], 20, 5, 20, 0.0, "cpu")
    chunks = [task.chunk(c) for c in range(3)]
    xs = torch.cat([c[0] for c in chunks])  # [3000, seeds, 20]
    ys = torch.cat([c[1] for c in chunks])
    for s in range(2):
        # the target between flips: solve y = x s over each block of 20 examples (no noise)
        targets = [torch.linalg.lstsq(xs[b:b + 20, s], ys[b:b + 20, s, None]).solution[:, 0] for b in range(0, 3000, 20)]
        targets = torch.stack(targets)
        torch.testing.assert_close(targets[:, 5:], torch.zeros_like(targets[:, 5:]), atol=1e-9, rtol=0)
        torch.testing.assert_close(targets[:, :5].abs(), torch.ones_like(targets[:, :5]), atol=1e-9, rtol=0)
        changes = (targets[1:, :5].sign() != targets[:-1, :5].sign()).sum(1)
        assert changes.tolist() == [1] * 149  # one relevant sign, every 20 examples
    fresh = it.TrackingTask([4, 9], 20, 5, 20, 0.0, "cpu")  # a resume: chunk 2 without 0 and 1
    for a, b in zip(fresh.chunk(2), chunks[2]):
        assert torch.equal(a, b)
    assert not torch.equal(xs[:, 0], xs[:, 1])  # each seed its own stream


def idbd_reference(xs, ys, theta, alpha0):
    """Sutton's IDBD in the framework's order (spec section 6: alpha from before the meta update):
    the final weights and log step sizes, and the squared error of every example."""
    n = xs.shape[1]
    w, h = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    beta = torch.full((n,), math.log(alpha0), dtype=torch.float64)
    errors = []
    for x, y in zip(xs, ys):
        delta = y - x @ w
        errors.append(float(delta) ** 2)
        alpha = beta.exp()
        beta = beta + theta * delta * x * h
        w = w + alpha * delta * x
        h = h * torch.clamp(1 - alpha * x * x, min=0) + alpha * delta * x
    return w, beta, errors


def test_each_learner_of_a_run_is_idbd_step_for_step(tmp_path):
    """--method idbd with three seeds side by side: the learner of seed 6 ends with the weights and log
    step sizes of a plain IDBD on seed 6's stream, and its asymptotic error is that IDBD's."""
    steps, theta = 1500, 0.02
    assert it.main(argv(tmp_path, "r", "--num-examples", steps, "--measure-last", 500, "--num-seeds", 3, "--seed", 5,
                        "--meta-stepsize", theta, "--log-every", 500)) == 0
    task = it.TrackingTask([6], 20, 5, 20, 0.0, "cpu")
    chunks = [task.chunk(c) for c in range(2)]
    xs, ys = torch.cat([c[0][:, 0] for c in chunks])[:steps], torch.cat([c[1][:, 0] for c in chunks])[:steps]
    w, beta, errors = idbd_reference(xs, ys, theta, 0.05)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(state["model"]["weight"][1], w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["optimizer"]["meta"]["beta"].reshape(3, 20)[1], beta, rtol=1e-10, atol=1e-12)
    assert summary(tmp_path / "r")["final"]["asymptotic_mse/seed6"] == pytest.approx(sum(errors[-500:]) / 500,
                                                                                    rel=1e-9)


# --------------------------------------------------------------------------------------
# Sutton's findings on a short run; the figures drawn from these run folders
# --------------------------------------------------------------------------------------

LMS_ALPHAS = (0.01, 0.03, 0.06)  # LMS is best near 0.03 (idbd/README.md)
SHORT = ("--num-examples", 4000, "--measure-last", 2000, "--num-seeds", 3, "--log-every", 500)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """LMS over its step size, IDBD (theta 0.01), MetaOptimize (SGD, SGD) with hvp, and an LMS that diverges."""
    out = tmp_path_factory.mktemp("idbd")
    torch.set_num_threads(1)
    for alpha in LMS_ALPHAS:
        assert it.main(argv(out, f"lms{alpha}", "--method", "lms", "--alpha0", alpha, *SHORT)) == 0
    for theta in (0.003, 0.01):
        assert it.main(argv(out, f"idbd{theta}", "--meta-stepsize", theta, *SHORT)) == 0
    assert it.main(argv(out, "hvp", "--method", "metaoptimize", "--hessian", "hvp", "--meta-stepsize", 0.01,
                        *SHORT)) == 0
    with pytest.raises(harness.Diverged):
        it.main(argv(out, "lms0.3", "--method", "lms", "--alpha0", 0.3, *SHORT))
    return out


@pytest.mark.slow
def test_short_tracking_task_idbd_beats_the_best_lms_and_shrinks_the_irrelevant_step_sizes(tracking):
    lms = {a: summary(tracking / f"lms{a}")["final"]["asymptotic_mse"] for a in LMS_ALPHAS}
    best = min(lms.values())
    assert min(lms, key=lms.get) not in (LMS_ALPHAS[0], LMS_ALPHAS[-1])  # the grid brackets LMS's best
    idbd = summary(tracking / "idbd0.01")["final"]
    assert idbd["asymptotic_mse"] < 0.75 * best, (idbd["asymptotic_mse"], lms)
    seeds = summary(tracking / "idbd0.01")["seeds"]
    for s in seeds:  # every seed: below LMS's best, irrelevant step sizes well below the relevant ones
        assert idbd[f"asymptotic_mse/seed{s}"] < 0.8 * best
        assert idbd[f"alpha/irrelevant/seed{s}"] < 0.5 * min(0.05, idbd[f"alpha/relevant/seed{s}"])
    records = read_metrics(tracking / "idbd0.01")
    falling = [r["alpha/irrelevant"] for r in records if "alpha/irrelevant" in r]
    assert records[0]["step"] == 0 and falling[0] == pytest.approx(0.05)  # alpha0 at the start
    assert falling[-1] < falling[1] < 0.05  # they fall from alpha0 and keep falling
    assert summary(tracking / "lms0.3")["diverged"] is True


@pytest.mark.slow
def test_plot_draws_sutton_figures_3_and_4_from_the_run_folders(tracking, tmp_path):
    plot = load_script("plot")
    figs = tmp_path / "figs"
    assert plot.main([str(tracking), "--out", str(figs), "--formats", "png"]) == 0
    data = json.loads((figs / "plot_data.json").read_text())
    assert {"idbd_asymptotic_error", "idbd_step_sizes"} <= set(data)
    assert (figs / "idbd_asymptotic_error.png").stat().st_size > 0
    error = {s["label"]: s for s in data["idbd_asymptotic_error"]["series"]}
    lms = next(v for k, v in error.items() if k.startswith("LMS"))
    assert lms["x"] == list(LMS_ALPHAS)  # the diverged step size is left out, and counted in the legend
    assert lms["label"] == "LMS (1 run diverged)" and lms["diverged"] == {"0.3": 1}
    assert len(lms["runs"]) == len(LMS_ALPHAS)
    idbd = next(v for k, v in error.items() if k.startswith("IDBD"))
    assert idbd["x"] == [0.003, 0.01] and all(s > 0 for s in idbd["std"])  # three seeds: a band
    assert data["idbd_asymptotic_error"]["best_lms"]["asymptotic_mse"] == pytest.approx(min(lms["mean"]))
    assert set(error) == {"LMS (1 run diverged)", "IDBD", "MetaOptimize SGD+SGD hvp"}
    panels = {p["title"].split(",")[0]: p for p in data["idbd_step_sizes"]["panels"]}
    assert set(panels) == {"IDBD", "MetaOptimize SGD+SGD hvp"}  # LMS learns no step size
    relevant, irrelevant = (s for s in panels["IDBD"]["series"])
    assert relevant["label"] == "relevant inputs" and irrelevant["mean"][-1] < relevant["mean"][-1]
    # one figure of a kind, from chosen runs
    assert plot.main([str(tracking), "--out", str(figs), "--kind", "idbd-step-sizes", "--where", "method=idbd",
                      "--name", "fig4", "--formats", "png"]) == 0
    assert (figs / "fig4.png").exists()


# --------------------------------------------------------------------------------------
# Run control and flags
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [["--method", "idbd"], ["--method", "metaoptimize", "--hessian", "hvp",
                                                           "--alg-meta", "Adam", "--momentum-param-meta", 0.9]])
def test_resume_equals_uninterrupted(tmp_path, method):
    common = ["--num-examples", 2500, "--measure-last", 1000, "--num-seeds", 2, "--log-every", 250,
              "--checkpoint-every", 1000, *method]
    assert it.main(argv(tmp_path, "straight", *common)) == 0
    assert it.main(argv(tmp_path, "cut", *common, "--stop-at-step", 1300)) == 0  # mid-chunk, between checkpoints
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert it.main(argv(tmp_path, "cut", *common, "--resume")) == 0
    assert read_metrics(tmp_path / "straight") == read_metrics(tmp_path / "cut")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("straight", "cut"))
    assert torch.equal(a["model"]["weight"], b["model"]["weight"])
    assert torch.equal(a["optimizer"]["meta"]["beta"], b["optimizer"]["meta"]["beta"])
    assert summary(tmp_path / "straight")["final"] == summary(tmp_path / "cut")["final"]


def test_scalar_step_sizes_are_one_per_learner(tmp_path):
    """--stepsize-groups scalar: one step size per learner (the block-diagonal trace is then the full product)."""
    assert it.main(argv(tmp_path, "s", "--num-examples", 1000, "--measure-last", 500, "--num-seeds", 2,
                        "--method", "metaoptimize", "--stepsize-groups", "scalar", "--hessian", "block_diagonal")) == 0
    final = summary(tmp_path / "s")["final"]
    for s in (0, 1):
        assert final[f"alpha/relevant/seed{s}"] == pytest.approx(final[f"alpha/irrelevant/seed{s}"], rel=1e-12)
        assert final[f"alpha/relevant/seed{s}"] != pytest.approx(0.05)
    assert final["alpha/relevant/seed0"] != final["alpha/relevant/seed1"]


@pytest.mark.parametrize("flags, needle", [
    (["--method", "idbd", "--alg-base", "AdamW"], "--alg-base AdamW contradicts --method idbd"),
    (["--method", "lms", "--hessian", "hvp"], "--hessian hvp contradicts --method lms"),
    (["--method", "metaoptimize", "--rectify"], "--rectify"),
    (["--method", "metaoptimize", "--stepsize-groups", "layerwise"], "--stepsize-groups layerwise: accepted here"),
    (["--stepsize-groups", "scalar"], "--stepsize-groups scalar contradicts --method idbd"),
    (["--optimizer", "AdamW"], "--optimizer AdamW: this experiment runs MetaOptimize"),
    (["--measure-last", "50", "--num-examples", "10"], "--measure-last 50 is more than --num-examples 10"),
    (["--num-relevant", "30"], "--num-relevant must be in [0, --num-inputs 20]"),
    (["--amp", "bf16"], "--amp and --compile do not apply"),
    (["--method", "metaoptimize", "--alg-meta", "fixed", "--hessian", "hvp"], "--hessian"),
])
def test_bad_flags_are_one_error_line(flags, needle, capsys):
    with pytest.raises((SystemExit, ValueError)) as info:
        it.parse_args(flags)
    text = capsys.readouterr().err.strip() if info.type is SystemExit else f"error: {info.value}"
    assert text.startswith("error: ") and needle in text and "\n" not in text, text


def test_the_sweep_files_pass_the_experiments_parser():
    sweep = load_script("sweep")
    for path in sorted((ROOT / "scripts" / "sweeps").glob("idbd_*.yaml")):
        s = sweep.read_sweep(path)
        sweep.check_flags(s)  # raises SweepError naming the run
        assert all(j.argv[j.argv.index("--method") + 1] in it.METHODS for j in s.jobs)
