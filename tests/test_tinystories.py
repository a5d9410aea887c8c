"""TinyStories experiment (issue 4): model layout, prepare (download/vocab/pretokenize), training,
resume, torchrun, sampling, benchmark.

A tiny generated corpus in the real shard format (dataNN.json: a list of {"story": ...}) is packed
into a .tar.gz and "downloaded" through a file:// URL and a localhost HTTP server; the scripts run
as subprocesses on the CPU with a 2-layer model of width 32.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from checks import assert_same

from common.optimizers import NAMED_STEPSIZE_GROUPS, MetaOptimize, resolve_stepsize_groups

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "tinystories"
NUM_SHARDS, STORIES_PER_SHARD, VOCAB = 4, 150, 100
TINY = ["--vocab-size", VOCAB, "--dim", 32, "--n-layers", 2, "--n-heads", 2, "--n-kv-heads", 2, "--seq-len", 32,
        "--batch-size", 8, "--device", "cpu", "--log-every", 1, "--alpha0", "1e-3"]


@functools.cache
def load(name):
    """tinystories/<name>.py as module tinystories_<name> (other experiments have a model.py too).

    Its sibling imports (`from model import ...`) get these modules, without leaving `model` or
    `prepare` in sys.modules for other tests.
    """
    siblings = {s: load(s) for s in ("model", "prepare") if s != name and name not in ("model", "prepare")}
    saved = {s: sys.modules.get(s) for s in siblings}
    sys.modules.update(siblings)
    try:
        spec = importlib.util.spec_from_file_location(f"tinystories_{name}", HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        for s, m in saved.items():
            if m is None:
                sys.modules.pop(s, None)
            else:
                sys.modules[s] = m
    return module


def env():
    e = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("HARNESS_TRACEBACK", None)
    return e


def script(path, *args, check=True, timeout=600, prefix=()):
    proc = subprocess.run([*prefix, str(path), *map(str, args)], capture_output=True, text=True, env=env(),
                          timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def py(name, *args, **kw):
    return script(HERE / f"{name}.py", *args, prefix=(sys.executable,), **kw)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and "%|" not in line]


# --------------------------------------------------------------------------------------
# the corpus


def make_story(rng: random.Random) -> str:
    names, things = ["Lily", "Ben", "Tom", "Mia", "Sam"], ["ball", "dog", "cat", "tree", "cake", "box"]
    adjs, verbs = ["big", "red", "happy", "small"], ["saw", "liked", "found", "wanted", "had"]
    lines = [f"Once upon a time, there was a {rng.choice(adjs)} {rng.choice(things)}."]
    for _ in range(rng.randint(1, 4)):
        lines.append(f"{rng.choice(names)} {rng.choice(verbs)} a {rng.choice(adjs)} {rng.choice(things)}.")
    return "\n" + " ".join(lines) + "\nThey were happy. The end.\n"


def write_archive(folder: Path) -> Path:
    """The TinyStories_all_data.tar.gz layout: data00.json .. at the top level."""
    rng = random.Random(0)
    src = folder / "src"
    src.mkdir(parents=True)
    for k in range(NUM_SHARDS):
        stories = [{"story": make_story(rng), "instruction": {"words": []}, "source": "GPT-4"}
                   for _ in range(STORIES_PER_SHARD)]
        (src / f"data{k:02d}.json").write_text(json.dumps(stories))
    archive = folder / "TinyStories_all_data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for k in range(NUM_SHARDS):
            tar.add(src / f"data{k:02d}.json", arcname=f"data{k:02d}.json")
    return archive


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_archive(tmp_path_factory.mktemp("tinystories_src"))


@pytest.fixture(scope="module")
def data_dir(archive, tmp_path_factory) -> Path:
    """Downloaded (file:// URL), vocabulary of 100 trained, pretokenized."""
    d = tmp_path_factory.mktemp("tinystories") / "data"
    py("prepare", "download", "--data-dir", d, "--url", archive.as_uri(), "--sha256", sha256(archive),
       "--size", archive.stat().st_size)
    py("prepare", "train_vocab", "--data-dir", d, "--vocab-size", VOCAB)
    py("prepare", "pretokenize", "--data-dir", d, "--vocab-size", VOCAB, "--workers", 2)
    return d


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    """A finished 30-step MetaOptimize run of the tiny model."""
    out = tmp_path_factory.mktemp("runs")
    py("train", "--data-dir", data_dir, *TINY, "--max-iters", 30, "--eval-every", 15, "--eval-iters", 4,
       "--save-directory", out, "--run-name", "tiny")
    return out / "tiny"


# --------------------------------------------------------------------------------------
# model


def test_15m_model_parameter_count_order_and_blocks():
    model_mod = load("model")
    model = model_mod.Transformer(model_mod.ModelArgs())
    assert model.num_params() == 15_191_712  # llama2.c's "15M": 288 dim, 6 layers, 32000 vocab, tied
    names = [n for n, _ in model.named_parameters()]
    # tied embeddings: output.weight IS tok_embeddings.weight, so 1 + 6*9 + 1 = 56 tensors, not 57
    assert model.output.weight is model.tok_embeddings.weight
    assert len(names) == 56 == sum(NAMED_STEPSIZE_GROUPS["transformer_blocks_15m"])
    kind, counts = resolve_stepsize_groups("transformer_blocks_15m", len(names))
    assert counts == [1, 9, 9, 9, 9, 9, 10]
    blocks, start = [], 0
    for c in counts:
        blocks.append(names[start:start + c])
        start += c
    assert blocks[0] == ["tok_embeddings.weight"]
    per_layer = ["attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                 "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
                 "attention_norm.weight", "ffn_norm.weight"]
    for i in range(5):
        assert blocks[1 + i] == [f"layers.{i}.{n}" for n in per_layer]
    assert blocks[6] == [f"layers.5.{n}" for n in per_layer] + ["norm.weight"]
    opt = MetaOptimize(model.parameters(), stepsize_groups="transformer_blocks_15m")
    assert opt.num_blocks == 7
    assert "15,191,712 parameters" in model_mod.describe(model)


def test_model_is_causal_and_generates():
    model_mod = load("model")
    torch.manual_seed(0)
    model = model_mod.Transformer(model_mod.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                                      max_seq_len=16)).eval()
    x = torch.randint(0, 50, (2, 12))
    logits, loss = model(x, x)
    assert logits.shape == (2, 12, 50) and loss.ndim == 0
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % 50  # changing later tokens leaves earlier positions alone
    torch.testing.assert_close(model(x2, x2)[0][:, :8], logits[:, :8])
    assert not torch.allclose(model(x2, x2)[0][:, 8:], logits[:, 8:])
    last, none = model(x)
    assert last.shape == (2, 1, 50) and none is None
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    out = model.generate(x[:, :3], 20, temperature=0.8, top_k=5)  # runs past max_seq_len: context is cropped
    assert out.shape == (2, 23) and torch.equal(out[:, :3], x[:, :3])
    greedy = model.generate(x[:, :3], 4, temperature=0.0)
    assert torch.equal(greedy, model.generate(x[:, :3], 4, temperature=0.0))


