"""The experiments under torchrun (2 ranks, gloo, CPU) with --fsdp (FSDP2, issue 14): every rank
ends with the same weights and beta, equal to one process on the same data (TinyStories) or to
DDP (ImageNet: each rank normalises its own batch, so one process is not the same computation);
sharded checkpoints resume bit-exactly (weights, optimizer state, MetaOptimize's meta state);
--fsdp with --compile and --amp bf16; what --fsdp refuses. DDP of the experiments is tested in
test_tinystories.py and test_imagenet.py.

The checkpoints are compared through torch's own converter of DCP folders (dcp_to_torch_save),
not through the loader under test. The fast tests at the top run the harness's sharded
checkpoints in this process (a process group of one).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from checks import assert_same
from test_imagenet import write_image_folder
from test_tinystories import TINY, archive, data_dir, py, read_metrics, script  # noqa: F401 (fixtures)

from common import harness, runfolder, sharded
from common.optim_flags import add_optimizer_args, build_optimizer
from common.optimizers import MetaOptimize

ROOT = Path(__file__).resolve().parents[1]
TINYSTORIES, IMAGENET = ROOT / "tinystories" / "train.py", ROOT / "imagenet" / "train.py"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
# a meta update that moves beta by amounts (not only signs), so small differences would show
ADAM_META = ["--alg-meta", "Adam", "--normalizer-param-meta", 0.99, "--meta-stepsize", 1e-2, "--alpha0", 1e-3]


def torchrun(path, *args, **kw):
    return script(path, *args, prefix=TORCHRUN, **kw)


def checksums(proc) -> dict[int, tuple[str, list[float]]]:
    """{rank: (weights digest, step sizes)} from the --weights-checksum lines of both experiments."""
    found = re.findall(r"weights-checksum rank=(\d+) (?:weights=)?(\w+) step_sizes=(\[[^\]]*\])", proc.stdout)
    return {int(r): (digest, json.loads(sizes)) for r, digest, sizes in found}


def shards_of(run_dir: Path, tmp_path: Path) -> dict:
    """The sharded part of a run's checkpoint, whole (torch's converter), after checking that
    checkpoint.pt names the run folder's one shard folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    name = torch.load(run_dir / "checkpoint.pt", weights_only=True)["sharded"]
    assert [p.name for p in runfolder.shard_folders(run_dir)] == [name]
    out = tmp_path / f"{run_dir.name}-{name}.pt"
    dcp_to_torch_save(run_dir / name, out)
    return torch.load(out, weights_only=True)


def same_metrics(a: Path, b: Path):
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("time", "tokens_per_s", "images_per_s")}  # noqa: E731
                        for m in ms]
    assert strip(read_metrics(a)) == strip(read_metrics(b))


def close_metrics(a: Path, b: Path, rel: float):
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in rows_a] == [m["step"] for m in rows_b]
    for m, n in zip(rows_a, rows_b):
        for k in m:
            if k.startswith(("train/", "val/", "test/loss", "step_size/")):
                assert m[k] == pytest.approx(n[k], rel=rel), (m["step"], k)


# ---- in this process: the harness's sharded checkpoints (a process group of one) ----------------


def fsdp_args(tmp_path, *argv):
    parser = harness.ArgParser()
    harness.add_run_args(parser)
    harness.add_fsdp_arg(parser)
    add_optimizer_args(parser)
    return parser.parse_args(["--save-directory", str(tmp_path), "--device", "cpu", "--run-name", "r", "--fsdp",
                              "--stepsize-groups", "nodewise", *map(str, ADAM_META), *argv])


def train_steps(model, optimizer, steps):
    for i in steps:
        gen = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def mlp_run(args, steps=()):
    """(run, model, optimizer) of a small MLP (sharded with --fsdp), resumed with --resume, then
    trained on `steps`."""
    run = harness.start_run(args, "test")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    model = harness.shard(model, [model[0]], args, run.device)
    optimizer = build_optimizer(model, args)
    run.resume(model, optimizer)
    train_steps(model, optimizer, steps)
    return run, model, optimizer


def whole(model) -> list[torch.Tensor]:
    return [t.clone() for t in sharded.full_state_dict(model).values()]


