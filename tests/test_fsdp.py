"""MetaOptimize on FSDP2-sharded parameters (fully_shard, two CPU ranks, gloo): every rank keeps the
beta of one process holding the whole model, for every block kind and step implementation."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from checks import free_port, gloo_group

from common.optimizers import MetaOptimize

CONFIGS = [(groups, impl, meta) for groups in ("scalar", "layerwise", "nodewise", "weightwise")
           for impl in ("foreach", "fused") for meta in ("Lion", "Adam")]
STEPS = 8


def make(groups, impl, meta, model):
    return MetaOptimize(model.parameters(), alg_base="AdamW", alg_meta=meta, alpha0=1e-2, meta_stepsize=1e-2,
                        normalizer_param_meta=0.99, stepsize_groups=groups, impl=impl)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(STEPS)]


def _rank(rank, world, port, out):
    from torch.distributed.fsdp import fully_shard

    with gloo_group(rank, world, port):
        results = {}
        for groups, impl, meta in CONFIGS:
            model = net()
            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
            opt = make(groups, impl, meta, model)
            for x, y in batches():
                opt.zero_grad()
                half = slice(rank * 4, rank * 4 + 4)
                nn.functional.cross_entropy(model(x[half]), y[half]).backward()
                opt.step()
            results[(groups, impl, meta)] = (opt.step_sizes(), [p.full_tensor() for p in model.parameters()])
        torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_fsdp2_ranks_keep_the_single_process_beta(tmp_path):
    port = free_port()
    mp.spawn(_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for config in CONFIGS:
        model = net()
        opt = make(*config, model)
        for x, y in batches():  # FSDP averages the ranks' gradients: the mean of the two halves' losses
            opt.zero_grad()
            loss = 0.5 * (nn.functional.cross_entropy(model(x[:4]), y[:4]) +
                          nn.functional.cross_entropy(model(x[4:]), y[4:]))
            loss.backward()
            opt.step()
        (alpha0, params0), (alpha1, params1) = ranks[0][config], ranks[1][config]
        assert torch.equal(alpha0, alpha1), (config, (alpha0 - alpha1).abs().max(), alpha0.shape)
        torch.testing.assert_close(alpha0, opt.step_sizes(), rtol=1e-5, atol=0, msg=lambda m, config=config: f"{config}: {m}")
        for a, b, p in zip(params0, params1, model.parameters()):
            assert torch.equal(a, b), config
            torch.testing.assert_close(a, p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, config=config: f"{config}: {m}")
