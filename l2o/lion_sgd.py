"""Lion-SGD: an interpolation of Lion's and SGD-with-momentum's updates (Sobotka et al. 2023, Figure 7).

    u = lambda_S * u_SGD + lambda_L * u_Lion,      theta <- theta + u,     lambda_S = 1 - lambda_L (default)
    u_SGD  = -lr_S * b,                 b <- mu b + g                       (torch.optim.SGD, dampening 0)
    u_Lion = -lr_L * sign(beta1 m + (1 - beta1) g),   then m <- beta2 m + (1 - beta2) g   (Chen et al. 2023)

Each part keeps its own state and sees the same gradient. lambda_L = 0 is SGD with momentum,
lambda_L = 1 is Lion (as in lion-pytorch, no weight decay).
"""

from __future__ import annotations

import torch


class LionSGD(torch.optim.Optimizer):
    def __init__(self, params, lion_fraction: float = 0.5, sgd_fraction: float | None = None, sgd_lr: float = 0.5,
                 lion_lr: float = 0.005, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.99)):
        sgd_fraction = 1.0 - lion_fraction if sgd_fraction is None else sgd_fraction
        if not (lion_fraction >= 0 and sgd_fraction >= 0 and sgd_lr > 0 and lion_lr > 0 and 0 <= momentum < 1
                and all(0 <= b <= 1 for b in betas)):
            raise ValueError(f"LionSGD: needs fractions >= 0, learning rates > 0, momentum in [0, 1) and betas in "
                             f"[0, 1]; got lion_fraction={lion_fraction}, sgd_fraction={sgd_fraction}, sgd_lr={sgd_lr}, "
                             f"lion_lr={lion_lr}, momentum={momentum}, betas={betas}")
        super().__init__(params, {"lion_fraction": lion_fraction, "sgd_fraction": sgd_fraction, "sgd_lr": sgd_lr,
                                  "lion_lr": lion_lr, "momentum": momentum, "betas": tuple(betas)})

    def effective_step_sizes(self) -> torch.Tensor:
        """The two parts' step sizes, lambda_S lr_S and lambda_L lr_L, per group (what the harness
        logs and checks as step sizes: this optimizer has no single lr)."""
        return torch.tensor([[g["sgd_fraction"] * g["sgd_lr"], g["lion_fraction"] * g["lion_lr"]]
                             for g in self.param_groups]).reshape(-1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    state["exp_avg"] = torch.zeros_like(p)
                buf, exp_avg = state["momentum_buffer"], state["exp_avg"]
                buf.mul_(group["momentum"]).add_(g)
                lion_direction = exp_avg.mul(beta1).add_(g, alpha=1 - beta1).sign_()
                exp_avg.mul_(beta2).add_(g, alpha=1 - beta2)
                p.add_(buf, alpha=-group["sgd_fraction"] * group["sgd_lr"])
                p.add_(lion_direction, alpha=-group["lion_fraction"] * group["lion_lr"])
        return loss