def test_sharded_checkpoints_replace_atomically_and_resume_exactly_in_one_process(tmp_path, monkeypatch):
    try:
        run, model, opt = mlp_run(fsdp_args(tmp_path), steps=range(3))
        assert sharded.is_sharded(model) and isinstance(opt, MetaOptimize)
        run.checkpoint({"step": 3})
        first = torch.load(run.dir / "checkpoint.pt", weights_only=True)
        assert first["model"] is None and first["optimizer"] is None and first["step"] == 3
        assert sharded.is_complete(run.dir / first["sharded"])
        train_steps(model, opt, range(3, 5))
        run.checkpoint({"step": 5})  # a second checkpoint: the first folder goes once it is complete
        second = torch.load(run.dir / "checkpoint.pt", weights_only=True)["sharded"]
        assert [p.name for p in runfolder.shard_folders(run.dir)] == [second] != [first["sharded"]]

        def disk_full(folder, *args):  # a rank's write fails half-way
            Path(folder).mkdir()
            (Path(folder) / "__0_0.distcp").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

        before = (run.dir / "checkpoint.pt").read_bytes()
        monkeypatch.setattr(sharded, "save", disk_full)
        with pytest.raises(harness.RunFolderError, match=r"cannot write .*checkpoint\.\w+\.dcp: no space left"):
            run.checkpoint({"step": 5})
        monkeypatch.undo()
        assert (run.dir / "checkpoint.pt").read_bytes() == before  # still names the complete folder
        assert [p.name for p in runfolder.shard_folders(run.dir)] == [second]
        expected = whole(model), opt.step_sizes().clone(), opt.state_dict()["meta"]["step"]
        run.close()
        harness.cleanup_distributed()

        # a checkpoint.pt whose folder is gone: one clear error
        (run.dir / second).rename(run.dir / "moved")
        with pytest.raises(harness.UsageError, match=f"--resume: .*{second}, the shards checkpoint.pt names, is missing"):
            mlp_run(fsdp_args(tmp_path, "--resume"))
        harness._close_runs()
        harness.cleanup_distributed()
        (run.dir / "moved").rename(run.dir / second)

        # --resume --fsdp: the same weights, beta and meta state
        run, model, opt = mlp_run(fsdp_args(tmp_path, "--resume"))
        assert all(torch.equal(a, b) for a, b in zip(whole(model), expected[0]))
        assert torch.equal(opt.step_sizes(), expected[1]) and opt.state_dict()["meta"]["step"] == expected[2]
        run.close()
        harness.cleanup_distributed()

        # --resume without --fsdp: the shards load, resharded, into the whole model
        args = fsdp_args(tmp_path, "--resume")
        args.fsdp = False
        run, model, opt = mlp_run(args)
        assert not sharded.is_sharded(model)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected[0]))
        assert torch.equal(opt.step_sizes(), expected[1])
        run.checkpoint({"step": 5})  # a whole checkpoint: the shards are no longer named, so they go
        assert runfolder.shard_folders(run.dir) == [] and runfolder.run_state(run.dir) == "checkpoint"
        run.close()
        harness.cleanup_distributed()

        # a whole checkpoint does not resume with --fsdp: one clear error
        with pytest.raises(harness.UsageError, match="written without --fsdp; resume without --fsdp"):
            mlp_run(fsdp_args(tmp_path, "--resume"))
        harness._close_runs()
        harness.cleanup_distributed()

        # --start-over removes the shard folders too
        run, model, opt = mlp_run(fsdp_args(tmp_path, "--start-over"), steps=range(1))
        run.checkpoint({"step": 1})
        run.close()
        harness.cleanup_distributed()
        (run.dir / "checkpoint.00000000.dcp").mkdir()  # as a killed writer leaves it
        run, _, _ = mlp_run(fsdp_args(tmp_path, "--start-over"))
        assert runfolder.shard_folders(run.dir) == [] and not (run.dir / "checkpoint.pt").exists()
        run.close()
    finally:
        harness._close_runs()
        harness.cleanup_distributed()


@pytest.mark.parametrize("argv, needle", [
    (["--fsdp", "--amp", "fp16"], "--fsdp does not take --amp fp16"),
    (["--fsdp", "--optimizer", "DoG"], "--fsdp works with --optimizer HF (MetaOptimize) or AdamW, not DoG"),
])
def test_fsdp_refuses_what_it_cannot_do(tmp_path, argv, needle):
    parser = harness.ArgParser()
    harness.add_run_args(parser)
    harness.add_fsdp_arg(parser)
    add_optimizer_args(parser)
    with pytest.raises(harness.UsageError, match=re.escape(needle)):
        harness.check_args(parser.parse_args(argv))
    harness.check_args(parser.parse_args(["--fsdp", "--amp", "bf16", "--optimizer", "AdamW"]))