# --------------------------------------------------------------------------------------
# prepare


def test_download_extracts_shards_and_checks_the_archive(archive, tmp_path):
    d = tmp_path / "data"
    py("prepare", "download", "--data-dir", d, "--url", archive.as_uri(), "--sha256", sha256(archive),
       "--size", archive.stat().st_size)
    shards = sorted((d / "TinyStories_all_data").glob("*.json"))
    assert [s.name for s in shards] == [f"data{k:02d}.json" for k in range(NUM_SHARDS)]
    assert json.loads(shards[0].read_text())[0]["story"].strip().startswith("Once upon a time")
    # a second call finds the shards and does nothing
    assert "nothing to do" in py("prepare", "download", "--data-dir", d, "--url", "file:///nonexistent").stdout
    # a wrong size (by default the real archive's) or checksum fails with one error line; nothing is extracted
    for flags, needle in (([], "expected 1608001638"), (["--size", 0, "--sha256", "0" * 64], "sha256")):
        bad = py("prepare", "download", "--data-dir", tmp_path / "bad", "--url", archive.as_uri(), *flags,
                 check=False)
        assert bad.returncode == 1
        lines = error_lines(bad.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], bad.stderr
        assert not (tmp_path / "bad" / "TinyStories_all_data").exists()


def test_download_over_http(archive, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
        py("prepare", "download", "--data-dir", tmp_path, "--url", url, "--size", archive.stat().st_size,
           "--sha256", sha256(archive))
    finally:
        server.shutdown()
    assert len(list((tmp_path / "TinyStories_all_data").glob("data*.json"))) == NUM_SHARDS
    assert (tmp_path / "TinyStories_all_data.tar.gz").stat().st_size == archive.stat().st_size


def test_vocab_and_pretokenized_shards(data_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(data_dir / f"tok{VOCAB}.model"))
    assert sp.vocab_size() == VOCAB
    bins = sorted((data_dir / f"tok{VOCAB}").glob("*.bin"))
    assert [b.name for b in bins] == [f"data{k:02d}.bin" for k in range(NUM_SHARDS)]
    assert not list((data_dir / f"tok{VOCAB}").glob("*.tmp")) and not list(data_dir.glob(".tok*"))
    manifest = json.loads((data_dir / f"tok{VOCAB}" / "manifest.json").read_text())  # written last
    assert manifest["tokens"] == {b.name: b.stat().st_size // 2 for b in bins} and manifest["vocab_size"] == VOCAB
    stories = json.loads((data_dir / "TinyStories_all_data" / "data01.json").read_text())
    tokens = np.fromfile(bins[1], dtype=np.uint16)
    assert (tokens == sp.bos_id()).sum() == len(stories) and tokens[0] == sp.bos_id()
    assert tokens.max() < VOCAB
    first = tokens[1:np.flatnonzero(tokens == sp.bos_id())[1]].tolist()
    # vocabularies under 512 tokens have no byte fallback: the newline inside a story is unknown (" ⁇ ")
    assert sp.decode(first).replace(" \u2047 ", "\n") == stories[0]["story"].strip()


def test_batches_are_windows_of_the_shards(data_dir):
    prep = load("prepare")
    train, val = prep.TokenShards(data_dir, VOCAB, "train"), prep.TokenShards(data_dir, VOCAB, "val")
    assert [f.name for f in val.files] == ["data00.bin"] and len(train.files) == NUM_SHARDS - 1
    x, y = train.batch(5, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (5, 16) and x.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    x2, _ = train.batch(5, 16, np.random.default_rng(0))
    assert np.array_equal(x, x2)
    with pytest.raises(ValueError, match="--vocab-size 77"):
        prep.TokenShards(data_dir, 77, "train")


def test_pretokenize_with_an_existing_tokenizer(data_dir, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data_dir / "TinyStories_all_data", d / "TinyStories_all_data")
    py("prepare", "pretokenize", "--data-dir", d, "--tokenizer", data_dir / f"tok{VOCAB}.model", "--workers", 1)
    assert (d / f"tok{VOCAB}.model").exists()  # copied where train.py and sample.py look for it
    for k in range(NUM_SHARDS):
        name = f"data{k:02d}.bin"
        assert (d / f"tok{VOCAB}" / name).read_bytes() == (data_dir / f"tok{VOCAB}" / name).read_bytes()


def test_failed_pretokenize_leaves_nothing_train_py_accepts(data_dir, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data_dir / "TinyStories_all_data", d / "TinyStories_all_data")
    shutil.copy(data_dir / f"tok{VOCAB}.model", d)
    (d / "TinyStories_all_data" / "data02.json").write_text('[{"story": "fine"}, {"no_story": 1}]')
    proc = py("prepare", "pretokenize", "--data-dir", d, "--vocab-size", VOCAB, "--workers", 2, check=False)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "data02.json" in lines[0] and 'entry 1 has no "story" text' in lines[0]
    assert sorted(p.name for p in d.iterdir()) == ["TinyStories_all_data", f"tok{VOCAB}.model"]  # no partial set
    # a set whose pretokenize was killed (files, no manifest) or lost a file is refused, naming what to rerun
    prep = load("prepare")
    partial = d / f"tok{VOCAB}"
    shutil.copytree(data_dir / f"tok{VOCAB}", partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(ValueError, match="without manifest.json .* run `python tinystories/prepare.py pretokenize"):
        prep.TokenShards(d, VOCAB, "train")
    shutil.copy(data_dir / f"tok{VOCAB}" / "manifest.json", partial)
    (partial / "data03.bin").write_bytes((partial / "data03.bin").read_bytes()[:100])  # half written
    with pytest.raises(ValueError, match="data03.bin has 50 tokens, not .* incomplete"):
        prep.TokenShards(d, VOCAB, "train")
    proc = py("train", "--data-dir", d, *TINY, "--max-iters", 1, "--save-directory", tmp_path / "out", check=False)
    assert proc.returncode == 2 and error_lines(proc.stderr)[-1].startswith("error: --vocab-size 100: "), proc.stderr
    # a good set survives a failed rerun, and a killed run's temp folder is cleared by the next one
    shutil.copy(data_dir / f"tok{VOCAB}" / "data03.bin", partial)
    (d / f".tok{VOCAB}.partial-1").mkdir()
    proc = py("prepare", "pretokenize", "--data-dir", d, "--vocab-size", VOCAB, "--workers", 1, check=False)
    assert proc.returncode == 2 and not (d / f".tok{VOCAB}.partial-1").exists()
    assert len(prep.TokenShards(d, VOCAB, "train").files) == NUM_SHARDS - 1


def test_download_tokenizer_checks_and_installs_it(data_dir, tmp_path):
    """download_tokenizer: by default Llama 2's tokenizer (pinned URL, size and sha256); here a file:// URL."""
    model = data_dir / f"tok{VOCAB}.model"
    d = tmp_path / "data"
    out = py("prepare", "download_tokenizer", "--data-dir", d, "--url", model.as_uri(), "--sha256", sha256(model),
             "--size", model.stat().st_size).stdout
    assert (d / f"tok{VOCAB}.model").read_bytes() == model.read_bytes()  # where pretokenize/train look for it
    assert f"pretokenize --vocab-size {VOCAB}" in out
    # by default the size and checksum are Llama 2's: another file is refused, and nothing is installed
    bad = py("prepare", "download_tokenizer", "--data-dir", tmp_path / "bad", "--url", model.as_uri(), check=False)
    lines = error_lines(bad.stderr)
    assert bad.returncode == 1 and len(lines) == 1 and "expected 499723" in lines[0], bad.stderr
    assert not list((tmp_path / "bad").glob("tok*.model"))


def test_prepare_bad_input_is_one_error_line(tmp_path):
    for args in (["train_vocab", "--vocab-size", 100], ["pretokenize", "--vocab-size", 100],
                 ["train_vocab", "--vocab-size", 70000]):
        proc = py("prepare", *args, "--data-dir", tmp_path, check=False)
        assert proc.returncode == 2
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and "--" in lines[0], proc.stderr


# --------------------------------------------------------------------------------------
# training


def test_metaoptimize_training_loss_falls(trained):
    metrics = read_metrics(trained)
    steps = [m for m in metrics if "tokens_per_s" in m]
    evals = [m for m in metrics if "val/loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 31)) and [m["step"] for m in evals] == [15, 30]
    assert all(m["tokens_per_s"] > 0 and m["step_size/block_0"] > 0 for m in steps)
    # the step size moved: measured 1.0294e-3 at step 30 from alpha0 1e-3 (Lion meta: 1e-3 in log per step)
    assert steps[-1]["step_size/block_0"] != pytest.approx(1e-3, rel=1e-6)
    # from ~ln(100) = 4.6; measured train loss 4.61 at step 1, val loss 2.77 at step 15 and 1.08 at step 30
    assert evals[-1]["val/loss"] < 0.4 * steps[0]["train/loss"]
    assert evals[-1]["train/loss"] < evals[0]["train/loss"]
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["finished"] and summary["final"]["val/loss"] == evals[-1]["val/loss"]
    config = json.loads((trained / "config.json").read_text())
    assert config["experiment"] == "tinystories" and config["max_iters"] == 30


def test_sampling_produces_text(trained):
    proc = py("sample", "--run-dir", trained, "--start", "Once upon", "--num-samples", 2, "--max-new-tokens", 40,
              "--temperature", 0.8, "--top-k", 10)
    samples = [s.strip() for s in proc.stdout.split("-" * 40)[:2]]
    assert len(samples) == 2
    for s in samples:
        assert s.splitlines()[-1].startswith("Once upon") or "Once upon" in s
        assert len(s.split()) > 5


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--alg-base", "Lion", "--Lion-beta2-base", ".9", "--alg-meta", "Lion",
                                    "--stepsize-groups", "layerwise", "--grad-accum", 2, "--dropout", 0.1],
                                   ["--optimizer", "AdamW", "--lr", "3e-3", "--warmup-steps", 3]])
def test_resume_equals_uninterrupted(data_dir, tmp_path, extra):
    common = ["--data-dir", data_dir, *TINY, "--max-iters", 8, "--eval-every", 3, "--eval-iters", 2,
              "--save-directory", tmp_path, *extra]
    py("train", *common, "--run-name", "whole")
    stopped = py("train", *common, "--run-name", "parts", "--stop-at-step", 5)
    assert "stopped (SIGTERM) at step 5/8" in stopped.stderr and not (tmp_path / "parts" / "summary.json").exists()
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["step"] == 5
    py("train", *common, "--run-name", "parts", "--resume")
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in ("whole", "parts"))
    for key in ("model", "optimizer", "scheduler", "step", "last", "best"):
        assert_same(a[key], b[key], key)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("time", "tokens_per_s")} for m in ms]  # noqa: E731
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "parts"))


