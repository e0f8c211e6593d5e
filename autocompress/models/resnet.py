"""ResNet-18 for 32x32 images (CIFAR layout), written out so no torchvision is needed.

The CIFAR variant replaces ImageNet's 7x7 stride-2 stem and max-pool with one 3x3 stride-1
convolution, so a 32x32 input reaches the last stage at 4x4. Every residual add couples the
output channels of the convolutions that feed it; the pruner's dependency graph sees those
adds and prunes each stage's block outputs (and 1x1 shortcut) as one group.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN when the shape changes) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNetCifar(nn.Module):
    """3x3 stem, four stages of BasicBlocks (widths w, 2w, 4w, 8w), global average pool, Linear."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        if width < 1 or num_classes < 1:
            raise ValueError(f"width={width} and num_classes={num_classes} must be >= 1")
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks={blocks}: need four stages of at least one block each")
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, in_channels = [], width
        for i, count in enumerate(blocks):
            out_channels = width * 2**i
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(in_channels, out_channels, stride)]
            layers += [BasicBlock(out_channels, out_channels) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> nn.Module:
    """ResNet-18 ([2, 2, 2, 2] BasicBlocks) for 3x32x32 inputs; ``width`` is the first stage's channels."""
    return ResNetCifar((2, 2, 2, 2), num_classes=num_classes, width=width)
