"""Generate stories from a trained TinyStories checkpoint.

    python tinystories/sample.py --run-dir outputs/adamw_lion --start "Once upon a time" --num-samples 3
    python tinystories/sample.py --checkpoint outputs/adamw_lion/checkpoint.pt --temperature 0 # greedy

The tokenizer defaults to <data-dir>/tok<vocab>.model of the run (prepare.py keeps a copy there).
A checkpoint of `train.py --fsdp` names the folder of its shards next to it; they load into the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from model import ModelArgs, Transformer, describe
from prepare import load_tokenizer, tokenizer_path

from common import harness, sharded
from common.cli import first_line

# -----------------------------------------------------------------------------
DEFAULTS = dict(
    start="",  # prompt; empty: start from BOS only
    num_samples=1,
    max_new_tokens=200,
    temperature=1.0,  # 0: greedy
    top_k=300,  # sample from the k most likely tokens (0: all)
    seed=1337,
    device="auto",
)
# -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = harness.ArgParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="a run folder of train.py (uses its checkpoint.pt)")
    src.add_argument("--checkpoint", help="path of a checkpoint.pt")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the run's tok<vocab>.model)")
    parser.add_argument("--start", help="prompt text")
    parser.add_argument("--num-samples", type=int, help="stories to generate")
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per story")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, help="random seed of the sampling")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    parser.set_defaults(**DEFAULTS)
    return parser.parse_args(argv)


def load_model(path, device) -> tuple[Transformer, dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--checkpoint: no file {path} (train.py writes <save-directory>/<run-name>/checkpoint.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint at all, ...: torch raises many types
        raise ValueError(f"--checkpoint: cannot read {path} ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(state, dict) or "model_args" not in state or ("model" not in state and "sharded" not in state):
        raise ValueError(f"--checkpoint: {path} is not a tinystories/train.py checkpoint")
    try:
        model = Transformer(ModelArgs(**state["model_args"]))
        if state.get("sharded") is not None:  # train.py --fsdp
            sharded.load(path.parent / state["sharded"], model)
        else:
            model.load_state_dict(state["model"])
    except (TypeError, RuntimeError, ValueError, OSError) as e:
        raise ValueError(f"--checkpoint: {path} does not hold a model this sample.py can build "
                         f"({first_line(e)})") from None
    return model.to(device).eval(), state


def main():
    args = parse_args()
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    device = harness.resolve_device(args.device)
    model, state = load_model(args.checkpoint or Path(args.run_dir) / "checkpoint.pt", device)
    print(describe(model))
    vocab = model.args.vocab_size
    sp = load_tokenizer(args.tokenizer or tokenizer_path(state["data_dir"], vocab))
    if sp.vocab_size() != vocab:
        raise ValueError(f"--tokenizer: it has {sp.vocab_size()} tokens but the model was trained with {vocab}")

    prompt = [sp.bos_id()] + sp.encode(args.start)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                         generator=gen)
    bos = sp.bos_id()
    for row in out.tolist():
        stories = [[]]  # a BOS the model generates starts a new story
        for t in row[1:]:
            if t == bos:
                stories.append([])
            else:
                stories[-1].append(t)
        print("\n\n".join(sp.decode(s) for s in stories))
        print("-" * 40, flush=True)
    return 0


if __name__ == "__main__":
    harness.run_main(main)
