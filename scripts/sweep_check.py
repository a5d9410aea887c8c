#!/usr/bin/env python3
"""Check a sweep's command lines with the experiment's own parser; sweep.py runs it in a child
process (importing a train.py imports torch, which sweep.py itself does without).

    python scripts/sweep_check.py cifar10/train.py

Talks over stdin/stdout, one JSON line each way:
1. prints `SWEEP-OPTIONS ["--alpha0", ...]`: the option strings of `train.py --help`;
2. reads a JSON list of argument lists (the sweep's runs);
3. prints `SWEEP-ERRORS {"3": "error text", ...}`: what train.py's `parse_args(argv)` says about
   each run it rejects. `parse_args` checks names and values (the experiments end it with
   `harness.check_args`), so a bad value fails here, not in a queued job.
Without a `parse_args(argv)` in train.py, only the flag names are checked (from `--help`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common.cli import UsageError  # noqa: E402

OPTION = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")


def load_train(path: Path):
    """Import train.py as `python train.py` would see it (its folder first on sys.path), without running main."""
    sys.path.insert(0, str(path.parent))
    sys.argv = [str(path)]
    spec = importlib.util.spec_from_file_location("sweep_checked_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def help_text(path: Path, parse_args) -> str:
    out = io.StringIO()
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        if parse_args is not None:
            parse_args(["--help"])
        else:
            sys.argv = [str(path), "--help"]
            runpy.run_path(str(path), run_name="__main__")
    return out.getvalue()


def rejection(parse_args, argv: list[str]) -> str | None:
    """None when `parse_args(argv)` accepts the run, else its error text (one line)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse_args(argv)
    except SystemExit as e:
        if e.code in (0, None):
            return None
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        return lines[-1].removeprefix("error: ") if lines else f"exit code {e.code}"
    except Exception as e:
        text = " ".join(str(e).split())
        if isinstance(e, (ValueError, UsageError)):  # the value checks: their message names the flag
            return text
        return f"{type(e).__name__}: {text}"
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]).resolve()
    parse_args = getattr(load_train(path), "parse_args", None)
    parse_args = parse_args if callable(parse_args) else None
    options = sorted(set(OPTION.findall(help_text(path, parse_args))))
    print("SWEEP-OPTIONS " + json.dumps(options), flush=True)
    argvs = json.loads(sys.stdin.readline())
    errors = {i: msg for i, args in enumerate(argvs) if parse_args and (msg := rejection(parse_args, args))}
    print("SWEEP-ERRORS " + json.dumps(errors), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
