"""Optimizer step time and state memory of MetaOptimize against torch AdamW (fused and foreach).

    python3 scripts/bench_optimizer.py                     # CPU: ResNet-18 and 15M-transformer sets
    python3 scripts/bench_optimizer.py --device cuda       # on a GPU
    python3 scripts/bench_optimizer.py --quick             # a few variants, fewer rounds
    python3 scripts/bench_optimizer.py --threads 1,0 --processes 6 --quick --skip-loop
                                                           # part 1 at 1 thread and torch's default, in 6
                                                           # fresh processes: min/median/max of the ratios
    python3 scripts/bench_optimizer.py --around --skip-steps --skip-loop   # MetaOptimize.around only

Part 1 times `optimizer.step()` alone, with fixed random gradients, on the parameter tensors of
the CIFAR ResNet-18 (62 tensors, 11.17M weights) and of the llama2.c 15M transformer (56 tensors):
torch AdamW fused (the reference: the fastest AdamW torch has) and foreach, MetaOptimize's default
step for every base x meta pair (scalar step size), (AdamW, Lion) with every kind of block, with
impl="foreach" and with bfloat16 state, and weight-wise and node-wise blocks (AdamW with every meta
rule: weight-wise fuses the meta update into the step's pass). Part 2 times the first step of a new
process on each parameter set (on CPU building the fused C kernel, with an empty kernel cache and
with the cache; on CUDA compiling the step with torch.compile). Part 3 times a whole batch-size-1
training step (forward, backward, step) of the continual experiment's small CNN.

All variants of a part live in one process and are timed in interleaved rounds (round-robin,
reversed every other round), so slow drifts of a shared machine hit every variant alike; the
table gives the min and the median of the rounds and their ratios to torch's fused and foreach
AdamW. On a machine shared with other work, trust the min: interference only adds time.
"""

from __future__ import annotations

import argparse
import json
import os
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

from common.benchmark import environment, interleaved, markdown_table, stream_pass, write_results  # noqa: E402
from common.models import ContinualCNN, cifar_resnet18  # noqa: E402
from common.optimizers import BASE_RULES, MetaOptimize  # noqa: E402

PAPER_META = dict(normalizer_param_meta=0.999, momentum_param_meta=0.99, lion_beta2_meta=0.9)
PAPER_BASE = dict(weight_decay_base=0.1, normalizer_param_base=0.999, momentum_param_base=0.9, lion_beta2_base=0.9)
METAS = ("fixed", "SGD", "RMSProp", "Adam", "Lion")
FUSED, FOREACH = "torch AdamW fused", "torch AdamW foreach"
# float32 streams a step must read and write, as pure memory passes (the "floor" rows, CPU): AdamW's
# w, g, m, v (g read only); weight-wise blocks add h, beta and the meta rule's state (Lion: one, Adam: two)
STEP_FLOORS = ((4, 3, "AdamW's w g m v"), (7, 6, "weightwise Lion"), (8, 7, "weightwise Adam"))
AROUND_FLOOR = "floor: AdamW + w0 copy + 4R/2W"


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
    # and MetaOptimize's per-block state: beta and the meta rule's (a float or two per weight, weight-wise)
    per_param += sum(v.numel() * v.element_size() / 4 for v in
                     [getattr(opt, "_beta", None), *getattr(opt, "_meta_state", {}).values()] if torch.is_tensor(v))
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


def prepared_steps(factories, shapes, device):
    """Each factory's optimizer over its own parameters of `shapes`, with the same fixed random
    gradients, after one step: its step() to time, and its state in floats per weight."""
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
    return variants, memory


