"""`LearnedOptimizer`: a meta-trained network applied like any `torch.optim.Optimizer`.

    from l2o.learned import LearnedOptimizer
    opt = LearnedOptimizer.from_checkpoint(model.parameters(), "outputs/l2o_meta/relu-s0")
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

Per step, the gradients of all parameters go through the network in one batch (every weight a
row; `l2o.networks.apply_network`) and theta <- theta + lr * update, with lr = 1 meaning "as
meta-trained". The network's recurrent state is kept per parameter (`state[p]`, one tensor per
`network.state_names`), starting at zero. `state_dict()` holds that state and the network
itself, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from l2o.networks import apply_network, network_from_record, network_record, network_spec

CHECKPOINT = "checkpoint.pt"  # the harness's checkpoint file inside a meta-training run folder


def network_checkpoint(network: nn.Module, best_network: dict | None, args) -> dict:
    """What meta_train.py and adapt.py add to their checkpoints (`Run.checkpoint`'s progress) for
    `load_network`: the network's name and config (its weights are the checkpoint's "model", saved
    by the harness with the meta-optimizer), the best weights so far, and the run's flags."""
    return {"network": network_spec(network), "best_network": best_network,
            "config": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}}


def check_resumed_network(state: dict, network: nn.Module) -> None:
    """After `Run.resume(network, ...)`: the checkpoint's network must be the one the flags built."""
    if state["network"] != network_spec(network):
        raise ValueError(f"--resume: the checkpoint's network is {state['network']['name']} "
                         f"{state['network']['config']}, the flags give {network.name} {network.config()}; resume "
                         f"with the same network flags")


def load_network(path, which: str = "best") -> tuple[nn.Module, dict]:
    """The network of a meta-training or adaptation run (its folder or checkpoint file) and that run's config.

    which="best": the weights with the best meta-test loss (the paper's choice); "last": the latest.
    """
    path = Path(path).expanduser()
    file = path / CHECKPOINT if path.is_dir() else path
    if which not in ("best", "last"):
        raise ValueError(f"which network: 'best' or 'last', got {which!r}")
    if not file.is_file():
        raise ValueError(f"no meta-training checkpoint at {file} (give a run folder of l2o/meta_train.py or "
                         f"l2o/adapt.py, or its {CHECKPOINT})")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {file} ({type(e).__name__}: {e})") from None
    record = ckpt.get("network") if isinstance(ckpt, dict) else None
    if not isinstance(record, dict) or "name" not in record:
        raise ValueError(f"{file} holds no learned-optimizer network (not written by l2o/meta_train.py or "
                         f"l2o/adapt.py)")
    if which == "best" and ckpt.get("best_network") is not None:
        weights = ckpt["best_network"]
    else:  # the harness's training state (a record with its own weights: checkpoints before run control moved)
        weights = record.get("state_dict", ckpt.get("model"))
    if not isinstance(weights, dict):
        raise ValueError(f"{file} holds no weights of its {record['name']} network")
    return network_from_record({**record, "state_dict": weights}), dict(ckpt.get("config") or {})


def protocol_of(config: dict) -> str:
    """M-L2O's name for how a network came to be, from its run's config (spec l2o.md, section 2):
    meta-trained only (l2o: "direct transfer"), or adapted to the target by adapt.py from scratch
    ("vanilla L2O"), from a plain pretraining ("transfer learning") or from M-L2O's ("M-L2O")."""
    if config.get("adapted"):
        return {"l2o": "transfer learning", "ml2o": "M-L2O"}.get(config.get("pretrained_method"), "vanilla L2O")
    return {"ml2o": "M-L2O without adaptation"}.get(config.get("method"), "direct transfer")


class LearnedOptimizer(torch.optim.Optimizer):
    """Applies a learned network's updates; `lr` multiplies them (1 = as meta-trained)."""

    def __init__(self, params, network: nn.Module, lr: float = 1.0):
        if not lr > 0:
            raise ValueError(f"LearnedOptimizer: lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})
        self.network = network.eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, params, path, which: str = "best", lr: float = 1.0) -> LearnedOptimizer:
        network, _ = load_network(path, which)
        return cls(params, network, lr=lr)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            device = params[0].device
            self.network.to(device)
            states = []
            for p in params:
                if not self.state[p]:
                    init = self.network.init_state(p.numel(), p.detach().reshape(-1).float())
                    self.state[p].update(zip(self.network.state_names, init))
                states.append(self.state[p])
            state = [torch.cat([s[name] for s in states]) for name in self.network.state_names]
            grads = [p.grad.float() for p in params]
            updates, state = apply_network(self.network, grads, state)
            sizes = [p.numel() for p in params]
            for i, name in enumerate(self.network.state_names):
                for s, part in zip(states, state[i].split(sizes)):
                    s[name] = part
            torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(updates, params)], alpha=group["lr"])
        return loss

    def state_dict(self):
        state = super().state_dict()
        state["network"] = network_record(self.network)
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        record = state_dict.pop("network", None)
        if record is not None:
            if record["name"] != self.network.name or record["config"] != self.network.config():
                raise ValueError(f"LearnedOptimizer.load_state_dict: the state is of a {record['name']} network "
                                 f"{record['config']}, this optimizer has {self.network.name} "
                                 f"{self.network.config()}")
            self.network.load_state_dict(record["state_dict"])
        super().load_state_dict(state_dict)
