"""common.diagnostics: symmetry structures, deviations, noise statistics and the probe (issue 16)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lion_pytorch import Lion
from torch import nn

from common.diagnostics import (
    HIST_EDGES,
    Symmetry,
    SymmetryProbe,
    covariance_stats,
    find_symmetries,
    tail_index,
    update_histogram,
)


def two_layer(batch_norm=False, activation=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 4)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(4, eps=1e-10, track_running_stats=False))  # eps -> 0: scale symmetry
    layers += [activation(), nn.Linear(4, 3), nn.LogSoftmax(dim=1)]
    return nn.Sequential(*layers)


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, optimizer, probe, steps=6):
    logged = []
    for t in range(steps):
        x, y = batch(seed=t)
        loss = F.nll_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logged.append(probe.pop())
    return logged


def test_structures_found():
    assert [str(s) for s in find_symmetries(two_layer())] == ["rescale(0.weight, 0.bias, 2.weight)",
                                                            "translation(2.weight, 2.bias)"]
    assert {s.kind for s in find_symmetries(two_layer(batch_norm=True))} == {"scale", "rescale", "translation"}
    assert [s.kind for s in find_symmetries(two_layer(activation=nn.Sigmoid))] == ["translation"]

    class Functional(nn.Module):  # F.relu inside forward; logits out (cross-entropy outside)
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2, bias=False)

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    assert [str(s) for s in find_symmetries(Functional())] == ["rescale(a.weight, a.bias, b.weight)"]
    assert [s.kind for s in find_symmetries(Functional(), logits=True)] == ["rescale", "translation"]


def test_probe_refuses_models_without_structures():
    model = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="none of the structures"):
        SymmetryProbe(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model = two_layer(activation=nn.Sigmoid)
    with pytest.raises(ValueError, match="no rescale symmetry"):
        SymmetryProbe(model, torch.optim.SGD(model.parameters(), lr=0.1), kinds=["rescale"])


@pytest.mark.parametrize("batch_norm", [False, True])
def test_sgd_keeps_every_constraint_adam_and_lion_break_them(batch_norm):
    results = {}
    for name, make in [("sgd", lambda p: torch.optim.SGD(p, lr=0.1)), ("adam", lambda p: torch.optim.Adam(p, lr=0.01)),
                       ("lion", lambda p: Lion(p, lr=0.01))]:
        model = two_layer(batch_norm)
        opt = make(model.parameters())
        logged = train(model, opt, SymmetryProbe(model, opt, every=1))
        results[name] = {k: max(abs(r[k]) for r in logged) for k in logged[0] if k.startswith("sym/")}
    kinds = ["rescale", "translation"] + (["scale"] if batch_norm else [])
    assert sorted(k.split("/")[1] for k in results["sgd"] if k.endswith("/update")) == sorted(kinds)
    for kind in kinds:
        for v in ("grad", "update"):
            assert results["sgd"][f"sym/{kind}/{v}"] < 1e-5, (kind, v, results["sgd"])
        assert results["adam"][f"sym/{kind}/update"] > 1e-3, (kind, results["adam"])
        assert results["lion"][f"sym/{kind}/update"] > 1e-3, (kind, results["lion"])
        assert results["adam"][f"sym/{kind}/grad"] < 1e-5


def test_probe_matches_a_direct_computation():
    """Adam on a hand-made two-layer ReLU net: the probe's numbers, by hand (per neuron, in float64)."""
    model = two_layer()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    probe = SymmetryProbe(model, opt, every=1)
    x, y = batch()
    F.nll_loss(model(x), y).backward()
    w1, b1, w2, b2 = (p.detach().double().clone() for p in model.parameters())
    g1, gb1, g2, gb2 = (p.grad.double().clone() for p in model.parameters())
    opt.step()
    u1, ub1, u2, ub2 = (p.detach().double() - p0 for p, p0 in zip(model.parameters(), (w1, b1, w2, b2)))
    logged = probe.pop()

    def rescale(v1, vb1, v2):
        return sum(sum(v1[k, j] * w1[k, j] for j in range(5)) + vb1[k] * b1[k]
                   - sum(v2[i, k] * w2[i, k] for i in range(3)) for k in range(4))

    def translation(v2, vb2):
        return sum(v2[i, j] for i in range(3) for j in range(4)) + sum(vb2[i] for i in range(3))

    assert logged["sym/rescale/grad"] == pytest.approx(float(rescale(g1, gb1, g2)), abs=1e-6)
    assert logged["sym/rescale/update"] == pytest.approx(float(rescale(-u1, -ub1, -u2)), rel=1e-5)
    assert logged["sym/translation/grad"] == pytest.approx(float(translation(g2, gb2)), abs=1e-6)
    assert logged["sym/translation/update"] == pytest.approx(float(translation(-u2, -ub2)), rel=1e-5)
    assert abs(logged["sym/rescale/update"]) > 1e-3


def test_probe_schedule_sink_and_histograms():
    model = two_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    probe = SymmetryProbe(model, opt, every=3, hist_steps=(1, 5), sink=lambda m, s: seen.append((s, sorted(m))))
    train(model, opt, probe, steps=6)
    assert [s for s, _ in seen] == [1, 3, 5, 6]
    assert "update_abs/hist" in seen[0][1] and "sym/rescale/update" not in seen[0][1]
    assert "sym/rescale/update" in seen[1][1] and "update_abs/hist" not in seen[1][1]
    assert probe.state_dict() == {"step": 6}


def test_noise_measurement_leaves_training_unchanged():
    """The trial steps from copies of the optimizer's state do not change the run (Adam, 8 steps)."""
    finals = []
    for with_noise in (False, True):
        model = two_layer()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        samples = lambda m=model: [F.nll_loss(m(x), y) for x, y in (batch(seed=100 + i) for i in range(6))]  # noqa: E731
        probe = SymmetryProbe(model, opt, every=2, noise_every=4 if with_noise else 0,
                              sample_losses=samples if with_noise else None)
        logged = train(model, opt, probe, steps=8)
        finals.append([p.detach().clone() for p in model.parameters()])
        if with_noise:
            noise = logged[3]
            for what in ("grad", "update"):
                assert noise[f"noise/{what}/cov_trace"] > 0 and noise[f"noise/{what}/cov_top_eig"] > 0
                assert math.isfinite(noise[f"noise/{what}/tail_index"])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_tail_index_gaussian_and_cauchy():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(100_000, generator=g, dtype=torch.float64)
    cauchy = torch.distributions.Cauchy(0.0, 1.0).sample((100_000,))
    assert tail_index(gaussian) == pytest.approx(2.0, abs=0.15)
    assert tail_index(cauchy) == pytest.approx(1.0, abs=0.2)


def test_covariance_stats_against_numpy():
    x = torch.randn(6, 40, dtype=torch.float64)
    trace, top = covariance_stats(x)
    centred = x - x.mean(0)
    cov = centred.T @ centred / 6
    assert trace == pytest.approx(cov.trace().item())
    assert top == pytest.approx(torch.linalg.eigvalsh(cov)[-1].item())


def test_update_histogram_counts():
    values = torch.tensor([0.0, 1e-12, 1e-3, 1e-3, 0.5, 100.0])
    counts = update_histogram(values)
    assert len(counts) == len(HIST_EDGES) + 1 and sum(counts) == 6
    assert counts[0] == 2 and counts[-1] == 1


def test_symmetry_names():
    assert str(Symmetry("scale", ("0.weight", None))) == "scale(0.weight)"
