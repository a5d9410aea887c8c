"""The paper's figures and tables: the sweep files against the paper's configurations, the index
scripts/paper.py, and the figure kinds of scripts/plot.py drawn from generated run folders.

The tables below are written from the paper (Appendix C's Tables 2-5, the text of sections 7.1-7.2
and the baselines' protocols; spec section 7), not from the sweep files: a sweep file that drifts
from the paper fails here.
"""

import glob
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest
from script_modules import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


sweep = load_script("sweep")

# ---- the paper's configurations -------------------------------------------------------------

# optimizer flags compared run by run (a flag a run does not set is None)
BASE_KEYS = ("optimizer", "alg-base", "alg-meta", "alpha0", "momentum-param-base", "normalizer-param-base",
             "weight-decay-base", "Lion-beta2-base", "momentum-param-meta", "normalizer-param-meta",
             "Lion-beta2-meta", "lr", "warmup-steps")
LR_FREE_KEYS = ("optimizer", "dog-reps-rel", "mechanic-base", "mechanic-s-init", "gdtuo-base", "gdtuo-hyper")

# base updates: (rho, lambda, kappa, c) of Table 2
ADAMW = {"alg-base": "AdamW", "momentum-param-base": 0.9, "normalizer-param-base": 0.999, "weight-decay-base": 0.1}
LION = {"alg-base": "Lion", "momentum-param-base": 0.99, "weight-decay-base": 0.1, "Lion-beta2-base": 0.9}
RMSPROP = {"alg-base": "RMSProp", "normalizer-param-base": 0.999, "weight-decay-base": 0.1}
SGDM = {"alg-base": "SGDm", "momentum-param-base": 0.9, "weight-decay-base": 0.1}
# meta updates: (rho_bar, lambda_bar, c_bar)
ADAM_META = {"alg-meta": "Adam", "momentum-param-meta": 0.9, "normalizer-param-meta": 0.999}
LION_META = {"alg-meta": "Lion", "momentum-param-meta": 0.99, "Lion-beta2-meta": 0.9}
FIXED = {"alg-meta": "fixed"}
STEPS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]  # the fixed-step grid of Appendix C


def hf(base, meta, alpha0, groups=("scalar",)):
    """MetaOptimize rows: one per step-size grouping (None for a fixed step)."""
    row = {"optimizer": "HF", **base, **meta, "alpha0": alpha0}
    return [(row, None if meta is FIXED else g) for g in groups]


def cosine(warmup, peaks):
    return [({"optimizer": "AdamW", "warmup-steps": warmup, "momentum-param-base": 0.9,
              "normalizer-param-base": 0.999, "weight-decay-base": 0.1, "lr": lr}, None) for lr in peaks]


def fixed_grid(*bases):
    return [row for base in bases for a in STEPS for row in hf(base, FIXED, a)]


def lr_free():
    """Figure 5/6 protocols: DoG's r_eps grid, Prodigy's defaults, Mechanic on SGDm/Lion/Adam with the
    package's s_init and with MetaOptimize's alpha0 (1e-6), gdtuo with Adam at both levels."""
    rows = [{"optimizer": "DoG", "dog-reps-rel": r} for r in (1e-9, 1e-8, 1e-7, 1e-6)]
    rows += [{"optimizer": "Prodigy"}]
    rows += [{"optimizer": "Mechanic", "mechanic-base": b, "mechanic-s-init": s}
             for b in ("SGDm", "Lion", "Adam") for s in (1e-8, 1e-6)]
    rows += [{"optimizer": "gdtuo", "gdtuo-base": "Adam", "gdtuo-hyper": "Adam"}]
    return [(r, None) for r in rows]


