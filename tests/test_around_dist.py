"""MetaOptimize around a torch optimizer under DDP and FSDP2 (two CPU ranks, gloo): every rank keeps
the beta and weights of one process that sees the whole batch. Under DDP the gradients (so u) are
the same on both ranks; under FSDP2 each rank steps its shards and z is summed across them."""

import torch
import torch.multiprocessing as mp
import torch.nn as nn
from checks import free_port, gloo_group

from common.optimizers import MetaOptimize

CONFIGS = [("ddp", "scalar", "fused"), ("ddp", "nodewise", "foreach"),
           *[("fsdp2", groups, impl) for groups in ("scalar", "nodewise", "weightwise") for impl in ("foreach", "fused")]]
STEPS = 6


def make(groups, impl, model):
    return MetaOptimize.around(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), alg_meta="Adam",
                               meta_stepsize=3e-2, gamma=0.95, stepsize_groups=groups, impl=impl)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(STEPS)]


def _rank(rank, world, port, out):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, world, port):
        results = {}
        for config in CONFIGS:
            wrap, groups, impl = config
            model = net()
            if wrap == "ddp":
                module = DistributedDataParallel(model)
            else:
                for layer in (model[0], model[2]):
                    fully_shard(layer)
                module = fully_shard(model)
            opt = make(groups, impl, model)
            for x, y in batches():
                opt.zero_grad()
                half = slice(rank * 4, rank * 4 + 4)
                nn.functional.cross_entropy(module(x[half]), y[half]).backward()
                opt.step()
            weights = [p.full_tensor() if wrap == "fsdp2" else p.detach().clone() for p in model.parameters()]
            results[config] = (opt.step_sizes(), weights)
        torch.save(results, f"{out}/rank{rank}.pt")


def test_ddp_and_fsdp2_ranks_keep_the_single_process_beta(tmp_path):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for config in CONFIGS:
        model = net()
        opt = make(config[1], config[2], model)
        for x, y in batches():  # the ranks average their gradients: the mean of the two halves' losses
            opt.zero_grad()
            loss = 0.5 * (nn.functional.cross_entropy(model(x[:4]), y[:4]) +
                          nn.functional.cross_entropy(model(x[4:]), y[4:]))
            loss.backward()
            opt.step()
        (alpha0, params0), (alpha1, params1) = ranks[0][config], ranks[1][config]
        assert torch.equal(alpha0, alpha1), config
        assert not torch.allclose(alpha0, torch.ones_like(alpha0)), "beta should move"
        torch.testing.assert_close(alpha0, opt.step_sizes(), rtol=1e-5, atol=0, msg=lambda m, c=config: f"{c}: {m}")
        for a, b, p in zip(params0, params1, model.parameters()):
            assert torch.equal(a, b), config
            torch.testing.assert_close(a, p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, c=config: f"{c}: {m}")
