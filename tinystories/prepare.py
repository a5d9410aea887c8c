"""TinyStories data: download, tokenizer training, pretokenization, and batches for training.

    python tinystories/prepare.py download                      # ~1.6 GB archive -> 50 JSON shards
    python tinystories/prepare.py train_vocab --vocab-size 4096  # sentencepiece BPE -> data/tinystories/tok4096.model
    python tinystories/prepare.py pretokenize --vocab-size 4096  # shards -> data/tinystories/tok4096/dataNN.bin
    python tinystories/prepare.py download_tokenizer             # Llama 2's tokenizer -> data/tinystories/tok32000.model
    python tinystories/prepare.py pretokenize --vocab-size 32000 # with it: the paper's 32000 vocabulary
    python tinystories/prepare.py pretokenize --tokenizer PATH   # any sentencepiece .model you have

Layout under --data-dir (default data/tinystories):
  TinyStories_all_data.tar.gz, TinyStories_all_data/data00.json .. data49.json (lists of {"story": ...}),
  tok<V>.model (the tokenizer of vocabulary size V), tok<V>/data00.bin .. (uint16 tokens, each story
  starts with BOS) and tok<V>/manifest.json (token count per file, written last: train.py reads only
  a complete set). Shard 0 is the validation split; the others are training data.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.cli import ArgParser
from common.download import DownloadError, download, extract_tar

# -----------------------------------------------------------------------------
# defaults
DATA_DIR = "data/tinystories"
URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
ARCHIVE = "TinyStories_all_data.tar.gz"
ARCHIVE_SIZE = 1_608_001_638  # bytes of the archive at the URL above
ARCHIVE_SHA256 = "26cf7605aca15bc4ea6fa637256400d9d01317b28ed296172b2d1dd160cd7699"
SHARDS_DIR = "TinyStories_all_data"
# Llama 2's sentencepiece tokenizer (32000 tokens), as llama2.c ships it (the paper's TinyStories runs use
# llama2.c's data pipeline); pinned to a commit, checked by size and sha256
TOKENIZER_URL = ("https://raw.githubusercontent.com/karpathy/llama2.c/"
                 "350e04fe35433e6d2941dce5a1f53308f87058eb/tokenizer.model")
TOKENIZER_SIZE = 499_723
TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
VOCAB_SHARDS = 10  # training shards whose stories the tokenizer is trained on
VOCAB_SENTENCES = 200_000  # lines sentencepiece samples from them
MANIFEST = "manifest.json"  # written last into tok<V>/: {"tokens": {"data00.bin": count, ...}, ...}
# -----------------------------------------------------------------------------


def shard_paths(data_dir) -> list[Path]:
    shards = sorted((Path(data_dir) / SHARDS_DIR).glob("data*.json"))
    if not shards:
        raise ValueError(f"no data*.json shards in {Path(data_dir) / SHARDS_DIR}; "
                         f"run `python tinystories/prepare.py download --data-dir {data_dir}` first")
    return shards


def tokenizer_path(data_dir, vocab_size: int) -> Path:
    return Path(data_dir) / f"tok{vocab_size}.model"


def tokens_dir(data_dir, vocab_size: int) -> Path:
    return Path(data_dir) / f"tok{vocab_size}"


def load_tokenizer(path):
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--tokenizer: no sentencepiece model at {path} (train one with "
                         f"`python tinystories/prepare.py train_vocab`, or pass an existing .model file)")
    return spm.SentencePieceProcessor(model_file=str(path))


def read_stories(shard: Path) -> list[str]:
    """The stories of one JSON shard; ValueError naming the file when it is not in the TinyStories format."""
    try:
        with open(shard, encoding="utf-8") as f:
            examples = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{shard}: not a JSON shard ({e})") from None
    bad = next((i for i, ex in enumerate(examples) if not (isinstance(ex, dict) and isinstance(ex.get("story"), str))),
               None) if isinstance(examples, list) else -1
    if bad is not None:
        where = "the top level is not a list" if bad < 0 else f"entry {bad} has no \"story\" text"
        raise ValueError(f"{shard}: expected a JSON list of {{\"story\": text, ...}} objects (the "
                         f"TinyStories_all_data format); {where}")
    return [ex["story"].strip() for ex in examples]


# -----------------------------------------------------------------------------
# download


def cmd_download(args) -> None:
    data_dir = Path(args.data_dir)
    out = data_dir / SHARDS_DIR
    if out.is_dir() and any(out.glob("data*.json")):
        print(f"{out} already holds {len(list(out.glob('data*.json')))} shards; nothing to do")
        return
    archive = download(args.url, data_dir / ARCHIVE, sha256=args.sha256 or None, size=args.size or None,
                       desc=ARCHIVE)
    tmp = data_dir / (SHARDS_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    extract_tar(archive, tmp)  # the archive holds the shards at its top level
    os.replace(tmp, out)
    shards = shard_paths(data_dir)
    print(f"{len(shards)} shards in {out}; example story from {shards[0].name}:")
    print(read_stories(shards[0])[0][:300])


# -----------------------------------------------------------------------------
# tokenizer


def cmd_download_tokenizer(args) -> None:
    """Llama 2's tokenizer (or the .model at --url) -> <data-dir>/tok<vocab>.model, where pretokenize,
    train.py and sample.py look for it."""
    data_dir = Path(args.data_dir)
    fetched = download(args.url, data_dir / "downloaded_tokenizer.model", sha256=args.sha256 or None,
                       size=args.size or None, desc="tokenizer.model")
    vocab = load_tokenizer(fetched).vocab_size()
    dest = tokenizer_path(data_dir, vocab)
    shutil.copyfile(fetched, dest)
    print(f"{dest}: sentencepiece tokenizer of {vocab} tokens; next: "
          f"python tinystories/prepare.py pretokenize --vocab-size {vocab} --data-dir {data_dir}")


def cmd_train_vocab(args) -> None:
    import sentencepiece as spm

    if not 32 <= args.vocab_size <= 65535:
        raise ValueError(f"--vocab-size must be in [32, 65535] (tokens are stored as uint16), got {args.vocab_size}")
    shards = shard_paths(args.data_dir)
    train = shards[1:] or shards  # shard 0 is validation (used only when it is the only shard)
    train = train[: args.num_shards]
    dest = tokenizer_path(args.data_dir, args.vocab_size)
    with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
        text = Path(tmp) / "stories.txt"
        with open(text, "w", encoding="utf-8") as f:
            for shard in tqdm(train, desc="collect stories"):
                for story in read_stories(shard):
                    f.write(story + "\n")
        print(f"training a {args.vocab_size}-token BPE tokenizer on {text.stat().st_size / 1e6:.1f} MB "
              f"from {len(train)} shards")
        prefix = Path(tmp) / "tok"
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(prefix), model_type="bpe", vocab_size=args.vocab_size,
            input_format="text", character_coverage=1.0,
            num_threads=os.cpu_count() or 1, split_digits=True, allow_whitespace_only_pieces=True,
            # byte fallback needs 256 byte pieces in the vocabulary, so only for larger vocabularies
            byte_fallback=args.vocab_size >= 512, unk_surface=" \u2047 ",
            normalization_rule_name="identity", input_sentence_size=VOCAB_SENTENCES,
            shuffle_input_sentence=True, minloglevel=2,
        )
        os.replace(prefix.with_suffix(".model"), dest)
        os.replace(prefix.with_suffix(".vocab"), dest.with_suffix(".vocab"))
    print(f"wrote {dest}")


# -----------------------------------------------------------------------------
# pretokenize


def tokenize_shard(shard: str, model_file: str, out_dir: str) -> tuple[str, int]:
    """One worker's job: a JSON shard -> <out_dir>/<shard>.bin (uint16, BOS before each story)."""
    sp = load_tokenizer(model_file)
    bos = sp.bos_id()
    stories = read_stories(Path(shard))
    chunks = []  # uint16 arrays of 1000 stories each: 2 bytes per token instead of a list of ints
    for i in range(0, len(stories), 1000):
        ids = sp.encode(stories[i:i + 1000])
        chunks.append(np.fromiter(itertools.chain.from_iterable([bos, *x] for x in ids), dtype=np.uint16))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)
    out = Path(out_dir) / (Path(shard).stem + ".bin")
    tokens.tofile(out)
    return out.name, int(tokens.size)