def bench_steps(args, device, set_name):
    make_model, blocks = PARAMETER_SETS[set_name]
    shapes = [p.shape for p in make_model().parameters()]
    threads = torch.get_num_threads()
    print(f"\n== optimizer.step() on the {set_name} parameter set: {len(shapes)} tensors, "
          f"{sum(s.numel() for s in shapes):,} weights, {device}, {threads} threads ==")
    pairs = [("AdamW", "Lion"), ("Lion", "Lion"), ("AdamW", "Adam")] if args.quick else [
        (b, m) for b in BASE_RULES for m in METAS]
    factories = {FUSED: torch_adamw("fused"), FOREACH: torch_adamw("foreach")}
    factories.update({f"{b}+{m} scalar": metaoptimize(b, m) for b, m in pairs})
    kinds = [blocks] if args.quick else [blocks, "layerwise", "nodewise", "weightwise"]
    factories.update({f"AdamW+Lion {k}": metaoptimize("AdamW", "Lion", k) for k in kinds})
    # weight-wise and node-wise with each meta rule (quick: the paper's Lion and Adam)
    for meta in (("Lion", "Adam") if args.quick else METAS[1:]):
        for k in ("weightwise", "nodewise"):
            factories[f"AdamW+{meta} {k}"] = metaoptimize("AdamW", meta, k)
    factories["AdamW+Lion scalar, bf16 state"] = metaoptimize("AdamW", "Lion", state_dtype=torch.bfloat16)
    factories["AdamW+Lion scalar, foreach"] = metaoptimize("AdamW", "Lion", impl="foreach")
    variants, memory = prepared_steps(factories, shapes, device)
    if device.type == "cpu":  # what moving the streams alone costs here (common.benchmark.stream_pass)
        for reads, writes, what in STEP_FLOORS:
            name = f"floor {reads}R/{writes}W ({what})"
            variants[name], memory[name] = stream_pass(shapes, reads, writes), 0.0
    return table(f"optimizer.step(), {set_name} parameter set ({len(shapes)} tensors, "
                 f"{sum(s.numel() for s in shapes):,} weights), {threads} threads, {args.rounds} interleaved rounds",
                 interleaved(variants, args.rounds, device, warmup_rounds=2), memory=memory)


FIRST_STEP = """
import sys, time, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/tinystories")
from common.models import cifar_resnet18
from common.optimizers import MetaOptimize
from model import ModelArgs, Transformer
device = torch.device({device!r})
make = {{"resnet18": cifar_resnet18, "transformer15m": lambda: Transformer(ModelArgs())}}[{set_name!r}]
params = [torch.nn.Parameter(p.detach().to(device)) for p in make().parameters()]
for p in params:
    p.grad = torch.randn_like(p)

def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()

sync()
start = time.perf_counter()
opt = MetaOptimize(params, alg_base="AdamW", alg_meta="Lion", stepsize_groups={groups!r}, impl={impl!r})
opt.step()
sync()
first = time.perf_counter() - start
start = time.perf_counter()
opt.step()
sync()
print(first, time.perf_counter() - start, opt.impl)
"""


def around_floor(shapes):
    """The least a wrapper that takes u = w1 - w0 from the base's own step can cost (CPU): the bare
    fused AdamW step, the w0 copy before it (around.py's non-temporal C copy), and a pure pass that
    reads w, w0, h, g and writes w, h (common.benchmark.stream_pass), with none of its arithmetic."""
    from common.optimizers.around_kernel import CopyKernel

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    base, copy, w0 = torch_adamw("fused")(params), CopyKernel(), [torch.empty_like(p) for p in params]
    post = stream_pass(shapes, 4, 2)

    def step():
        copy(w0, params)
        base.step()
        post()
    return step