def load_imagenet_train():
    """imagenet/train.py as a module, leaving sys.path and its sibling `data` module as they were."""
    saved_path, saved_data = list(sys.path), sys.modules.get("data")
    try:
        spec = importlib.util.spec_from_file_location("imagenet_train", IMAGENET)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved_path
        if saved_data is None:
            sys.modules.pop("data", None)
        else:
            sys.modules["data"] = saved_data
    return module


def test_imagenet_fsdp_refuses_channels_last(capsys):
    imagenet = load_imagenet_train()
    with pytest.raises(SystemExit) as exit_:
        imagenet.parse_args(["--dummy", "--fsdp", "--channels-last"])
    assert exit_.value.code == 2 and "--channels-last does not go with --fsdp" in capsys.readouterr().err


# ---- TinyStories ------------------------------------------------------------------------------

# 2 ranks x 2 micro-batches of 4 sequences per step (the FSDP units skip their reduce-scatter on the
# first), node-wise blocks over sharded rows; 3 eval batches: the ranks run 2 each, one not counted
TS_FSDP = [*TINY, "--batch-size", 4, "--grad-accum", 4, "--max-iters", 8, "--eval-every", 4, "--eval-iters", 3,
           "--stepsize-groups", "nodewise", *ADAM_META, "--weights-checksum"]


@pytest.fixture(scope="module")
def tinystories_runs(data_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ts_runs")
    args = ["--data-dir", data_dir, *TS_FSDP, "--save-directory", out]
    fsdp = torchrun(TINYSTORIES, *args, "--fsdp", "--run-name", "fsdp", timeout=600)
    one = py("train", *args, "--run-name", "one")
    return out, args, fsdp, one


@pytest.mark.slow
def test_tinystories_fsdp_ranks_agree_and_equal_one_process(tinystories_runs, tmp_path):
    out, _, fsdp, one = tinystories_runs
    ranks = checksums(fsdp)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1], fsdp.stdout
    sizes, one_sizes = ranks[0][1], checksums(one)[0][1]
    assert len(sizes) > 20 and max(abs(s / 1e-3 - 1) for s in sizes) > 1e-3  # node-wise blocks that moved
    assert sizes == pytest.approx(one_sizes, rel=1e-4)
    close_metrics(out / "fsdp", out / "one", rel=1e-4)
    state, single = shards_of(out / "fsdp", tmp_path), torch.load(out / "one" / "checkpoint.pt", weights_only=True)
    for name, tensor in single["model"].items():
        torch.testing.assert_close(state["model"][name], tensor, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(state["optimizer"]["meta"]["beta"], single["optimizer"]["meta"]["beta"], rtol=1e-4, atol=0)
    assert sorted(p.name for p in (out / "fsdp").iterdir() if not p.name.endswith(".dcp")) == \
        ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]


@pytest.mark.slow
def test_tinystories_fsdp_resume_is_bit_exact(tinystories_runs, tmp_path):
    out, args, whole_run, _ = tinystories_runs
    stopped = torchrun(TINYSTORIES, *args, "--fsdp", "--run-name", "parts", "--stop-at-step", 5)
    assert "stopped (SIGTERM) at step 5/8" in stopped.stderr
    assert torch.load(out / "parts" / "checkpoint.pt", weights_only=True)["step"] == 5
    shards_of(out / "parts", tmp_path)  # one folder: the one of step 4 went when step 5's was complete
    resumed = torchrun(TINYSTORIES, *args, "--fsdp", "--run-name", "parts", "--resume")
    assert checksums(resumed) == checksums(whole_run)
    a, b = (torch.load(out / r / "checkpoint.pt", weights_only=True) for r in ("fsdp", "parts"))
    for key in ("scheduler", "step", "last", "best"):
        assert_same(a[key], b[key], key)
    assert_same(shards_of(out / "fsdp", tmp_path), shards_of(out / "parts", tmp_path), "shards")  # weights, optimizer
    same_metrics(out / "fsdp", out / "parts")
    proc = py("sample", "--run-dir", out / "parts", "--num-samples", 1, "--max-new-tokens", 8)  # reads the shards
    assert proc.stdout.strip()


