"""Models of the CIFAR experiments.

- `cifar_resnet18`: the CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool; 11,173,962 parameters
  for 10 classes). Its 62 parameter tensors are registered in the order the paper's
  `resnet18_blocks` = [3, 12, 15, 15, 15, 2] step-size blocks assume: stem conv + bn (3),
  layer1 (12), layer2 (15), layer3 (15), layer4 (15), linear (2).
- `ContinualCNN`: the small CNN of the continual CIFAR-100 task (8 tensors, so
  `last_layer_and_others` = [6, 2]).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

RESNET18_BLOCKS = [3, 12, 15, 15, 15, 2]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        # registration order = parameter order: conv1, bn1, conv2, bn2, shortcut (conv, bn)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for i, n in enumerate(num_blocks):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


def cifar_resnet18(num_classes: int = 10) -> CifarResNet:
    """ResNet-18 for 32x32 inputs (BasicBlocks [2, 2, 2, 2], widths 64-128-256-512)."""
    return CifarResNet((2, 2, 2, 2), num_classes=num_classes)


class ContinualCNN(nn.Module):
    """conv(3->16, 3x3, pad 1)-ReLU-maxpool2, conv(16->32)-ReLU-maxpool2, linear(2048->128)-ReLU,
    linear(128->num_classes): the network of the paper's continual CIFAR-100 task."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))
