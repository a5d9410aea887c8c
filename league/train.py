"""One league run, for scripts/sweep.py (league/sweeps/*.yaml): a method at one grid value and seed
on one workload.

    python3 league/train.py --workload digits_mlp --method AdamW --grid 3e-3 --seed 0 --save-directory outputs

The run goes to <save-directory>/league/runs/<workload>/<method>/<grid>-s<seed>, the folder
`league/run.py --save-directory <save-directory>` reads (so `league/run.py --seeds N` then scores a
finished sweep without running anything again); --run-name is accepted for sweep.py and not used. A
folder holding a finished or diverged run is left as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import harness
from league.methods import METHODS, method
from league.run import point_dir, train
from league.workloads import WORKLOADS, workload


def parse_args(argv=None):
    p = harness.ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, choices=list(WORKLOADS))
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--grid", type=float, default=None, help="the value of the method's knob; unset: its default")
    harness.add_run_args(p)
    args = p.parse_args(argv)
    m = method(args.method)
    if args.grid is not None and m.knob is None:
        p.error(f"--grid: {m.name} has no step-size knob")
    if not m.applies_to(workload(args.workload)):
        p.error(f"--method {m.name} does not apply to --workload {args.workload}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.save_directory) / "league"
    folder = point_dir(root, args.workload, method(args.method), args.grid, args.seed)
    state = train({"workload": args.workload, "method": args.method, "grid": args.grid, "seed": args.seed,
                   "dir": str(folder)})
    print(f"{folder}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