@pytest.mark.slow
def test_torchrun_two_ranks_identical_and_equal_to_one_process(data_dir, tmp_path):
    common = ["--data-dir", data_dir, *TINY, "--batch-size", 4, "--grad-accum", 4, "--max-iters", 6,
              "--eval-every", 3, "--eval-iters", 4, "--save-directory", tmp_path, "--weights-checksum",
              "--stepsize-groups", "layerwise"]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    ddp = script(HERE / "train.py", *common, "--run-name", "ddp",
                 prefix=(torchrun, "--standalone", "--nproc_per_node", "2"), timeout=300)
    sums = dict(re.findall(r"weights-checksum rank=(\d+) (weights=\w+ step_sizes=\[[^\]]*\])", ddp.stdout + ddp.stderr))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], ddp.stdout
    sizes = json.loads(sums["0"].split("step_sizes=")[1])
    # every layer's step size moved: Lion meta moves log(alpha) by exactly +-eta = 1e-3 from the second
    # step on (5 moves in 6 steps: never back to the start); an unmoved float32 1e-3 reads 1e-3 * (1 + 5e-8).
    # Measured |log(alpha / 1e-3)|: 0.001 or 0.005 for every layer
    assert len(sizes) == 2 + 2 * 9 and all(abs(math.log(a / 1e-3)) > 5e-4 for a in sizes), sizes
    # the 2 x 2 micro-batches of each step are the 4 micro-batches one process would accumulate
    py("train", *common, "--run-name", "one")
    a, b = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for m, n in zip(a, b):
        for k in m:
            if k.startswith(("train/", "val/", "step_size/")):
                assert m[k] == pytest.approx(n[k], rel=1e-4), k
    # only rank 0 wrote the run folder
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl",
                                                                    "summary.json"]