def bench_around(args, device, set_name):
    """MetaOptimize.around(torch AdamW fused) against the bare fused AdamW, at each thread count of
    --threads (0: torch's default), interleaved in one process."""
    make_model, _ = PARAMETER_SETS[set_name]
    shapes = [p.shape for p in make_model().parameters()]
    factories = {FUSED: torch_adamw("fused"), FOREACH: torch_adamw("foreach")}
    for meta, impl in (("Adam", "fused"), ("fixed", "fused"), ("Adam", "foreach")):
        factories[f"around(AdamW fused) {meta}, impl={impl}"] = (
            lambda params, meta=meta, impl=impl: MetaOptimize.around(
                torch_adamw("fused")(params), alg_meta=meta, alpha0=1.0, impl=impl, **PAPER_META))
    default_threads, rows = torch.get_num_threads(), {}
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        print(f"\n== MetaOptimize.around(AdamW fused).step() on the {set_name} parameter set, {device}, "
              f"{torch.get_num_threads()} threads ==")
        variants, memory = prepared_steps(factories, shapes, device)
        if device.type == "cpu":
            variants[AROUND_FLOOR] = around_floor(shapes)
        # the wrapper's own state (w0, h) over the base's: floats per weight
        memory = {name: memory[name] if name.startswith("around") else 0.0 for name in variants}
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


