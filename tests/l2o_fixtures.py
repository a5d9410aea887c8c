"""Helpers of tests/test_l2o.py and tests/test_ml2o.py: a diverging meta-training, a script's `main`
run as its `__main__` does (under harness.run_main), and what a diverged run must report."""

from __future__ import annotations

import json

import pytest
import torch

from common import harness, runfolder


def nan_weights_after(monkeypatch, method_cls, meta_update: int) -> None:
    """From the `meta_update`-th call of `method_cls.meta_step` on, the network's weights are NaN,
    as a diverging meta-training leaves them (that update's metrics are still finite)."""
    original, calls = method_cls.meta_step, []

    def meta_step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(None)
        if len(calls) == meta_update:
            with torch.no_grad():
                next(self.network.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(method_cls, "meta_step", meta_step)


def run_as_script(main, argv, capsys) -> tuple[int, list[str]]:
    """(exit code, the `error:` lines on stderr) of `main(argv)` under harness.run_main."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        harness.run_main(lambda: main(argv))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return exit_info.value.code, errors


def assert_diverged(run_dir, code: int, errors: list[str], step: int, reason: str, kept: int | None) -> None:
    """Reported as every experiment reports a divergence (docs/CONTRACTS.md): exit code 3, one error
    line with the step, the reason and the checkpoint kept (of step `kept`), summary.json."""
    where = (f"the checkpoint of step {kept} (the last finite state) is kept in {run_dir}" if kept is not None
             else f"it diverged before its first checkpoint; see {run_dir / 'summary.json'}")
    assert code == harness.EXIT_DIVERGED and errors == [f"error: diverged at step {step}: {reason}; {where}"], errors
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is False and summary["diverged"] is True
    assert (summary["diverged_at_step"], summary["checkpoint_step"]) == (step, kept)
    assert runfolder.run_state(run_dir) == "diverged"
