"""The fused CPU step: the generated C loop (CImpl) against inductor (CompiledImpl forced on CPU).

    python3 scripts/kernels_vs_inductor_cpu.py --width 16     # ResNet-18's 62 tensors at 1/4 width

Each implementation runs at 1 thread in a fresh process with empty kernel caches, then in another
with the caches it left: construction plus first step (the C build happens in the constructor,
inductor's compile at the first step), the median of 20 steady steps, and 5 steps with a new lr
each (new graphs: recompiles).
The numbers are in the note at the top of common/optimizers/kernels.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(impl: str, cache: str, width: int) -> dict:
    import torch

    from common.models import CifarResNet
    from common.optimizers import MetaOptimize
    from common.optimizers import impl as impl_mod

    torch.set_num_threads(1)
    impl_mod._FORCE_COMPILED = impl == "inductor"
    params = list(CifarResNet(width=width).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    start = time.perf_counter()
    opt = MetaOptimize(params, alg_base="AdamW", alg_meta="Adam", alpha0=1e-3, meta_stepsize=1e-3,
                       normalizer_param_meta=0.999, momentum_param_meta=0.9, impl="foreach" if impl == "foreach" else "fused")
    built = time.perf_counter() - start

    def timed() -> float:
        start = time.perf_counter()
        opt.step()
        return time.perf_counter() - start

    from torch._dynamo.utils import counters
    first = timed() + built
    for _ in range(3):
        timed()
    steady = statistics.median(timed() for _ in range(20))
    graphs = counters["stats"]["unique_graphs"]
    lr_steps = []
    for k in range(5):
        opt.param_groups[0]["lr"] = 1.0 - 0.1 * k
        lr_steps.append(timed())
    return {"impl": impl, "tensors": len(params), "weights": sum(p.numel() for p in params), "cache": cache,
            "first_step_s": first,
            "steady_step_ms": steady * 1e3, "lr_change_max_ms": max(lr_steps) * 1e3,
            "new_graphs_on_lr_change": counters["stats"]["unique_graphs"] - graphs, "impl_used": opt.impl}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 width (64: the full 11.17M weights)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.width)))
        return
    for impl in ("c", "inductor", "foreach"):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "METAOPTIMIZE_CACHE": tmp + "/mo", "TORCHINDUCTOR_CACHE_DIR": tmp + "/inductor",
                   "OMP_NUM_THREADS": "1"}
            for cache in ("empty", "warm"):
                out = subprocess.run([sys.executable, __file__, "--child", impl, cache, "--width", str(args.width)],
                                     env=env, capture_output=True, text=True, check=True).stdout
                print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
