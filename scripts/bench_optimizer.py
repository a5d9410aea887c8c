"""Optimizer step time and state memory of MetaOptimize against torch AdamW, side by side.

    python3 scripts/bench_optimizer.py                 # CPU, CIFAR ResNet-18 parameter set
    python3 scripts/bench_optimizer.py --device cuda   # on a GPU
    python3 scripts/bench_optimizer.py --quick         # fewer pairs and repetitions

Part 1 times `optimizer.step()` alone on the 62 parameter tensors (11.17M weights) of the CIFAR
ResNet-18 with fixed random gradients, for every base x meta pair (scalar step size) and for
the (AdamW, Lion) pair with every kind of step-size group. Part 2 times a whole batch-size-1
training step (forward, backward, step) of the continual experiment's small CNN, since that
experiment runs 50,000 of them. All variants live in one process and are timed in interleaved
rounds (round-robin), so slow drifts of a shared machine hit every variant alike; the table
gives the median and the min of the rounds and their ratio to torch AdamW (foreach on CPU,
fused on CUDA); on a machine shared with other work, trust the min.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from common.benchmark import interleaved
from common.models import ContinualCNN, cifar_resnet18
from common.optimizers import BASE_NEEDS, MetaOptimize

PAPER_META = dict(normalizer_param_meta=0.999, momentum_param_meta=0.99, lion_beta2_meta=0.9)
PAPER_BASE = dict(weight_decay_base=0.1, normalizer_param_base=0.999, momentum_param_base=0.9, lion_beta2_base=0.9)


def torch_adamw(params, device):
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True)


def metaoptimize(base, meta, groups="scalar", compile=False):
    def make(params, device):
        return MetaOptimize(params, alg_base=base, alg_meta=meta, alpha0=1e-6, stepsize_groups=groups,
                            compile=compile, **PAPER_BASE, **PAPER_META)
    return make


def state_floats_per_weight(opt, params) -> float:
    n = sum(p.numel() for p in params)
    per_param = sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return per_param / n


def median_and_min(variants: dict, rounds: int, device) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each variant, timed in interleaved rounds after two warm-up rounds.

    The min is the figure to trust on a shared machine: interference only ever adds time.
    """
    timed = interleaved(variants, rounds, device, warmup_rounds=2)
    return {k: (statistics.median(t.wall), min(t.wall)) for k, t in timed.items()}


def bench_steps(args, device):
    model = cifar_resnet18().to(device)
    shapes = [p.shape for p in model.parameters()]
    n_weights = sum(p.numel() for p in model.parameters())
    print(f"\n== optimizer.step() on the CIFAR ResNet-18 parameter set: {len(shapes)} tensors, {n_weights:,} weights, "
          f"{device} ==")
    pairs = [("AdamW", "Lion"), ("Lion", "Lion"), ("SGDm", "Lion"), ("AdamW", "Adam")] if args.quick else [
        (b, m) for b in BASE_NEEDS for m in ("fixed", "SGD", "RMSProp", "Adam", "Lion")]
    factories = {"torch AdamW": torch_adamw}
    factories.update({f"{b}+{m} scalar": metaoptimize(b, m) for b, m in pairs})
    for groups in ["resnet18_blocks", "layerwise", "nodewise", "weightwise"]:
        factories[f"AdamW+Lion {groups}"] = metaoptimize("AdamW", "Lion", groups)
    if args.compile:
        factories["AdamW+Lion scalar, compile"] = metaoptimize("AdamW", "Lion", compile=True)
        factories["AdamW+Lion blocks, compile"] = metaoptimize("AdamW", "Lion", "resnet18_blocks", compile=True)

    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    variants, memory = {}, {}
    for name, make in factories.items():
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opt = make(params, device)
        opt.step()
        memory[name] = state_floats_per_weight(opt, params)
        variants[name] = opt.step
    medians = median_and_min(variants, args.rounds, device)
    ref_med, ref_min = medians["torch AdamW"]
    print(f"{'optimizer':28s} {'median ms':>10s} {'x AdamW':>8s} {'min ms':>8s} {'x AdamW':>8s} {'state floats/weight':>20s}")
    for name in factories:
        med, low = medians[name]
        print(f"{name:28s} {med * 1e3:10.2f} {med / ref_med:8.2f} {low * 1e3:8.2f} {low / ref_min:8.2f} {memory[name]:20.2f}")
    return medians


FIXED = "AdamW+fixed (fixed-step baseline)"


def bench_batch1_loop(args, device):
    print(f"\n== batch-size-1 training step (fwd + bwd + step) of the continual CNN, {device} ==")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (1,), generator=gen).to(device)
    setups = {
        "torch AdamW": torch_adamw,
        FIXED: metaoptimize("AdamW", "fixed"),
        "AdamW+Adam scalar": metaoptimize("AdamW", "Adam"),
        "AdamW+Adam last_layer_and_others": metaoptimize("AdamW", "Adam", "last_layer_and_others"),
    }
    if args.compile:
        setups["AdamW+fixed, compile"] = metaoptimize("AdamW", "fixed", compile=True)
        setups["AdamW+Adam scalar, compile"] = metaoptimize("AdamW", "Adam", compile=True)
    variants = {}
    for name, make in setups.items():
        torch.manual_seed(0)
        model = ContinualCNN().to(device)
        opt = make(list(model.parameters()), device)

        def train_step(model=model, opt=opt, steps=args.inner):
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

        variants[name] = train_step
    medians = median_and_min(variants, args.rounds, device)
    ref_med, ref_min = medians["torch AdamW"]
    fixed_med, fixed_min = medians[FIXED]
    print(f"{'optimizer':44s} {'median us/step':>15s} {'x AdamW':>8s} {'x fixed':>8s} {'min us/step':>12s} {'x AdamW':>8s} "
          f"{'x fixed':>8s}")
    for name in setups:
        med, low = medians[name]
        print(f"{name:44s} {med / args.inner * 1e6:15.1f} {med / ref_med:8.2f} {med / fixed_med:8.2f} "
              f"{low / args.inner * 1e6:12.1f} {low / ref_min:8.2f} {low / fixed_min:8.2f}")
    return medians


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per variant (after 2 warm-up rounds)")
    parser.add_argument("--inner", type=int, default=200, help="batch-1 training steps per timed round")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a few pairs only")
    parser.add_argument("--compile", action="store_true", help="also MetaOptimize(compile=True) (compiles first: minutes on CPU)")
    parser.add_argument("--skip-steps", action="store_true", help="only the batch-1 loop")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if not args.skip_steps:
        bench_steps(args, device)
    bench_batch1_loop(args, device)


if __name__ == "__main__":
    main()