@pytest.mark.slow
def test_tinystories_fsdp_with_compile_and_bf16(data_dir, tmp_path):  # noqa: F811
    # one transformer block: inductor compiles each FSDP unit's graph (about 2 min from a cold cache here)
    proc = torchrun(TINYSTORIES, "--data-dir", data_dir, *TINY, "--n-layers", 1, "--batch-size", 4, "--grad-accum", 2,
                    "--max-iters", 2, "--eval-every", 2, "--eval-iters", 2, "--fsdp", "--compile", "--dtype", "bfloat16",
                    "--weights-checksum", "--save-directory", tmp_path, "--run-name", "c")
    ranks = checksums(proc)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1], proc.stdout
    rows = read_metrics(tmp_path / "c")
    assert [r["step"] for r in rows if "val/loss" in r] == [2] and all(r["train/loss"] < 5 for r in rows)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["fsdp"] and config["compile"] and config["amp"] == "bf16"
    shards_of(tmp_path / "c", tmp_path)


# ---- ImageNet ---------------------------------------------------------------------------------

IN_SMALL = ["--image-size", 32, "--batch-size", 8, "--workers", 0, "--device", "cpu", "--log-every", 1,
            "--stepsize-groups", "resnet18_blocks", *ADAM_META, "--weights-checksum"]


@pytest.mark.slow
def test_imagenet_fsdp_equals_ddp_and_evaluates_uneven_rank_shares(tmp_path):
    # 9 validation images: rank 0 gets 5 (2 batches of 4), rank 1 gets 4 (1 batch); under FSDP rank 1
    # must run a second forward with rank 0 (else both wait forever)
    folder = write_image_folder(tmp_path / "images", classes=3, train=6, val=3)  # 18 training images: 2 steps
    args = ["--data-dir", folder, "--epochs", 1, *IN_SMALL, "--save-directory", tmp_path / "runs"]
    ddp = torchrun(IMAGENET, *args, "--run-name", "ddp", timeout=600)
    fsdp = torchrun(IMAGENET, *args, "--run-name", "fsdp", "--fsdp", timeout=600)
    ranks = checksums(fsdp)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1], fsdp.stdout
    assert ranks[0][1] == pytest.approx(checksums(ddp)[0][1], rel=1e-5)
    assert max(abs(s / 1e-3 - 1) for s in ranks[0][1]) > 1e-3
    close_metrics(tmp_path / "runs" / "ddp", tmp_path / "runs" / "fsdp", rel=1e-4)
    test = [r for r in read_metrics(tmp_path / "runs" / "fsdp") if "test/acc" in r][0]
    assert test["test/acc"] * 9 / 100 == pytest.approx(round(test["test/acc"] * 9 / 100))  # each image once


@pytest.mark.slow
def test_imagenet_fsdp_mid_epoch_resume_is_bit_exact(tmp_path):
    # synthetic data (no random crops, which a mid-epoch resume draws anew): 2 steps per epoch
    args = ["--dummy", "--dummy-size", 16, "--epochs", 2, *IN_SMALL, "--fsdp", "--save-directory", tmp_path]
    whole_run = torchrun(IMAGENET, *args, "--run-name", "whole", timeout=600)
    stopped = torchrun(IMAGENET, *args, "--run-name", "parts", "--stop-at-step", 3, timeout=600)
    assert "stopped (SIGTERM) at epoch 2, batch 1/2" in stopped.stderr
    resumed = torchrun(IMAGENET, *args, "--run-name", "parts", "--resume", timeout=600)
    assert checksums(resumed) == checksums(whole_run) and len(checksums(resumed)) == 2
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in ("whole", "parts"))
    for key in ("epoch", "batch", "step", "epoch_sums", "best"):
        assert_same(a[key], b[key], key)
    assert_same({**a["last"], "images_per_s": 0}, {**b["last"], "images_per_s": 0}, "last")
    assert_same(shards_of(tmp_path / "whole", tmp_path), shards_of(tmp_path / "parts", tmp_path), "shards")
    same_metrics(tmp_path / "whole", tmp_path / "parts")
