"""l2o/ for M-L2O (issue 17): RNNprop, problem families, first-order MAML, curriculum, adaptation, evaluation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from l2o_fixtures import assert_diverged, nan_weights_after, run_as_script
from torch import nn

from l2o import adapt, evaluate, meta_train
from l2o.learned import LearnedOptimizer, load_network
from l2o.meta import Curriculum, FirstOrderMAML, Trajectory, TruncatedBPTT, unroll
from l2o.networks import RNNprop
from l2o.problems import PROBLEMS, LeastSquares, ProblemModel, Rosenbrock, problem_tasks

REPO = Path(__file__).resolve().parents[1]
# meta-training small enough for tests: M-L2O's preset on LASSO, 2 epochs x 2 runs x 40 steps, unroll 20
TINY_ML2O = ["--preset", "ml2o_cpu", "--curriculum", "none", "--epochs", "2", "--runs-per-epoch", "2",
             "--steps-per-run", "40", "--meta-test-runs", "1", "--meta-test-steps", "40", "--log-every", "1"]
TINY_ADAPT = ["--problem", "lasso_ood", "--epochs", "3", "--unrolls", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)


def strip_time(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ml2o_run(tmp_path_factory):
    """A finished tiny M-L2O meta-training on LASSO."""
    out = tmp_path_factory.mktemp("ml2o")
    assert meta_train.main([*TINY_ML2O, "--save-directory", str(out), "--run-name", "m"]) == 0
    return out / "m"


# --------------------------------------------------------------------------------------
# problem families
# --------------------------------------------------------------------------------------


def test_problem_shapes_and_seeds_reproduce():
    for name, families in PROBLEMS.items():
        tasks = problem_tasks(name, 3)
        assert len(tasks) == len(families)
        again, other = problem_tasks(name, 3), problem_tasks(name, 4)
        for a, b, c in zip(tasks, again, other):
            x = a.init_params()["x"]
            assert x.shape == ((128, 2) if name == "rosenbrock" else (128, 10))
            assert torch.equal(x, b.init_params()["x"]) and not torch.equal(x, c.init_params()["x"])
            assert a.loss(a.init_params()).shape == ()
    lasso = problem_tasks("lasso_train", 0)
    assert [t.a.shape for t in lasso] == [(128, 10, 10)] * 3 and [t.l1 for t in lasso] == [0.005] * 3
    # the training families' A scale with sigma = 0.1, 0.5, 1 and y ~ U(0, 1); the targets: sigma 100, y ~ U(-1, 1)
    stds = [t.a.std().item() for t in lasso]
    assert stds[0] == pytest.approx(0.1, rel=0.05) and stds[1] == pytest.approx(0.5, rel=0.05)
    assert stds[2] == pytest.approx(1.0, rel=0.05) and all(t.y.min() >= 0 and t.y.max() <= 1 for t in lasso)
    (target,) = problem_tasks("lasso_ood", 1)
    assert target.a.std().item() == pytest.approx(100, rel=0.05) and target.y.min() < -0.9 and target.y.max() > 0.9
    assert target.x0.std().item() == pytest.approx(0.01, rel=0.1)
    (quadratic,) = problem_tasks("quadratic_ood", 1)
    assert quadratic.l1 == 0.0
    # a seed gives the same instance wherever it is drawn (on the CPU, then moved)
    assert torch.equal(LeastSquares(1.0, 0.0, 1.0).task(5).a, LeastSquares(1.0, 0.0, 1.0).task(5, "cpu").a)


def test_lasso_objective_against_a_direct_computation():
    task = LeastSquares(a_std=2.0, y_low=-1.0, y_high=1.0, l1=0.3, batch=4, dim=3).task(7)
    x = torch.randn(4, 3, dtype=torch.float64).float()
    expected = 0.0
    for b in range(4):
        r = [sum(task.a[b, i, j].item() * x[b, j].item() for j in range(3)) - task.y[b, i].item() for i in range(3)]
        expected += 0.5 * sum(v * v for v in r) + 0.3 * sum(abs(v) for v in x[b].tolist())
    assert task.loss({"x": x}).item() == pytest.approx(expected / 4, rel=1e-5)
    quadratic = LeastSquares(a_std=2.0, y_low=-1.0, y_high=1.0, batch=4, dim=3).task(7)
    assert torch.equal(quadratic.a, task.a)
    assert quadratic.loss({"x": x}).item() == pytest.approx(expected / 4 - 0.3 * x.abs().sum().item() / 4, rel=1e-5)
    # with A invertible, x = A^-1 y zeroes the quadratic
    solution = torch.linalg.solve(quadratic.a.double(), quadratic.y.double())
    assert quadratic.loss({"x": solution.float()}).item() < 1e-8


def test_rosenbrock_minimum():
    task = Rosenbrock(batch=5).task(0)
    assert task.loss({"x": torch.ones(5, 2)}).item() == 0.0
    x = torch.ones(5, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(task.loss({"x": x}), x)
    assert torch.equal(grad, torch.zeros(5, 2))
    assert task.loss({"x": torch.zeros(5, 2)}).item() == 1.0  # (1 - 0)^2 + 100 (0 - 0)^2
    assert task.loss({"x": torch.tensor([[-1.0, 1.0]] * 5)}).item() == 4.0


# --------------------------------------------------------------------------------------
# RNNprop
# --------------------------------------------------------------------------------------


def test_rnnprop_statistics_and_bounded_updates():
    torch.manual_seed(0)
    net = RNNprop()
    g1, g2 = torch.tensor([0.5, -2.0, 1e-3]), torch.tensor([-0.1, 3.0, 1e-3])
    state = net.init_state(3, g1)
    u1, state = net(g1, state)
    u2, state = net(g2, state)
    m, v, t = state[:3]
    b1 = b2 = 0.95
    torch.testing.assert_close(m, b1 * (1 - b1) * g1 + (1 - b1) * g2)
    torch.testing.assert_close(v, b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2)
    assert t.tolist() == [2.0, 2.0, 2.0]
    assert (u1.abs() <= 0.01).all() and (u2.abs() <= 0.01).all()
    # the inputs are Adam's bias-corrected ratios: at t = 1 both are sign(g); scaling g changes nothing
    scaled = net(g1 * 1000, net.init_state(3, g1))[0]
    torch.testing.assert_close(scaled, u1)
    with pytest.raises(ValueError, match="RNNprop"):
        RNNprop(beta1=1.0)


def test_learned_rnnprop_equals_the_functional_unroll_on_a_problem(tmp_path):
    torch.manual_seed(0)
    net = RNNprop()
    (task,) = problem_tasks("lasso_ood", 1)
    traj, _ = unroll(net, task, Trajectory.start(net, task), 30, train=False)
    model = ProblemModel(task)
    opt = LearnedOptimizer(model.parameters(), net)
    for t in range(15):
        opt.zero_grad()
        model(t).backward()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed = ProblemModel(task)
    resumed.weights["x"].data.copy_(model.weights["x"].detach())
    opt2 = LearnedOptimizer(resumed.parameters(), RNNprop())
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for t in range(15, 30):
        opt2.zero_grad()
        resumed(t).backward()
        opt2.step()
    assert torch.equal(resumed.weights["x"].detach(), traj.params["x"])


# --------------------------------------------------------------------------------------
# first-order MAML against a hand-computed example
# --------------------------------------------------------------------------------------


class StepSize(nn.Module):
    """A one-weight "network" for hand computation: update = -w * g."""

    name, state_names = "step_size", ("unused",)

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def config(self):
        return {}

    def init_state(self, n, like):
        return (like.new_zeros(n),)

    def forward(self, grad, state):
        return -self.w * grad, state


class Parabola:
    """f(x) = a x^2 / 2 in one dimension."""

    def __init__(self, a: float, x0: float):
        self.a, self.x0 = a, x0

    def init_params(self):
        return {"x": torch.tensor([self.x0], dtype=torch.float64)}

    def loss(self, params, step=0):
        return 0.5 * self.a * params["x"].square().sum()


def test_maml_inner_step_and_query_gradient_by_hand():
    w, inner_lr, outer_lr = 0.3, 0.1, 0.05
    tasks = [Parabola(a=2.0, x0=1.5), Parabola(a=0.5, x0=-2.0)]
    net = StepSize(w)
    method = FirstOrderMAML(net, torch.optim.SGD(net.parameters(), lr=outer_lr), meta_loss="sum", inner_lr=inner_lr)

    # one step from x with weight w: losses f(x), f((1 - w a) x); d/dw of their sum = -a^2 x^2 (1 - w a)
    def grad_w(a, x, w):
        return -a * a * x * x * (1 - w * a)

    # the inner step alone: phi' = phi - inner_lr * grad of the support loss; the network keeps phi
    adapted, support, _ = method.adapted_weights(tasks[0], Trajectory.start(net, tasks[0]), 1)
    assert adapted["w"].item() == pytest.approx(w - inner_lr * grad_w(2.0, 1.5, w), rel=1e-12)
    assert adapted["w"].item() != w and net.w.item() == w
    assert support.params["x"].item() == pytest.approx((1 - w * 2.0) * 1.5, rel=1e-12)

    starts = [Trajectory.start(net, task) for task in tasks]
    ends, metrics = method.meta_step(tasks, starts, 1)
    query_grads = []
    for task, end in zip(tasks, ends):
        x1 = (1 - w * task.a) * task.x0  # the trajectory moves on by the support window only
        assert end.params["x"].item() == pytest.approx(x1, rel=1e-12) and end.step == 1
        adapted_w = w - inner_lr * grad_w(task.a, task.x0, w)
        query_grads.append(grad_w(task.a, x1, adapted_w))  # the query's gradient, at the adapted weight
    assert net.w.item() == pytest.approx(w - outer_lr * sum(query_grads) / 2, rel=1e-12)
    # not the gradient at the network's own weight (what plain meta-training would use)
    assert net.w.item() != pytest.approx(w - outer_lr * sum(grad_w(t.a, (1 - w * t.a) * t.x0, w) for t in tasks) / 2)
    x1s = [(1 - w * t.a) * t.x0 for t in tasks]
    query = [0.5 * t.a * x * x * (1 + (1 - (w - inner_lr * grad_w(t.a, t.x0, w)) * t.a) ** 2) for t, x in zip(tasks, x1s)]
    assert metrics["meta/objective"].item() == pytest.approx(sum(query) / 2, rel=1e-12)


def test_plain_meta_step_averages_the_tasks_gradients():
    w, lr = 0.3, 0.05
    tasks = [Parabola(a=2.0, x0=1.5), Parabola(a=0.5, x0=-2.0)]
    net = StepSize(w)
    method = TruncatedBPTT(net, torch.optim.SGD(net.parameters(), lr=lr), meta_loss="sum")
    method.meta_step(tasks, [Trajectory.start(net, t) for t in tasks], 1)
    expected = sum(-t.a * t.a * t.x0 * t.x0 * (1 - w * t.a) for t in tasks) / 2
    assert net.w.item() == pytest.approx(w - lr * expected, rel=1e-12)


def test_curriculum_advances_and_stops_as_the_authors_code():
    c = Curriculum([100, 200, 500], min_evals=3)
    assert (c.steps, c.test_steps) == (100, 200)
    assert [c.record(x) for x in (5.0, 4.0, 4.5, 3.0, 3.5)] == ["improved", "improved", "advance", "improved",
                                                                 "advance"]
    c = Curriculum([100, 200, 500], min_evals=3)
    assert [c.record(x) for x in (5.0, 6.0, 7.0)] == ["improved", "continue", "advance"]
    c.advance()
    c.start_stage(9.0)
    assert (c.steps, c.test_steps) == (200, 500)
    assert [c.record(x) for x in (9.5, 9.0, 10.0)] == ["continue", "continue", "stop"]
    c.advance()
    c.advance()
    assert (c.steps, c.test_steps) == (500, 500)  # the last horizon repeats
    other = Curriculum([100, 200, 500])
    other.load_state_dict(c.state_dict())
    assert other.state_dict() == c.state_dict()


# --------------------------------------------------------------------------------------
# meta-training, adaptation, evaluation
# --------------------------------------------------------------------------------------


def test_ml2o_meta_training_then_adaptation_beats_the_untrained_optimizer(tmp_path, ml2o_run):
    summary = json.loads((ml2o_run / "summary.json").read_text())
    assert summary["finished"] and summary["meta_steps"] == 8
    network, config = load_network(ml2o_run)
    assert isinstance(network, RNNprop) and config["method"] == "ml2o" and config["problem"] == "lasso_train"
    records = [json.loads(line) for line in (ml2o_run / "metrics.jsonl").read_text().splitlines()]
    assert all("meta/support_objective" in r for r in records if "meta/objective" in r)

    assert adapt.main([*TINY_ADAPT, "--checkpoint", str(ml2o_run), "--save-directory", str(tmp_path),
                       "--run-name", "adapted"]) == 0
    adapted = json.loads((tmp_path / "adapted" / "summary.json").read_text())
    assert adapted["final"]["adapt/final_loss"] < adapted["initial"]["adapt/final_loss"]
    assert json.loads((tmp_path / "adapted" / "config.json").read_text())["protocol"] == "M-L2O"
    # the test: 100 steps on the fixed optimizee of seed 1, the adapted network against an untrained one
    torch.manual_seed(0)
    untrained = tmp_path / "untrained.pt"
    torch.save({"network": {"name": "rnnprop", "config": RNNprop().config(), "state_dict": RNNprop().state_dict()}},
               untrained)
    finals = {}
    for name, checkpoint in (("ml2o", tmp_path / "adapted"), ("untrained", untrained)):
        argv = ["--optimizer", "L2O", "--checkpoint", str(checkpoint), "--problem", "lasso_ood", "--seed", "1",
                "--num-steps", "100", "--save-directory", str(tmp_path / "eval"), "--run-name", name]
        assert evaluate.main(argv) == 0
        finals[name] = json.loads((tmp_path / "eval" / name / "summary.json").read_text())["final"]
    assert finals["ml2o"]["train/final_loss"] < 0.5 * finals["untrained"]["train/final_loss"]
    assert finals["ml2o"]["train/loss_sum"] < 0.5 * finals["untrained"]["train/loss_sum"]
    config = json.loads((tmp_path / "eval" / "ml2o" / "config.json").read_text())
    assert config["l2o_protocol"] == "M-L2O" and config["l2o_problem"] == "lasso_train"


def test_ml2o_meta_training_resume_equals_uninterrupted(tmp_path, ml2o_run):
    argv = [*TINY_ML2O, "--save-directory", str(tmp_path), "--run-name", "r"]
    assert meta_train.main([*argv, "--stop-at-step", "3"]) == 0  # mid-run: run 2, step 20 of 40
    assert meta_train.main([*argv, "--resume"]) == 0
    a = torch.load(ml2o_run / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["best_network"][k], b["best_network"][k]) for k in a["best_network"])
    assert a["history"] == b["history"]
    assert strip_time(ml2o_run / "metrics.jsonl") == strip_time(tmp_path / "r" / "metrics.jsonl")


def test_adaptation_resume_equals_uninterrupted(tmp_path, ml2o_run):
    argv = [*TINY_ADAPT, "--checkpoint", str(ml2o_run), "--save-directory", str(tmp_path)]
    assert adapt.main([*argv, "--run-name", "a"]) == 0
    assert adapt.main([*argv, "--run-name", "b", "--stop-at-step", "3"]) == 0  # mid-epoch 2
    assert not (tmp_path / "b" / "summary.json").exists()
    assert adapt.main([*argv, "--run-name", "b", "--resume"]) == 0
    a, b = (load_network(tmp_path / n)[0].state_dict() for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip_time(tmp_path / "a" / "metrics.jsonl") == strip_time(tmp_path / "b" / "metrics.jsonl")
    # vanilla L2O: a fresh network, seeded
    assert adapt.main([*TINY_ADAPT, "--save-directory", str(tmp_path), "--run-name", "v", "--epochs", "1"]) == 0
    assert json.loads((tmp_path / "v" / "config.json").read_text())["protocol"] == "vanilla L2O"


def test_adaptation_divergence_keeps_the_last_finite_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    nan_weights_after(monkeypatch, TruncatedBPTT, 3)  # epoch 2's first window; its second gets a NaN objective
    run_dir = tmp_path / "nan"
    argv = [*TINY_ADAPT, "--save-directory", str(tmp_path), "--run-name", "nan"]
    assert_diverged(run_dir, *run_as_script(adapt.main, argv, capsys), 4, "meta/objective is nan", kept=2)
    network, _ = load_network(run_dir)  # the network adapted for one epoch, finite
    assert all(torch.isfinite(p).all() for p in network.parameters())


def test_curriculum_advances_then_stops_in_meta_training(tmp_path):
    # an Adam step of 1e-30 leaves every weight as it is: the first meta-test improves on nothing (inf),
    # the second equals it (advance to the next horizon), the one after equals the new baseline (stop)
    argv = [*TINY_ML2O, "--curriculum", "20,40", "--curriculum-min-evals", "1", "--epochs", "5", "--runs-per-epoch",
            "1", "--meta-lr", "1e-30", "--method", "l2o", "--save-directory", str(tmp_path), "--run-name", "c"]
    assert meta_train.main(argv) == 0
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["converged"] and summary["curriculum"] == {"stage": 1, "horizon": 40}
    assert summary["best"]["curriculum/horizon"] == 40 and summary["final"]["epoch"] == 3
    records = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    horizons = [r["curriculum/horizon"] for r in records if "curriculum/horizon" in r]
    assert horizons == [20, 20, 20, 40, 40]  # initial, epochs 1-2, the new stage's baseline, epoch 3


def test_evaluate_references_on_a_problem(tmp_path):
    for name, flags in {"adam": ["--optimizer", "Adam", "--lr", "0.01"],
                        "hf": ["--optimizer", "HF", "--alg-base", "AdamW", "--alg-meta", "Adam", "--alpha0", "1e-3",
                               "--weight-decay-base", "0", "--normalizer-param-meta", "0.999"]}.items():
        for problem in ("quadratic_ood", "rosenbrock"):
            argv = [*flags, "--problem", problem, "--seed", "2", "--num-steps", "50", "--save-directory",
                    str(tmp_path), "--run-name", f"{name}-{problem}"]
            assert evaluate.main(argv) == 0
            records = [json.loads(line) for line in (tmp_path / f"{name}-{problem}" / "metrics.jsonl").read_text()
                       .splitlines()]
            assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 51))
            assert records[-1]["train/final_loss"] < records[0]["train/loss"]
            assert not any(k.startswith("sym/") for r in records for k in r)


@pytest.mark.parametrize("script, argv, message", [
    ("evaluate.py", ["--optimizer", "Adam", "--problem", "lasso_train"],
     "error: --problem lasso_train is a training mix of 3 families; evaluate on one problem"),
    ("evaluate.py", ["--optimizer", "Adam", "--problem", "lasso_ood", "--optimizee", "relu"],
     "error: --problem lasso_ood and --optimizee relu: choose one"),
    ("meta_train.py", ["--preset", "ml2o_cpu", "--method", "l2o", "--reg", "rescale"],
     "error: --reg rescale: the synthetic problem lasso_train has no network symmetries"),
    ("meta_train.py", ["--preset", "cpu", "--method", "ml2o", "--reg", "all"],
     "error: --reg all: the symmetry regularisation is for --method l2o only"),
    ("meta_train.py", ["--preset", "ml2o_cpu", "--preproc-p", "5"],
     "error: --preproc-p: the rnnprop network has no such setting"),
    ("meta_train.py", ["--preset", "ml2o_cpu", "--curriculum", "100,x"], "error: argument --curriculum: expected"),
    ("adapt.py", ["--problem", "lasso_ood", "--checkpoint", "/nonexistent"],
     "error: no meta-training checkpoint at /nonexistent"),
    ("adapt.py", ["--problem", "lasso_ood", "--checkpoint", "x", "--hidden-size", "8"],
     "error: --hidden-size: the network comes from --checkpoint x"),
    ("adapt.py", ["--problem", "nope"], "error: argument --problem: invalid choice: 'nope'"),
])
def test_bad_input_is_one_error_line(tmp_path, script, argv, message):
    out = subprocess.run([sys.executable, str(REPO / "l2o" / script), *argv, "--save-directory", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr
    assert "Traceback" not in out.stderr


def test_plot_draws_the_ml2o_curves_and_table(tmp_path, ml2o_run):
    sys.path.insert(0, str(REPO / "scripts"))
    import plot

    assert adapt.main([*TINY_ADAPT, "--checkpoint", str(ml2o_run), "--epochs", "1", "--save-directory",
                       str(tmp_path / "adapt"), "--run-name", "ml2o"]) == 0
    runs = {"ml2o": ["--optimizer", "L2O", "--checkpoint", str(tmp_path / "adapt" / "ml2o")],
            "direct": ["--optimizer", "L2O", "--checkpoint", str(ml2o_run)],
            "adam": ["--optimizer", "Adam", "--lr", "0.01"]}
    for name, argv in runs.items():
        for seed in ("1", "2"):
            assert evaluate.main([*argv, "--problem", "lasso_ood", "--num-steps", "20", "--seed", seed,
                                  "--save-directory", str(tmp_path / "eval"), "--run-name", f"{name}-{seed}"]) == 0
    out = tmp_path / "figs"
    assert plot.main([str(tmp_path / "eval"), "--out", str(out), "--formats", "png"]) == 0
    data = json.loads((out / "plot_data.json").read_text())
    figure = data["l2o_problem_lasso_ood"]
    labels = [s["label"] for s in figure["series"]]
    assert labels == ["M-L2O", "M-L2O without adaptation", "Adam lr=0.01"]
    table = {row["label"]: row for row in figure["final"]}
    assert set(table) == set(labels) and table["Adam lr=0.01"]["runs"] == 2
    finals = [json.loads((tmp_path / "eval" / f"adam-{s}" / "summary.json").read_text())["final"]["train/final_loss"]
              for s in ("1", "2")]
    assert table["Adam lr=0.01"]["mean"] == pytest.approx(sum(finals) / 2)
    assert math.isfinite(table["M-L2O"]["std"])
    assert (out / "l2o_problem_lasso_ood.png").exists()


@pytest.mark.parametrize("suffix", ["", "_cpu"])
def test_sweep_files_chain_meta_training_adaptation_and_test(suffix):
    """ml2o_eval's checkpoints are exactly the run folders of ml2o_meta and ml2o_adapt, which start from ml2o_meta's."""
    sys.path.insert(0, str(REPO / "scripts"))
    import sweep

    meta, adapted, test = (sweep.read_sweep(REPO / "scripts" / "sweeps" / f"ml2o_{kind}{suffix}.yaml")
                           for kind in ("meta", "adapt", "eval"))
    folders = lambda s: {str(s.save_dir / j.run_name) for j in s.jobs}  # noqa: E731
    assert {j.flags["method"] for j in meta.jobs} == {"ml2o", "l2o"}
    assert {j.flags["checkpoint"] for j in adapted.jobs} == {"none"} | folders(meta)
    assert {j.flags["checkpoint"] for j in test.jobs if "checkpoint" in j.flags} == folders(meta) | folders(adapted)
    adapted_on = {str(adapted.save_dir / j.run_name): j.flags["problem"] for j in adapted.jobs}
    assert all(adapted_on[j.flags["checkpoint"]] == j.flags["problem"] for j in test.jobs
               if j.flags.get("checkpoint") in adapted_on)  # each target tested with the networks adapted to it
    assert test.seeds == list(range(1, 11)) and {j.flags["num-steps"] for j in test.jobs} == {1000}
    per_problem = {}
    for j in test.jobs:
        per_problem.setdefault(j.flags["problem"], set()).add(j.flags.get("checkpoint", j.flags["optimizer"]))
    assert set(per_problem) == {"lasso_ood", "quadratic_ood", "rosenbrock"}
    assert all(len(methods) == 7 for methods in per_problem.values())  # 4 protocols, M-L2O unadapted, Adam, HF
