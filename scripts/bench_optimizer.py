"""Optimizer step time and state memory of MetaOptimize against torch AdamW (fused and foreach).

    python3 scripts/bench_optimizer.py                     # CPU: ResNet-18 and 15M-transformer sets
    python3 scripts/bench_optimizer.py --device cuda       # on a GPU
    python3 scripts/bench_optimizer.py --quick             # a few variants, fewer rounds
    python3 scripts/bench_optimizer.py --around --skip-steps --skip-loop   # MetaOptimize.around only

Part 1 times `optimizer.step()` alone, with fixed random gradients, on the parameter tensors of
the CIFAR ResNet-18 (62 tensors, 11.17M weights) and of the llama2.c 15M transformer (56 tensors):
torch AdamW fused (the reference: the fastest AdamW torch has) and foreach, MetaOptimize's default
step for every base x meta pair (scalar step size), (AdamW, Lion) with every kind of block, with
impl="foreach" and with bfloat16 state. Part 2 times the first step of a new process (building the
fused kernel: with an empty kernel cache, then with the cache). Part 3 times a whole batch-size-1
training step (forward, backward, step) of the continual experiment's small CNN.

All variants of a part live in one process and are timed in interleaved rounds (round-robin,
reversed every other round), so slow drifts of a shared machine hit every variant alike; the
table gives the min and the median of the rounds and their ratios to torch's fused and foreach
AdamW. On a machine shared with other work, trust the min: interference only adds time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tinystories"))

from model import ModelArgs, Transformer  # noqa: E402  (tinystories/model.py)

from common.benchmark import environment, interleaved, markdown_table, write_results  # noqa: E402
from common.models import ContinualCNN, cifar_resnet18  # noqa: E402
from common.optimizers import BASE_RULES, MetaOptimize  # noqa: E402

PAPER_META = dict(normalizer_param_meta=0.999, momentum_param_meta=0.99, lion_beta2_meta=0.9)
PAPER_BASE = dict(weight_decay_base=0.1, normalizer_param_base=0.999, momentum_param_base=0.9, lion_beta2_base=0.9)
METAS = ("fixed", "SGD", "RMSProp", "Adam", "Lion")
FUSED, FOREACH = "torch AdamW fused", "torch AdamW foreach"


def torch_adamw(kind):
    def make(params):
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **{kind: True})
    return make


def metaoptimize(base, meta, groups="scalar", **kw):
    def make(params):
        return MetaOptimize(params, alg_base=base, alg_meta=meta, alpha0=1e-6, stepsize_groups=groups, **PAPER_BASE,
                            **PAPER_META, **kw)
    return make


PARAMETER_SETS = {
    "resnet18": (cifar_resnet18, "resnet18_blocks"),
    "transformer15m": (lambda: Transformer(ModelArgs()), "transformer_blocks_15m"),
}


def state_floats_per_weight(opt, params) -> float:
    per_param = sum(v.numel() * v.element_size() / 4 for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v))
    return per_param / sum(p.numel() for p in params)


MARKDOWN: list[str] = []  # the tables of every part, for --record


def table(title: str, timed: dict, inner: int = 1, unit: float = 1e3, unit_name: str = "ms",
          memory: dict | None = None):
    """Print (and keep for --record) min and median per variant and the ratios of the mins to torch's
    fused and foreach AdamW."""
    fused, foreach = min(timed[FUSED].wall), min(timed[FOREACH].wall)
    print(f"{'variant':34s} {'min ' + unit_name:>10s} {'median':>9s} {'x fused':>8s} {'x foreach':>9s}"
          + (f" {'state floats/weight':>20s}" if memory else ""))
    rows, cells = {}, []
    for name, t in timed.items():
        low, med = min(t.wall), statistics.median(t.wall)
        rows[name] = {"min_s": low / inner, "median_s": med / inner, "x_fused": low / fused,
                      "x_foreach": low / foreach, "all_s": [w / inner for w in t.wall]}
        extra = f" {memory[name]:20.2f}" if memory else ""
        print(f"{name:34s} {low / inner * unit:10.3f} {med / inner * unit:9.3f} {low / fused:8.2f} "
              f"{low / foreach:9.2f}{extra}")
        cells.append([name, f"{low / inner * unit:.3f}", f"{med / inner * unit:.3f}", f"{low / fused:.2f}",
                      f"{low / foreach:.2f}", *([f"{memory[name]:.2f}"] if memory else [])])
    columns = ["variant", f"min {unit_name}", f"median {unit_name}", "x torch AdamW fused (min)",
               "x torch AdamW foreach (min)", *(["state floats/weight"] if memory else [])]
    MARKDOWN.append(f"## {title}\n\n" + markdown_table(columns, cells))
    return rows


def bench_steps(args, device, set_name):
    make_model, blocks = PARAMETER_SETS[set_name]
    shapes = [p.shape for p in make_model().parameters()]
    print(f"\n== optimizer.step() on the {set_name} parameter set: {len(shapes)} tensors, "
          f"{sum(s.numel() for s in shapes):,} weights, {device}, {torch.get_num_threads()} threads ==")
    pairs = [("AdamW", "Lion"), ("Lion", "Lion"), ("AdamW", "Adam")] if args.quick else [
        (b, m) for b in BASE_RULES for m in METAS]
    factories = {FUSED: torch_adamw("fused"), FOREACH: torch_adamw("foreach")}
    factories.update({f"{b}+{m} scalar": metaoptimize(b, m) for b, m in pairs})
    kinds = [blocks] if args.quick else [blocks, "layerwise", "nodewise", "weightwise"]
    factories.update({f"AdamW+Lion {k}": metaoptimize("AdamW", "Lion", k) for k in kinds})
    factories["AdamW+Lion scalar, bf16 state"] = metaoptimize("AdamW", "Lion", state_dtype=torch.bfloat16)
    factories["AdamW+Lion scalar, foreach"] = metaoptimize("AdamW", "Lion", impl="foreach")
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    variants, memory = {}, {}
    for name, make in factories.items():
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opt = make(params)
        opt.step()
        memory[name] = state_floats_per_weight(opt, params)
        variants[name] = opt.step
    return table(f"optimizer.step(), {set_name} parameter set ({len(shapes)} tensors, "
                 f"{sum(s.numel() for s in shapes):,} weights), {args.rounds} interleaved rounds",
                 interleaved(variants, args.rounds, device, warmup_rounds=2), memory=memory)


FIRST_STEP = """
import sys, time, torch
sys.path.insert(0, {root!r})
from common.models import cifar_resnet18
from common.optimizers import MetaOptimize
params = list(cifar_resnet18().parameters())
for p in params:
    p.grad = torch.randn_like(p)