BLOCKS = ("scalar", "resnet18_blocks")
# sweep file -> (rows, seeds, flags every run has)
PAPER = {
    # Figure 1, Table 2: four combinations, scalar and blockwise, against their tuned fixed steps
    "cifar10_combinations": (
        hf(ADAMW, FIXED, 1e-5) + hf(ADAMW, ADAM_META, 1e-6, BLOCKS)
        + hf(LION, FIXED, 1e-4) + hf(LION, LION_META, 1e-6, BLOCKS)
        + hf(RMSPROP, FIXED, 1e-5) + hf(RMSPROP, ADAM_META, 1e-6, BLOCKS)
        + hf(SGDM, FIXED, 1e-3) + hf(SGDM, ADAM_META, 1e-6, BLOCKS),
        3, {"num-epochs": 60, "batch-size": 100}),
    # Figure 2: (Lion, Lion) scalar from alpha0 1e-9
    "cifar10_alpha0": ([r for a in (1e-9, 1e-8, 1e-7, 1e-6) for r in hf(LION, LION_META, a)],
                       3, {"num-epochs": 60, "batch-size": 100}),
    "cifar10_baselines": (fixed_grid(ADAMW, LION, RMSPROP, SGDM), 3, {"num-epochs": 60, "batch-size": 100}),
    # Figure 4, Table 3
    "imagenet": (hf(ADAMW, FIXED, 1e-5) + hf(ADAMW, LION_META, 1e-6, BLOCKS) + hf(LION, FIXED, 1e-5)
                 + hf(LION, LION_META, 1e-6, BLOCKS) + hf(SGDM, LION_META, 1e-5) + cosine(10000, [1e-5, 1e-4, 1e-3]),
                 1, {"epochs": 90, "batch-size": 256}),
    "imagenet_baselines": (fixed_grid(ADAMW, LION), 1, {"epochs": 90, "batch-size": 256}),
    "imagenet_lr_free": (lr_free(), 1, {"epochs": 90, "batch-size": 256}),
    # Figure 6, Table 5: the text's (AdamW, Lion) and the table's (AdamW, Adam)
    "tinystories": (hf(ADAMW, FIXED, 1e-5) + hf(ADAMW, LION_META, 1e-6) + hf(ADAMW, ADAM_META, 1e-6)
                    + hf(LION, FIXED, 1e-4) + hf(LION, LION_META, 1e-6) + cosine(1000, [1e-5, 1e-4, 1e-3]),
                    1, {"max-iters": 30000, "batch-size": 128, "seq-len": 256, "dim": 288, "n-layers": 6,
                        "n-heads": 6}),
    "tinystories_baselines": (fixed_grid(ADAMW, LION), 1, {"max-iters": 30000, "batch-size": 128, "seq-len": 256}),
    "tinystories_lr_free": (lr_free(), 1, {"max-iters": 30000, "batch-size": 128, "seq-len": 256}),
    # Figure 7: 10 tasks, batch 1, 5 seeds
    "continual_cifar100": (hf(ADAMW, FIXED, 1e-4) + hf(ADAMW, ADAM_META, 1e-4, ("scalar", "last_layer_and_others")),
                           5, {"batch-size": 1, "classes-per-task": 10, "epochs-per-task": 1}),
    "continual_cifar100_baselines": (fixed_grid(ADAMW), 5, {"batch-size": 1, "classes-per-task": 10}),
}
# the MetaOptimize paper's sweeps (l2o_*, ml2o_*: the learned-optimizer papers', tested in test_l2o.py, test_ml2o.py;
# idbd_*: Sutton 1992, tested in test_idbd.py)
SWEEP_FILES = {p.stem: p for p in sorted((SCRIPTS / "sweeps").glob("*.yaml"))
               if not p.stem.startswith(("l2o_", "ml2o_", "idbd_"))}


def test_every_sweep_file_is_in_the_table():
    assert set(SWEEP_FILES) == set(PAPER)