@pytest.mark.parametrize("args, world, needle", [
    (["--grad-accum", 3], 2, "--grad-accum 3 must be a multiple of the 2 ranks"),
    (["--seq-len", 0], 1, "--seq-len"), (["--grad-clip", -1], 1, "--grad-clip"),
    (["--dtype", "bfloat16", "--amp", "fp16"], 1, "--dtype"), (["--n-heads", 3], 1, "--dim"),
    (["--vocab-size", 70000], 1, "--vocab-size"), (["--dropout", 1], 1, "--dropout"),
])
def test_check_args_names_the_flag(args, world, needle):
    train = load("train")
    with pytest.raises(ValueError, match=re.escape(needle)):
        train.check_args(train.parse_args([*map(str, args)]), world)


def test_bad_input_is_one_error_line_and_writes_nothing(data_dir, tmp_path):
    for args, needle in ((["--dtype", "float64"], "--dtype"), (["--vocab-size", 64], "--vocab-size 64")):
        proc = py("train", "--data-dir", data_dir, *TINY, "--max-iters", 1, "--save-directory", tmp_path, *args,
                  check=False)
        assert proc.returncode == 2, proc.stderr
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())


def test_bad_resume_checkpoint_and_shard_are_one_error_line(trained, data_dir, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(trained, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    proc = py("train", "--data-dir", data_dir, *TINY, "--dim", 64, "--max-iters", 30, "--save-directory", tmp_path,
              "--run-name", "tiny", "--resume", check=False)  # another model size than the checkpoint's
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and lines[-1].startswith("error: --resume: ") and "does not fit" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and {p.name: p.read_bytes() for p in run.iterdir()} == before
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:5000])  # truncated
    for args, needle in ((["--run-dir", run], "error: --checkpoint: cannot read"),
                         (["--run-dir", trained, "--temperature", "nan"], "error: argument --temperature: must be a finite")):
        proc = py("sample", *args, check=False)
        lines = error_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(needle), proc.stderr
    d = tmp_path / "data"
    shutil.copytree(data_dir / "TinyStories_all_data", d / "TinyStories_all_data")
    (d / "TinyStories_all_data" / "data01.json").write_text('{"stories": []}')  # not the shard schema
    proc = py("prepare", "train_vocab", "--data-dir", d, "--vocab-size", VOCAB, check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "data01.json: expected a JSON list" in lines[0], proc.stderr
    (d / "TinyStories_all_data" / "data01.json").write_text('[{"story": "cut')  # not JSON
    proc = py("prepare", "train_vocab", "--data-dir", d, "--vocab-size", VOCAB, check=False)
    assert proc.returncode == 2 and "data01.json: not a JSON shard" in error_lines(proc.stderr)[0], proc.stderr


def test_bfloat16_and_clipping_run(data_dir, tmp_path):
    py("train", "--data-dir", data_dir, *TINY, "--max-iters", 3, "--eval-every", 3, "--eval-iters", 1,
       "--dtype", "bfloat16", "--grad-clip", 0.5, "--alg-base", "Lion", "--Lion-beta2-base", ".9",
       "--save-directory", tmp_path, "--run-name", "bf16")
    metrics = read_metrics(tmp_path / "bf16")
    assert all(np.isfinite(m["train/loss"]) for m in metrics)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["amp"] == "bf16"


def test_hessian_trace_runs_with_grad_accumulation_and_clipping(data_dir, tmp_path):
    """--hessian hvp: backward(create_graph=True) on every micro-batch, the math attention kernel (the
    flash kernel on CPU has no double backward); the step sizes move otherwise than Hessian-free."""
    common = ["--data-dir", data_dir, *TINY, "--max-iters", 3, "--eval-every", 3, "--eval-iters", 1, "--grad-accum", 2,
              "--grad-clip", 1.0, "--alg-meta", "Adam", "--meta-stepsize", 0.1, "--normalizer-param-meta", 0.999,
              "--save-directory", tmp_path]
    py("train", *common, "--hessian", "hvp", "--run-name", "hvp")
    py("train", *common, "--run-name", "free")
    hvp, free = ([m for m in read_metrics(tmp_path / r) if "step_size/block_0" in m] for r in ("hvp", "free"))
    assert all(np.isfinite(m["train/loss"]) for m in hvp)
    assert hvp[-1]["step_size/block_0"] != free[-1]["step_size/block_0"]


def test_benchmark_script_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = script(ROOT / "scripts" / "bench_tinystories.py", "--device", "cpu", "--batch-size", 2, "--seq-len", 16,
                  "--steps", 1, "--reps", 2, "--warmup", 1, "--dim", 32, "--n-layers", 1, "--n-heads", 2,
                  "--vocab-size", 64, "--json", out, "--record", tmp_path / "rec", prefix=(sys.executable,))
    assert "ratio MetaOptimize (AdamW, Lion) / torch AdamW" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["tokens_per_s"]) == {"torch AdamW", "MetaOptimize (AdamW, Lion)"} and result["ratio"] > 0
    recorded = json.loads((tmp_path / "rec.json").read_text())  # --record: the same numbers, with the command
    assert recorded["raw"]["tokens_per_s"] == result["tokens_per_s"] and "--record" in recorded["command"]
    assert "| MetaOptimize (AdamW, Lion) |" in (tmp_path / "rec.md").read_text()


def test_token_ids_past_the_vocabulary_are_one_error_line(data_dir, tmp_path):
    """Shards tokenized with a larger vocabulary (or corrupt) would index past the embedding."""
    d = tmp_path / "data"
    shutil.copytree(data_dir / f"tok{VOCAB}", d / f"tok{VOCAB}")
    shard = d / f"tok{VOCAB}" / "data01.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[len(tokens) // 2] = VOCAB + 7  # the file keeps its size, so the manifest still fits it
    tokens.tofile(shard)
    with pytest.raises(ValueError, match=rf"data01.bin: token id {VOCAB + 7} is outside the vocabulary"):
        load("prepare").TokenShards(d, VOCAB, "train")
    proc = py("train", "--data-dir", d, *TINY, "--max-iters", 1, "--save-directory", tmp_path / "out", check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "data01.bin: token id" in lines[0] and f"--vocab-size {VOCAB}" in lines[0]