start = time.perf_counter()
opt = MetaOptimize(params, alg_base="AdamW", alg_meta="Lion", impl={impl!r})
opt.step()
first = time.perf_counter() - start
start = time.perf_counter()
opt.step()
print(first, time.perf_counter() - start)
"""


def bench_around(args, device, set_name):
    """MetaOptimize.around(torch AdamW fused) against the bare fused AdamW, at each thread count of
    --around-threads (0: torch's default), interleaved in one process."""
    make_model, _ = PARAMETER_SETS[set_name]
    shapes = [p.shape for p in make_model().parameters()]
    factories = {FUSED: torch_adamw("fused"), FOREACH: torch_adamw("foreach")}
    for meta, impl in (("Adam", "fused"), ("fixed", "fused"), ("Adam", "foreach")):
        factories[f"around(AdamW fused) {meta}, impl={impl}"] = (
            lambda params, meta=meta, impl=impl: MetaOptimize.around(
                torch_adamw("fused")(params), alg_meta=meta, alpha0=1.0, impl=impl, **PAPER_META))
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    default_threads, rows = torch.get_num_threads(), {}
    for threads in [int(x) for x in args.around_threads.split(",")]:
        torch.set_num_threads(threads or default_threads)
        print(f"\n== MetaOptimize.around(AdamW fused).step() on the {set_name} parameter set, {device}, "
              f"{torch.get_num_threads()} threads ==")
        variants, memory = {}, {}
        for name, make in factories.items():
            params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
            for p, g in zip(params, grads):
                p.grad = g
            opt = make(params)
            opt.step()
            # the wrapper's own state (w0, h) over the base's: floats per weight
            memory[name] = state_floats_per_weight(opt, params) if name.startswith("around") else 0.0
            variants[name] = opt.step
        timed = interleaved(variants, args.rounds, device, warmup_rounds=2)
        title = (f"MetaOptimize.around(torch AdamW fused).step(), {set_name} parameter set ({len(shapes)} tensors), "
                 f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds (last column: the wrapper's "
                 "extra state)")
        rows[threads] = table(title, timed, memory=memory)
        # on a loaded machine the round-by-round ratios (both variants timed back to back) and the
        # ratio of process CPU times are steadier than the ratio of the mins
        cells = []
        for name, t in timed.items():
            paired = statistics.median(a / b for a, b in zip(t.wall, timed[FUSED].wall))
            cpu = min(t.cpu) / max(min(timed[FUSED].cpu), 1e-9)
            rows[threads][name].update(paired_median_x_fused=paired, cpu_min_x_fused=cpu)
            cells.append([name, f"{paired:.2f}", f"{cpu:.2f}"])
            print(f"{name:40s} x fused: median of per-round ratios {paired:5.2f}, of min CPU times {cpu:5.2f}")
        MARKDOWN.append(markdown_table(["variant", "x fused AdamW (median of per-round ratios)",
                                        "x fused AdamW (min CPU time)"], cells))
    torch.set_num_threads(default_threads)
    return rows


def bench_first_step(args):
    """Construction + first step in a fresh process: building the fused kernel (empty cache), loading it."""
    print("\n== first step of a new process (ResNet-18 set, (AdamW, Lion) scalar) ==")
    rows = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**__import__("os").environ, "METAOPTIMIZE_CACHE": cache}
        for name, impl in (("fused, empty kernel cache", "fused"), ("fused, cached kernel", "fused"),
                           ("foreach", "foreach")):
            out = subprocess.run([sys.executable, "-c", FIRST_STEP.format(root=str(ROOT), impl=impl)], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            first, second = float(out[0]), float(out[1])
            rows[name] = {"first_step_s": first, "second_step_s": second}
            print(f"{name:30s} first step {first:7.3f} s   second step {second * 1e3:8.2f} ms")
    MARKDOWN.append("## First step of a new process (construction + first step; ResNet-18 set, (AdamW, Lion))\n\n"
                    + markdown_table(["variant", "first step s", "second step ms"],
                                     [[k, f"{v['first_step_s']:.3f}", f"{v['second_step_s'] * 1e3:.2f}"]
                                      for k, v in rows.items()]))
    return rows


def bench_batch1_loop(args, device):
    print(f"\n== batch-size-1 training step (fwd + bwd + step) of the continual CNN, {device} ==")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (1,), generator=gen).to(device)
    setups = {FUSED: torch_adamw("fused"), FOREACH: torch_adamw("foreach"),
              "AdamW+fixed": metaoptimize("AdamW", "fixed"),
              "AdamW+Adam scalar": metaoptimize("AdamW", "Adam"),
              "AdamW+Adam last_layer_and_others": metaoptimize("AdamW", "Adam", "last_layer_and_others")}
    variants = {}
    for name, make in setups.items():
        torch.manual_seed(0)
        model = ContinualCNN().to(device)
        opt = make(list(model.parameters()))

        def train_step(model=model, opt=opt, steps=args.inner):
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

        variants[name] = train_step
    return table(f"batch-size-1 training step of the continual CNN (forward, backward, step), {args.inner} steps "
                 f"per round, {args.rounds} rounds", interleaved(variants, args.rounds, device, warmup_rounds=2),
                 inner=args.inner, unit=1e6, unit_name="us/step")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds per variant (after 2 warm-up rounds)")
    parser.add_argument("--inner", type=int, default=200, help="batch-1 training steps per timed round")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--sets", default="resnet18,transformer15m", help="parameter sets of part 1")
    parser.add_argument("--quick", action="store_true", help="a few variants only")
    parser.add_argument("--skip-steps", action="store_true", help="only the batch-1 loop")
    parser.add_argument("--skip-loop", action="store_true", help="no batch-1 loop")
    parser.add_argument("--around", action="store_true",
                        help="also time MetaOptimize.around(torch AdamW fused) against the bare fused AdamW")
    parser.add_argument("--around-threads", default="1,0", help="thread counts of --around (0: torch's default)")
    parser.add_argument("--record", default=None, metavar="STEM",
                        help="also write STEM.md and STEM.json (date, machine, command, tables, raw times)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)  # the date and commit of the start, for --record
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    results = {}
    if not args.skip_steps:
        for name in args.sets.split(","):
            results[f"step_{name}"] = bench_steps(args, device, name.strip())
        if device.type == "cpu":
            results["first_step"] = bench_first_step(args)
    if args.around:
        for name in args.sets.split(","):
            results[f"around_{name}"] = bench_around(args, device, name.strip())
    if not args.skip_loop:
        results["batch1_loop"] = bench_batch1_loop(args, device)
    if args.record:
        paths = write_results(args.record, title="MetaOptimize step time against torch AdamW (scripts/bench_optimizer.py)",
                              table="\n\n".join(MARKDOWN), raw=results, device=device, env=env,
                              notes=["Ratios are of the min over rounds (interference only adds time)."])
        print("recorded " + ", ".join(map(str, paths)))
    return results


if __name__ == "__main__":
    main()
