"""Helpers of tests/test_l2o.py and tests/test_ml2o.py: a diverging meta-training, and a script's
`main` run as its `__main__` does (under harness.run_main: exit code and error lines)."""

from __future__ import annotations

import pytest
import torch

from common import harness


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
