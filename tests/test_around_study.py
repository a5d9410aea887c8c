"""Issue 24's evidence: the README's MetaOptimize.around snippet (Muon + AdamW, a scheduler) runs, and
scripts/around_study.py --quick runs end to end and writes its three files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from common.optimizers.around import MetaOptimizeAround

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_integrations import run_snippet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_readme_around_snippet_runs_with_muon_adamw_and_a_scheduler():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(0)
    train_loader = [(torch.randn(4, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(12)]
    before = [p.detach().clone() for p in model.parameters()]
    ns = run_snippet("around", model=model, train_loader=train_loader)
    optimizer, scheduler = ns["optimizer"], ns["scheduler"]
    assert isinstance(optimizer, MetaOptimizeAround)
    assert [type(b).__name__ for b in optimizer.bases] == ["Muon", "AdamW"]
    sizes = optimizer.step_sizes().tolist()
    assert sizes and all(math.isfinite(s) and s > 0 for s in sizes)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # the scheduler acted on the base optimizers' own lr (cosine over 100 steps, 12 taken)
    assert scheduler.last_epoch == 12
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert 0 < lrs[0] < 0.02 and 0 < lrs[1] < 1e-3


def test_around_study_quick_writes_results_table_and_figure(tmp_path):
    out = tmp_path / "around"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "around_study.py"), "--quick", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (out / "table.md").read_text().strip()
    assert table in proc.stdout and "| bare |" in table and "| around |" in table
    assert "Muon 0.02 + AdamW 1e-3" in table
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 * 2 * 2  # 2 optimizers x 2 arms x 2 factors x 1 seed
    assert all(0 <= r["test_acc"] <= 1 and math.isfinite(r["final_alpha"]) for r in results["runs"])
    assert (out / "figure.png").stat().st_size > 1000


def test_around_study_stream_quick_scores_online_accuracy(tmp_path):
    out = tmp_path / "stream"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "around_study.py"), "--stream", "--quick",
                           "--task-steps", "20", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["metric"] == "online_acc" and results["config"]["stream"]["tasks"] == 2
    runs = results["runs"]
    assert len(runs) == 8 and all(0 <= r["online_acc"] <= 1 and "test_acc" not in r for r in runs)
    # the Muon+AdamW stream at its own lr learns something within a task (chance is 0.1)
    best = max(r["online_acc"] for r in runs if r["optimizer"] == "Muon+AdamW" and r["factor"] == 1.0)
    assert best > 0.15, best
