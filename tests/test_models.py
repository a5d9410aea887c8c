"""common.models: parameter counts and the tensor order the paper's step-size blocks assume."""

from __future__ import annotations

import itertools

import torch

from common.models import RESNET18_BLOCKS, ContinualCNN, cifar_resnet18
from common.optimizers import NAMED_STEPSIZE_GROUPS, resolve_stepsize_groups


def _blocks_of(names, counts):
    bounds = [0, *itertools.accumulate(counts)]
    return [names[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def test_cifar_resnet18_counts_and_blocks():
    model = cifar_resnet18()
    names = [n for n, _ in model.named_parameters()]
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert len(names) == 62
    assert RESNET18_BLOCKS == NAMED_STEPSIZE_GROUPS["resnet18_blocks"] == [3, 12, 15, 15, 15, 2]
    assert resolve_stepsize_groups("resnet18_blocks", len(names)) == ("tensor", RESNET18_BLOCKS)
    stem, l1, l2, l3, l4, head = _blocks_of(names, RESNET18_BLOCKS)
    assert stem == ["conv1.weight", "bn1.weight", "bn1.bias"]
    for prefix, block in (("layer1.", l1), ("layer2.", l2), ("layer3.", l3), ("layer4.", l4)):
        assert all(n.startswith(prefix) for n in block), block
    assert sum("shortcut" in n for n in l1) == 0
    assert all(sum("shortcut" in n for n in b) == 3 for b in (l2, l3, l4))
    assert head == ["linear.weight", "linear.bias"]
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None

    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert cifar_resnet18(num_classes=100).linear.out_features == 100


def test_continual_cnn():
    model = ContinualCNN()
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 8
    assert resolve_stepsize_groups("last_layer_and_others", len(names)) == ("tensor", [6, 2])
    assert names[-2:] == ["fc2.weight", "fc2.bias"]
    assert model.fc1.in_features == 2048 and model.fc1.out_features == 128
    expected = (3 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (2048 * 128 + 128) + (128 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model(torch.rand(4, 3, 32, 32)).shape == (4, 10)
