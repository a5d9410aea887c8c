"""A toy experiment on the shared harness, for the run-control tests: a linear model, SGD, a
checkpoint every --checkpoint-every steps. Run control is the few `run.` calls a train.py makes.

    python tests/toy_train.py --save-directory out --run-name r --steps 50
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import harness  # noqa: E402


def parse_args(argv=None):
    parser = harness.ArgParser(description="toy experiment")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (to be signalled)")
    parser.add_argument("--nan-at", type=int, default=None, help="a weight becomes nan at this step")
    parser.add_argument("--hold-until", default=None, help="before finishing, wait until this file exists")
    harness.add_run_args(parser)
    parser.set_defaults(log_every=1, device="cpu")
    return harness.check_args(parser.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    # how long and how fast to run: a resume may change them
    run = harness.start_run(args, "toy", resume_changeable=("steps", "sleep", "checkpoint_every", "nan_at", "hold_until"))
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    state = run.resume(model, optimizer)
    step = state["step"] if state else 0
    print(f"ready at step {step}", flush=True)
    while step < args.steps:
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.nan_at:
            with torch.no_grad():
                model.weight[0, 0] = float("nan")
        run.log_step(optimizer, step, {"train/loss": loss.item()})
        if step % args.checkpoint_every == 0:
            run.checkpoint({"step": step})
        if run.should_stop(step):
            return run.stop({"step": step}, f"at step {step}")
        time.sleep(args.sleep)
    while args.hold_until and not Path(args.hold_until).exists():
        time.sleep(0.05)
    run.checkpoint({"step": step})
    run.finish({"final": {"step": step}})
    return 0


if __name__ == "__main__":
    harness.run_main(main)