def _canonical(flags: dict, keys) -> tuple:
    return tuple((k, flags.get(k)) for k in keys)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_sweep_file_expands_to_the_papers_runs(name):
    rows, seeds, shared = PAPER[name]
    s = sweep.read_sweep(SWEEP_FILES[name])
    assert s.seeds == list(range(seeds))
    assert len(s.jobs) == len(rows) * seeds  # no run more, none fewer
    keys = LR_FREE_KEYS if name.endswith("_lr_free") else BASE_KEYS
    expected = sorted(repr((_canonical(r, keys), g)) for r, g in rows for _ in range(seeds))
    got = []
    for job in s.jobs:
        f = job.flags
        meta = f.get("alg-meta")
        groups = None if f.get("optimizer") != "HF" or meta == "fixed" else f.get("stepsize-groups", "scalar")
        got.append(repr((_canonical(f, keys), groups)))
        for k, v in shared.items():
            assert f.get(k) == v, (job.run_name, k)
        if f.get("optimizer") == "HF" and meta != "fixed":  # eta 1e-3 everywhere; gamma 1 but continual's .999
            assert f.get("meta-stepsize") == 1e-3, job.run_name
            assert f.get("gamma") == (0.999 if name == "continual_cifar100" else 1.0), job.run_name
    assert sorted(got) == expected


# ---- scripts/paper.py and the figures, from run folders generated for every sweep ---------------

paper = load_script("paper")
summarize = load_script("summarize")
plot = load_script("plot")

BLOCK_COUNT = {"resnet18_blocks": 6, "last_layer_and_others": 2}


def _config(experiment: str, flags: dict, seed: int, run_name: str, save_dir: Path) -> dict:
    """config.json as the harness writes it: every parsed flag (argparse dest names), defaults included."""
    import argparse

    from common.optim_flags import add_optimizer_args

    argv = [w for k, v in flags.items() for w in sweep.flag_args(k, v)]
    defaults, _ = add_optimizer_args(argparse.ArgumentParser()).parse_known_args(argv)
    config = {**vars(defaults), **{k.replace("-", "_"): v for k, v in flags.items()}}
    return {**config, "experiment": experiment, "seed": seed, "run_name": run_name,
            "save_directory": str(save_dir), "command": [f"{experiment}/train.py", *argv]}


def _records(experiment: str, config: dict, seed: int) -> list[dict]:
    """Metrics shaped like each experiment's (docs/CONTRACTS.md), different per configuration."""
    moves = config["optimizer"] != "HF" or config["alg_meta"] != "fixed"
    blocks = BLOCK_COUNT.get(config["stepsize_groups"], 1) if config["optimizer"] == "HF" else 1
    alpha = config["alpha0"] if config["optimizer"] == "HF" else 1e-3
    quality = (hash(json.dumps(config, sort_keys=True, default=str)) % 1000) / 100 + seed  # a per-config offset
    records, step = [], 0
    if experiment == "continual_cifar100":
        for task in range(3):
            for k in range(1, 5):
                step += 1
                r = {"step": step, "time": step, "task": task, "online/acc": 10 + quality + step,
                     **{f"step_size/block_{b}": alpha * (1 + 0.1 * step * moves * (b + 1)) for b in range(blocks)}}
                if k == 4:
                    r.update({"task/train_acc": 50.0 + task, "task/test_acc": 40.0 + task + quality})
                records.append(r)
        return records
    if experiment == "tinystories":
        for step in (10, 20, 30):
            records.append({"step": step, "time": step, "train/loss": 5 - step / 10 + quality / 100,
                            "step_size/block_0": alpha * (1 + step * moves)})
            records.append({"step": step, "time": step, "train/loss": 5 - step / 10, "val/loss": 5.5 - step / 10
                            + quality / 100})
        return records
    for epoch in (1, 2, 3):
        for _ in range(2):
            step += 1
            records.append({"step": step, "time": step,
                            **{f"step_size/block_{b}": alpha * (1 + 0.1 * step * moves * (b + 1)) for b in range(blocks)}})
        r = {"step": step, "time": step, "epoch": epoch, "train/loss": 2 / epoch, "train/acc": 20 * epoch + quality,
             "test/loss": 2.5 / epoch, "test/acc": 18 * epoch + quality}
        if experiment == "imagenet":
            r["test/acc5"] = 40 * epoch / 1.5 + quality
        records.append(r)
    return records


