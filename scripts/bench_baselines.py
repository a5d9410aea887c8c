"""Step time and optimizer-state memory of every --optimizer choice, relative to torch AdamW.

    python3 scripts/bench_baselines.py                  # CPU, both parameter sets
    python3 scripts/bench_baselines.py --device cuda    # on a GPU (also reports allocated memory)
    python3 scripts/bench_baselines.py --rounds 3 --sets resnet18

The paper's overhead table: each method as a user runs it (`common.specs.build_optimizer` with the
default flags of `--optimizer NAME`), on the parameter tensors of the CIFAR ResNet-18 (62 tensors,
11.17M weights) and of the 15M llama2.c transformer (dim 288, 6 layers, 6 heads, SwiGLU hidden
768, vocab 32000 tied with the output: 56 tensors, 15.19M weights; seq 256 adds no weights),
with fixed random gradients. All methods of a set live in one process and are timed in
interleaved rounds (round-robin), so slow drifts of a shared machine hit all alike; medians
and minima (the minimum is the steadier number on a loaded machine).

Step time: `optimizer.step()` alone (gradients are restored before each step, untimed, since
some methods change them in place). For gdtuo it includes sending the new gradient back
through the kept graph of the last update (in gdtuo's own loop that work is part of the
backward pass).

State memory: the bytes of every distinct tensor storage reachable from the optimizer object
(its state, param groups, averaged weights, gdtuo's hyperparameters and kept autograd graph,
including tensors saved for backward), not counting the weights and their gradients; shown in
float32 copies of the weights ("x weights") and relative to AdamW. On CUDA the growth of
`torch.cuda.memory_allocated` after building and stepping each optimizer is shown too.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `common` without installing the repo

import torch

from common.benchmark import environment, interleaved, markdown_table, write_results
from common.specs import build_optimizer

METHODS = {  # row name -> spec (common/specs.py), the flags' defaults
    "torch AdamW": {"optimizer": "AdamW"},
    "MetaOptimize (AdamW, Lion) scalar": {"optimizer": "HF"},
    "DoG (+ averaging)": {"optimizer": "DoG"},
    "LDoG (+ averaging)": {"optimizer": "LDoG"},
    "Prodigy": {"optimizer": "Prodigy"},
    "DAdaptAdam": {"optimizer": "DAdaptAdam"},
    "ScheduleFree AdamW": {"optimizer": "ScheduleFree"},
    "Mechanic (AdamW)": {"optimizer": "Mechanic"},
    "gdtuo (Adam / SGD)": {"optimizer": "gdtuo"},
}


def resnet18_shapes() -> list[tuple[int, ...]]:
    try:
        from common.models import cifar_resnet18

        return [tuple(p.shape) for p in cifar_resnet18().parameters()]
    except ImportError:  # the same 62 shapes, written out
        shapes = [(64, 3, 3, 3), (64,), (64,)]
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for block in range(2):
                shapes += [(planes, in_planes, 3, 3), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,)]
                if block == 0 and (stride != 1 or in_planes != planes):
                    shapes += [(planes, in_planes, 1, 1), (planes,), (planes,)]
                in_planes = planes
        return shapes + [(10, 512), (10,)]


def transformer15m_shapes(dim=288, n_layers=6, vocab=32000, hidden=768) -> list[tuple[int, ...]]:
    """llama2.c order: embedding (tied with the output), per layer wq wk wv wo w1 w2 w3 and two
    RMSNorm weights, the final norm."""
    shapes = [(vocab, dim)]
    for _ in range(n_layers):
        shapes += [(dim, dim)] * 4 + [(hidden, dim), (dim, hidden), (hidden, dim), (dim,), (dim,)]
    return shapes + [(dim,)]


SETS = {"resnet18": ("CIFAR ResNet-18", resnet18_shapes), "transformer15m": ("15M transformer", transformer15m_shapes)}


def reachable_state_bytes(optimizer, exclude: set[int]) -> int:
    """Bytes of distinct storages reachable from `optimizer`, except those in `exclude` (data_ptrs)."""
    packages = ("torch.optim", "common", "dog", "prodigyopt", "mechanic_pytorch", "gradient_descent",
                "schedulefree", "dadaptation")
    seen, storages, todo = set(), {}, [optimizer]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude and storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
            todo += [obj.grad_fn, obj.grad if obj.is_leaf else None]
        elif isinstance(obj, dict):
            todo += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo += list(obj)
        elif isinstance(obj, torch.nn.Module):
            todo += list(obj.parameters()) + list(obj.buffers())
        elif hasattr(obj, "next_functions"):  # an autograd node: tensors saved for backward
            todo += [fn for fn, _ in obj.next_functions]
            if hasattr(obj, "variable"):
                todo.append(obj.variable)
            for name in dir(obj):
                if name.startswith("_saved_"):
                    with contextlib.suppress(RuntimeError):  # freed
                        todo.append(getattr(obj, name))
        elif hasattr(obj, "__dict__") and (obj is optimizer or type(obj).__module__.startswith(packages)):
            todo.append(vars(obj))
    return sum(storages.values())


def bench_set(key: str, args, device) -> list[dict]:
    title, make_shapes = SETS[key]
    shapes = make_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"\n== {title}: {len(shapes)} tensors, {n / 1e6:.2f}M weights, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds ==")
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    variants, prepares, memory, allocated = {}, {}, {}, {}
    keep = []
    for name, spec in METHODS.items():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        gc.collect()
        base = 0
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.05).to(device)) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
        opt = build_optimizer(params, spec)

        def prepare(params=params):
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.grad.copy_(g)

        prepare()
        opt.step()
        prepare()
        opt.step()  # state is allocated now; gdtuo holds its graph
        exclude = {p.untyped_storage().data_ptr() for p in params} | {
            p.grad.untyped_storage().data_ptr() for p in params}
        memory[name] = reachable_state_bytes(opt, exclude)
        if device.type == "cuda":
            torch.cuda.synchronize()
            allocated[name] = torch.cuda.memory_allocated(device) - base
        variants[name] = opt.step
        prepares[name] = prepare
        keep.append((params, opt))
    timings = interleaved(variants, args.rounds, device, warmup_rounds=2, before=lambda name: prepares[name]())
    timed = {k: (statistics.median(t.wall), min(t.wall)) for k, t in timings.items()}
    medians = {k: v[0] for k, v in timed.items()}
    mins = {k: v[1] for k, v in timed.items()}
    ref_t, ref_min, ref_m = medians["torch AdamW"], mins["torch AdamW"], memory["torch AdamW"]
    weight_bytes = 4 * n
    cols = (f"{'method':36s} {'step ms':>9s} {'x AdamW':>8s} {'min ms':>8s} {'x AdamW':>8s} {'state MB':>9s} "
            f"{'x weights':>9s} {'x AdamW':>8s}")
    if allocated:
        cols += f" {'cuda alloc MB':>13s}"
    print(cols)
    rows = []
    for name in variants:
        line = (f"{name:36s} {medians[name] * 1e3:9.1f} {medians[name] / ref_t:8.2f} {mins[name] * 1e3:8.1f} "
                f"{mins[name] / ref_min:8.2f} {memory[name] / 2**20:9.1f} "
                f"{memory[name] / weight_bytes:9.2f} {memory[name] / ref_m:8.2f}")
        if allocated:
            line += f" {allocated[name] / 2**20:13.1f}"
        print(line)
        rows.append({"set": key, "method": name, "step_ms": medians[name] * 1e3, "time_x_adamw": medians[name] / ref_t,
                     "min_step_ms": mins[name] * 1e3, "min_x_adamw": mins[name] / ref_min,
                     "state_mb": memory[name] / 2**20, "state_x_weights": memory[name] / weight_bytes,
                     "state_x_adamw": memory[name] / ref_m})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per method (after 2 warm-up rounds)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="parameter sets")
    parser.add_argument("--only", nargs="*", default=None,
                        help="only methods whose row name contains one of these (AdamW is always kept)")
    parser.add_argument("--record", default=None, metavar="STEM",
                        help="record the tables and every measurement as STEM.md + STEM.json, with date, command "
                             "and machine (e.g. results/bench_baselines_cpu)")
    args = parser.parse_args(argv)
    if args.only is not None:
        args.only = [*args.only, "torch AdamW"]
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device, argv)  # the date and commit of the start, for --record
    print(f"torch {torch.__version__}")
    rows = []
    for key in args.sets:
        rows += bench_set(key, args, device)
    if args.record:
        columns = ["set", "method", "step ms", "x AdamW", "min ms", "x AdamW", "state MB", "x weights", "x AdamW"]
        keys = ["set", "method", "step_ms", "time_x_adamw", "min_step_ms", "min_x_adamw", "state_mb",
                "state_x_weights", "state_x_adamw"]
        table = markdown_table(columns, [[r[k] if isinstance(r[k], str) else f"{r[k]:.2f}" for k in keys]
                                         for r in rows])
        paths = write_results(args.record, title="Optimizer step time and state memory (scripts/bench_baselines.py)",
                              table=table, raw=rows, device=device, env=env, notes=[
                                  f"optimizer.step() alone, median and min of {args.rounds} interleaved rounds; state: "
                                  "bytes reachable from the optimizer besides the weights and their gradients."])
        print(f"recorded {paths[0]} and {paths[1]}")
    return rows


if __name__ == "__main__":
    main()