def cmd_pretokenize(args) -> None:
    """Tokenize every shard into a temporary folder, write its manifest, then rename it to tok<V>/:
    a failed or killed run leaves nothing that train.py would read."""
    model_file = Path(args.tokenizer) if args.tokenizer else tokenizer_path(args.data_dir, args.vocab_size)
    sp = load_tokenizer(model_file)
    vocab = sp.vocab_size()
    if vocab > 65536:
        raise ValueError(f"--tokenizer: vocabulary of {vocab} tokens does not fit uint16 (at most 65536)")
    if sp.bos_id() < 0:
        raise ValueError(f"--tokenizer: {model_file} has no BOS token")
    shards = shard_paths(args.data_dir)
    out_dir = tokens_dir(args.data_dir, vocab)
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True)
    workers = max(1, min(args.workers or os.cpu_count() or 1, len(shards)))
    print(f"pretokenizing {len(shards)} shards with {model_file} ({vocab} tokens), {workers} workers -> {out_dir}")
    counts = {}
    try:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(tokenize_shard, str(s), str(model_file), str(tmp)): s for s in shards}
            with tqdm(total=len(futures), desc="pretokenize", unit="shard") as bar:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        exc = fut.exception()
                        if exc is not None:
                            for other in pending:
                                other.cancel()
                            pool.shutdown(wait=True, cancel_futures=True)
                            if isinstance(exc, ValueError):  # a malformed shard: it names the file
                                raise ValueError(str(exc))
                            raise RuntimeError(f"pretokenize failed on {futures[fut]}: {type(exc).__name__}: {exc}")
                        name, count = fut.result()
                        counts[name] = count
                        bar.update(1)
        manifest = {"vocab_size": vocab, "tokenizer": str(model_file), "tokens": dict(sorted(counts.items()))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        own = tokenizer_path(args.data_dir, vocab)
        if model_file.resolve() != own.resolve():  # keep a copy where train/sample look for it
            shutil.copyfile(model_file, tmp / own.name)
            os.replace(tmp / own.name, own)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {sum(counts.values()):,} tokens ({len(shards)} .bin files; {shards[0].stem}.bin is the "
          f"validation split) to {out_dir}")


# -----------------------------------------------------------------------------
# batches for training (used by train.py)


def complete_token_files(data_dir, vocab_size: int) -> list[Path]:
    """The .bin files of tok<V>/, checked against the manifest pretokenize writes last (every file
    there, of the size it recorded); ValueError saying what to rerun otherwise."""
    folder = tokens_dir(data_dir, vocab_size)
    rerun = f"run `python tinystories/prepare.py pretokenize --vocab-size {vocab_size}`"
    try:
        counts = json.loads((folder / MANIFEST).read_text())["tokens"]
    except FileNotFoundError:
        found = "missing" if not folder.exists() else f"without {MANIFEST} (an unfinished pretokenize?)"
        raise ValueError(f"--vocab-size {vocab_size}: the pretokenized data {folder} is {found}; {rerun}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--vocab-size {vocab_size}: unreadable {folder / MANIFEST} ({e}); {rerun}") from None
    files = [folder / name for name in sorted(counts)]
    for f in files:
        size = f.stat().st_size if f.exists() else None
        if size != 2 * counts[f.name]:
            what = "is missing" if size is None else f"has {size // 2} tokens, not {counts[f.name]}"
            raise ValueError(f"--vocab-size {vocab_size}: {f} {what}: the pretokenized set is incomplete; {rerun}")
    if len(files) < 2:
        raise ValueError(f"--vocab-size {vocab_size}: need at least 2 pretokenized shards in {folder} "
                         f"(found {len(files)}: shard 0 is validation); download more shards, then {rerun}")
    return files


class TokenShards:
    """Memory-mapped uint16 token shards of one split; random windows of seq_len + 1 tokens."""

    def __init__(self, data_dir, vocab_size: int, split: str):
        files = complete_token_files(data_dir, vocab_size)
        files = files[:1] if split == "val" else files[1:]
        self.arrays = [np.memmap(f, dtype=np.uint16, mode="r") for f in files]
        self.files = files
        for f, a in zip(files, self.arrays):  # one read of each shard: a token past the vocabulary is no index
            top = int(a.max()) if len(a) else -1
            if top >= vocab_size:
                raise ValueError(f"{f}: token id {top} is outside the vocabulary of --vocab-size {vocab_size}; "
                                 f"tokenize with the tok{vocab_size}.model tokenizer, or pass the --vocab-size "
                                 f"the shards were made with")

    def batch(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-token targets, (batch_size, seq_len) int64 each."""
        starts = np.array([len(a) - seq_len - 1 for a in self.arrays], dtype=np.int64)
        if starts.max() < 0:
            raise ValueError(f"--seq-len {seq_len} is longer than every shard in {self.files[0].parent}")
        weights = np.clip(starts, 0, None).astype(np.float64)
        which = rng.choice(len(self.arrays), size=batch_size, p=weights / weights.sum())
        buf = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for row, s in enumerate(which):
            i = int(rng.integers(0, starts[s] + 1))
            buf[row] = self.arrays[s][i:i + seq_len + 1]
        return buf[:, :-1], buf[:, 1:]


# -----------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = ArgParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{download,download_tokenizer,train_vocab,pretokenize}")
    p = sub.add_parser("download", help="download and unpack the TinyStories_all_data archive")
    p.add_argument("--url", default=URL, help="where the archive is (http, https or file URL)")
    p.add_argument("--sha256", default=ARCHIVE_SHA256, help="expected sha256 of the archive ('' to skip)")
    p.add_argument("--size", type=int, default=ARCHIVE_SIZE, help="expected size in bytes (0 to skip)")
    p = sub.add_parser("download_tokenizer",
                       help="download Llama 2's tokenizer (32000 tokens, from llama2.c) to <data-dir>/tok32000.model")
    p.add_argument("--url", default=TOKENIZER_URL, help="where the sentencepiece .model is")
    p.add_argument("--sha256", default=TOKENIZER_SHA256, help="expected sha256 ('' to skip)")
    p.add_argument("--size", type=int, default=TOKENIZER_SIZE, help="expected size in bytes (0 to skip)")
    p = sub.add_parser("train_vocab", help="train a sentencepiece BPE tokenizer on a sample of the stories")
    p.add_argument("--vocab-size", type=int, required=True, help="tokens of the vocabulary to train")
    p.add_argument("--num-shards", type=int, default=VOCAB_SHARDS, help="training shards to sample stories from")
    p = sub.add_parser("pretokenize", help="tokenize every shard to uint16 .bin files, in parallel")
    p.add_argument("--vocab-size", type=int, default=None, help="use <data-dir>/tok<N>.model from train_vocab")
    p.add_argument("--tokenizer", default=None, help="an existing sentencepiece .model (e.g. Llama 2's, 32000)")
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    for p in sub.choices.values():
        p.add_argument("--data-dir", default=DATA_DIR, help=f"the data folder (default: {DATA_DIR})")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            cmd_download(args)
        elif args.command == "download_tokenizer":
            cmd_download_tokenizer(args)
        elif args.command == "train_vocab":
            cmd_train_vocab(args)
        else:
            if args.tokenizer is None and args.vocab_size is None:
                raise ValueError("pretokenize needs --vocab-size N (a tokenizer from train_vocab) or --tokenizer PATH")
            cmd_pretokenize(args)
    except (ValueError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