@pytest.fixture(scope="module")
def paper_outputs(tmp_path_factory):
    """Run folders of every sweep file, where and as its runs write them (cwd-relative outputs/...)."""
    root = tmp_path_factory.mktemp("paper")
    for path in SWEEP_FILES.values():
        s = sweep.read_sweep(path)
        save_dir = root / s.save_dir
        for job in s.jobs:
            run = save_dir / job.run_name
            run.mkdir(parents=True)
            config = _config(s.experiment, job.flags, job.seed, job.run_name, save_dir)
            records = _records(s.experiment, config, job.seed)
            (run / "config.json").write_text(json.dumps(config))
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (run / "summary.json").write_text(json.dumps({"finished": True, "final": records[-1], "best": {}}))
    return root


def _run_command(command: str, figures: Path, capsys) -> None:
    words = shlex.split(command.replace("{figures}", str(figures)))
    assert words[0] == "python3" and words[1].startswith("scripts/"), command
    script = {"scripts/plot.py": plot, "scripts/summarize.py": summarize, "scripts/paper.py": paper}[words[1]]
    argv = [m for w in words[2:] for m in (sorted(glob.glob(w)) if "*" in w else [w])]
    assert script.main(argv) == 0, (command, capsys.readouterr().err)


def test_every_figure_and_table_is_indexed_and_every_sweep_used():
    assert [i.number for i in paper.FIGURES] == list(range(1, 12))
    assert [i.number for i in paper.TABLES] == list(range(1, 6))
    used = {n for item in paper.ITEMS for n in (*item.sweeps, *item.tuning)}
    assert used == set(SWEEP_FILES)
    for item in paper.ITEMS:
        for command in item.commands:
            assert command.startswith("python3 scripts/"), command
            if "plot.py" in command:
                assert f"--name {item.kind.lower()}{item.number}_" in command  # files named after the figure