def bench_first_step(args, device):
    """Construction + first step in a fresh process, on each parameter set: on CPU building the fused
    C kernel (empty cache) or loading it (cached); on CUDA compiling the step (torch.compile)."""
    print(f"\n== first step of a new process ((AdamW, Lion), {device}): the fused step's build or compile time ==")
    rows = {}
    sets = [s.strip() for s in args.sets.split(",")]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "METAOPTIMIZE_CACHE": cache}
        runs = [("fused, empty kernel cache", "fused"), ("fused, cached kernel", "fused"), ("foreach", "foreach")] \
            if device.type == "cpu" else [("fused (torch.compile)", "fused"), ("foreach", "foreach")]
        for set_name in sets:
            for groups in ("weightwise",) if args.quick else ("scalar", "weightwise"):
                for label, impl in runs:
                    code = FIRST_STEP.format(root=str(ROOT), device=str(device), set_name=set_name, groups=groups,
                                             impl=impl)
                    if label.endswith("empty kernel cache"):
                        env["METAOPTIMIZE_CACHE"] = tempfile.mkdtemp(dir=cache)
                    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                         check=True).stdout.split()
                    first, second = float(out[0]), float(out[1])
                    name = f"{set_name}, {groups}, {label}"
                    rows[name] = {"first_step_s": first, "second_step_s": second, "impl": out[2]}
                    print(f"{name:48s} first step {first:7.3f} s   second step {second * 1e3:8.2f} ms  ({out[2]})")
    MARKDOWN.append(f"## First step of a new process (construction + first step; (AdamW, Lion), {device})\n\n"
                    + markdown_table(["variant", "first step s", "second step ms", "impl"],
                                     [[k, f"{v['first_step_s']:.3f}", f"{v['second_step_s'] * 1e3:.2f}", v["impl"]]
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


def thread_counts(text: str) -> list[int]:
    """--threads: a comma-separated list of counts, 0 for torch's default."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError(f"expected counts >= 0 separated by commas (0: torch's default), got {text!r}")
    return counts


def spread_across_processes(args) -> dict:
    """Part 1 in `args.processes` fresh processes (each its own allocation, thread pool and page
    layout): per variant the min, median and max across processes of its ratio to fused AdamW."""
    argv = [a for a in sys.argv[1:]]
    for flag in ("--processes", "--record"):  # the children run once each and record nothing
        while flag in argv:
            k = argv.index(flag)
            del argv[k:k + 2]
    per_process = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.processes):
            out = Path(tmp) / f"{k}.json"
            subprocess.run([sys.executable, __file__, *argv, "--skip-loop", "--skip-first-step", "--raw-json",
                            str(out)], check=True, stdout=subprocess.DEVNULL)
            per_process.append(json.loads(out.read_text()))
            print(f"process {k + 1}/{args.processes} done", flush=True)
    spread, cells = {}, []
    for part in per_process[0]:
        for name in per_process[0][part]:
            ratios = [p[part][name]["x_fused"] for p in per_process]
            ms = [p[part][name]["min_s"] * 1e3 for p in per_process]
            spread.setdefault(part, {})[name] = {"x_fused": ratios, "min_ms": ms}
            cells.append([part.removeprefix("step_"), name, f"{min(ms):.2f}", f"{statistics.median(ms):.2f}",
                          f"{max(ms):.2f}", f"{min(ratios):.2f}", f"{statistics.median(ratios):.2f}",
                          f"{max(ratios):.2f}"])
    columns = ["set, threads", "variant", "min ms (best process)", "median ms", "max ms (worst process)",
               "x fused min", "x fused median", "x fused max"]
    text = markdown_table(columns, cells)
    print(f"\n== spread across {args.processes} fresh processes (each: the min of its rounds) ==\n{text}")
    MARKDOWN.append(f"## Spread across {args.processes} fresh processes (each process: min of its rounds)\n\n{text}")
    return spread


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds per variant (after 2 warm-up rounds)")
    parser.add_argument("--inner", type=int, default=200, help="batch-1 training steps per timed round")
    parser.add_argument("--threads", type=thread_counts, default=[0],
                        help="torch CPU threads for part 1, comma-separated (0: torch's default), e.g. 1,0")
    parser.add_argument("--processes", type=int, default=0,
                        help="run part 1 in N fresh processes and print the spread of the ratios across them")
    parser.add_argument("--sets", default="resnet18,transformer15m", help="parameter sets of part 1")
    parser.add_argument("--quick", action="store_true", help="a few variants only")
    parser.add_argument("--skip-steps", action="store_true", help="only the batch-1 loop")
    parser.add_argument("--skip-loop", action="store_true", help="no batch-1 loop")
    parser.add_argument("--skip-first-step", action="store_true", help="no first-step (build/compile time) part")
    parser.add_argument("--only-first-step", action="store_true", help="only the first-step (build/compile time) part")
    parser.add_argument("--raw-json", default=None, help=argparse.SUPPRESS)  # a child of --processes
    parser.add_argument("--around", action="store_true",
                        help="also time MetaOptimize.around(torch AdamW fused) against the bare fused AdamW (at each "
                             "--threads count)")
    parser.add_argument("--record", default=None, metavar="STEM",
                        help="also write STEM.md and STEM.json (date, machine, command, tables, raw times)")
    args = parser.parse_args()
    if args.processes < 0:
        parser.error(f"--processes: expected a count >= 0, got {args.processes}")
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    env = environment(device)  # the date and commit of the start, for --record
    print(f"torch {torch.__version__}, {default_threads} CPU threads by default")
    results = {}
    if args.only_first_step:
        args.skip_steps = args.skip_loop = True
    if not args.skip_steps and args.processes:
        results["spread"] = spread_across_processes(args)
    elif not args.skip_steps:
        for threads in args.threads:
            torch.set_num_threads(threads or default_threads)
            for name in args.sets.split(","):
                results[f"step_{name.strip()} {torch.get_num_threads()} threads"] = bench_steps(args, device,
                                                                                              name.strip())
        torch.set_num_threads(default_threads)
    if args.only_first_step or not (args.skip_steps or args.skip_first_step):
        results["first_step"] = bench_first_step(args, device)
    if args.around:
        for name in args.sets.split(","):
            results[f"around_{name.strip()}"] = bench_around(args, device, name.strip())
    if not args.skip_loop:
        results["batch1_loop"] = bench_batch1_loop(args, device)
    if args.raw_json:
        Path(args.raw_json).write_text(json.dumps(results))
    if args.record:
        paths = write_results(args.record, title="MetaOptimize step time against torch AdamW (scripts/bench_optimizer.py)",
                              table="\n\n".join(MARKDOWN), raw=results, device=device, env=env,
                              notes=["Ratios are of the min over rounds (interference only adds time)."])
        print("recorded " + ", ".join(map(str, paths)))
    return results


if __name__ == "__main__":
    main()