def test_paper_index_and_one_figure_print_their_commands(capsys):
    assert paper.main([]) == 0
    out = capsys.readouterr().out
    for item in paper.ITEMS:
        assert f"{item.label}: " in out
    assert "cifar10_combinations.yaml (36 runs)" in out and "imagenet_lr_free.yaml (12 runs)" in out
    assert paper.main(["--figure", "5", "--set", "slurm.partition=gpu", "--figures-dir", "figs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "python3 scripts/sweep.py submit scripts/sweeps/imagenet_lr_free.yaml --set slurm.partition=gpu" in lines
    assert any(line.startswith("python3 scripts/plot.py") and "--out figs" in line for line in lines)
    assert paper.main(["--table", "2"]) == 0
    table = capsys.readouterr().out
    assert "| HF | SGDm | Adam | resnet18_blocks | 0.9 | - | 0.1 | - | 0.9 | 0.999 | - | 1e-06 | 0.001 | 1 |" in table
    with pytest.raises(SystemExit) as e:
        paper.main(["--figure", "12"])
    assert e.value.code == 2 and "the paper has no Figure 12" in capsys.readouterr().err


def test_every_figure_command_draws_its_figure_from_the_runs(paper_outputs, tmp_path, monkeypatch, capsys):
    """Every plot and summarize command of the index, on run folders laid out as the sweeps write them."""
    monkeypatch.chdir(paper_outputs)
    figures = tmp_path / "figures"
    for item in paper.ITEMS:
        for command in item.commands:
            if "bench_overhead" in command:
                continue  # tests/test_bench_overhead.py
            _run_command(command, figures, capsys)
    data = json.loads((figures / "plot_data.json").read_text())
    names = {w.split()[0] for item in paper.FIGURES for c in item.commands if "plot.py" in c
             for w in c.split("--name ")[1:]}
    # step-sizes draws one figure per configuration, each named <name>_<configuration>
    assert {n for n in data if not n.startswith("figure10_")} == names - {n for n in names if "figure10" in n}
    assert sorted(n for n in data if n.startswith("figure10_")) == [
        "figure10_imagenet_step_sizes_AdamW_Lion_resnet18_blocks", "figure10_imagenet_step_sizes_AdamW_Lion_scalar",
        "figure10_imagenet_step_sizes_Lion_Lion_resnet18_blocks", "figure10_imagenet_step_sizes_Lion_Lion_scalar",
        "figure10_imagenet_step_sizes_SGDm_Lion_scalar", "figure10_tinystories_step_sizes_AdamW_Adam",
        "figure10_tinystories_step_sizes_AdamW_Lion", "figure10_tinystories_step_sizes_Lion_Lion"]
    for name in data:
        for fmt in ("png", "pdf"):
            assert (figures / f"{name}.{fmt}").stat().st_size > 1000, name

    def labels(panel):
        return [s["label"] for s in panel["series"]]

    # Figure 1: a panel per base update, each with its fixed step, scalar and blockwise MetaOptimize
    f1 = data["figure1_cifar10_test_acc"]
    assert [p["title"] for p in f1["panels"]] == ["AdamW", "Lion", "RMSProp", "SGDm"]
    assert [len(p["series"]) for p in f1["panels"]] == [3, 3, 3, 3]
    assert all(len(s["runs"]) == 3 for p in f1["panels"] for s in p["series"])  # 3 seeds each
    # Figure 2: four alpha0 curves and the fixed-step Lion reference; final accuracy against alpha0
    curves, finals, steps = data["figure2_cifar10_alpha0"]["panels"]
    assert len(curves["series"]) == 5 and "Lion fixed α=0.0001" in labels(curves)
    assert finals["series"][0]["x"] == [1e-9, 1e-8, 1e-7, 1e-6] and len(steps["series"]) == 4
    assert finals["references"][0]["label"] == "Lion fixed α=0.0001"
    # Figure 3: the six blocks of (SGDm, Adam)
    assert labels(data["figure3_cifar10_sgdm_adam_step_sizes"]) == [f"block {b}" for b in range(6)]
    # Figure 5: the best of each grid (DoG's r_eps, Mechanic's s_init per base, the cosine peak)
    f5 = labels(data["figure5_imagenet_lr_free"])
    assert sum(label.startswith("DoG") for label in f5) == 1 and sum("Mechanic" in label for label in f5) == 3
    assert sum("cosine" in label for label in f5) == 1 and not any("resnet18_blocks" in label for label in f5)
    assert len(f5) == 5 + 1 + 1 + 1 + 3 + 1  # 5 scalar MetaOptimize/fixed, cosine, DoG, Prodigy, Mechanic x3, gdtuo
    # Figure 7: online accuracy with task switches, and the end-of-task test accuracy over tasks 1..3
    online, task = data["figure7_continual_cifar100"]["panels"]
    assert online["task_switches"] == [4, 8] and len(task["series"]) == 3 and task["series"][0]["x"] == [1, 2, 3]
    # Figure 8: six block panels, the four blockwise combinations in each
    f8 = data["figure8_cifar10_block_step_sizes"]["panels"]
    assert [p["title"] for p in f8] == [f"block {b}" for b in range(6)] and all(len(p["series"]) == 4 for p in f8)
    # Figure 9: top-1 test and train, top-5 test; the best cosine peak only
    top1, top5 = data["figure9_imagenet_top1_top5"]["panels"]
    assert len(top1["series"]) == 2 * 8 and len(top5["series"]) == 8
    # Figure 11: every grid point on its own line
    assert sum(label.startswith("DoG") for label in labels(data["figure11_tinystories_train_loss"])) == 4


def test_plot_kinds_auto_mode_and_clear_errors(paper_outputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(paper_outputs)
    out = str(tmp_path / "f")
    assert plot.main(["outputs/imagenet", "--out", out, "--formats", "png"]) == 0
    assert "imagenet_top1_top5" in json.loads((tmp_path / "f" / "plot_data.json").read_text())
    # --where compares numbers as numbers: 1e-5 picks the runs whose alpha0 is 1e-05
    assert plot.main(["outputs/imagenet", "--out", out, "--kind", "curves", "--where", "alpha0=1e-5",
                      "--where", "optimizer=HF", "--name", "w"]) == 0
    series = json.loads((tmp_path / "f" / "plot_data.json").read_text())["w"]["series"]
    assert sorted(s["label"] for s in series) == ["AdamW fixed α=1e-05", "Lion fixed α=1e-05", "SGDm+Lion"]
    capsys.readouterr()
    bad = [
        (["outputs/tinystories", "--kind", "top1-top5"], "no run logged test/acc5"),
        (["outputs/imagenet", "--kind", "task-end"], "no run logged task/test_acc"),
        (["outputs/cifar10_baselines", "--kind", "alpha0"], "needs MetaOptimize runs with at least two alpha0"),
        (["outputs/cifar10_baselines", "--kind", "block-panels"], "no configuration logged moving step sizes"),
        (["outputs/imagenet", "--kind", "curves", "--where", "alg_base"], "expected KEY=VALUE"),
        (["outputs/imagenet", "--kind", "curves", "--where", "alg_base=Adagrad"], "--where alg_base=Adagrad: no run"),
        (["outputs/imagenet", "--kind", "curves", "--metric", "val/loss"], "--metric val/loss: none of the 10 runs"),
        (["outputs/imagenet", "--kind", "curves", "--name", "a/b"], "--name 'a/b'"),
        (["outputs/imagenet", "--name", "x"], "give --kind too"),
    ]
    for argv, message in bad:
        assert plot.main([*argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after tqdm's progress lines
        assert err.startswith("error: ") and message in err, (argv, err)


# ---- --help documents every flag ---------------------------------------------------------------

# every command a user runs (scripts/bench_optimizer.py, bench_continual.py and bench_train.py are
# being rewritten elsewhere and have their own checks)
ENTRY_POINTS = [("cifar10/train.py", "parse_args"), ("imagenet/train.py", "parse_args"),
                ("tinystories/train.py", "parse_args"), ("continual_cifar100/train.py", "parse_args"),
                ("tinystories/prepare.py", "main"), ("tinystories/sample.py", "main"), ("scripts/sweep.py", "main"),
                ("scripts/summarize.py", "main"), ("scripts/plot.py", "main"), ("scripts/paper.py", "main"),
                ("scripts/quickstart.py", "parse_args"), ("scripts/bench_overhead.py", "parse_args"),
                ("scripts/bench_baselines.py", "main"), ("scripts/bench_imagenet.py", "parse_args"),
                ("scripts/bench_tinystories.py", "parse_args")]


class _Parser(Exception):
    """Carries the parser a script built out of its parse_args call."""


@pytest.mark.parametrize("path, call", ENTRY_POINTS, ids=[p for p, _ in ENTRY_POINTS])
def test_help_documents_every_flag(path, call, monkeypatch):
    import argparse
    import inspect

    def capture(self, *args, **kwargs):
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    file = REPO / path
    monkeypatch.syspath_prepend(str(file.parent))
    name = f"entry_{file.parent.name}_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    fn = getattr(module, call)
    with pytest.raises(_Parser) as got:
        fn([]) if inspect.signature(fn).parameters else fn()
    parser = got.value.args[0]

    def undocumented(p):
        out = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                out += [f"{sub} {flag}" for sub, sp in action.choices.items() for flag in undocumented(sp)]
            elif not action.help:
                out.append(action.option_strings[0] if action.option_strings else action.dest)
        return out

    assert undocumented(parser) == [], f"{path}: flags without help text"
