"""A small MobileNetV2 for 32x32 images: depthwise separable convolutions in inverted residual blocks.

Each block expands its input with a 1x1 convolution (``expansion`` times the channels), filters
each channel with a 3x3 depthwise convolution (``groups == channels``), and projects back with a
linear 1x1 convolution (no activation, as in MobileNetV2); where the stride is 1 and the widths
match, the block's input is added to its output. Activations are ReLU6.

For the pruner's dependency graph a depthwise convolution couples its input and output channels
one to one, so the expand convolution's outputs, the depthwise convolution and the project
convolution's inputs form one group (named after the expand layer); the project outputs of the
blocks joined by residual adds form another.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# (expansion, output channels as a multiple of width/16, blocks, first block's stride): a
# MobileNetV2 layout shortened for 32x32 inputs (three stride-2 stages reach 4x4).
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (4, 24, 2, 2),
    (4, 32, 3, 2),
    (4, 64, 3, 2),
    (4, 96, 2, 1),
)


class ConvBNReLU6(nn.Sequential):
    """Convolution, batch norm, ReLU6 (``groups == channels`` makes it depthwise)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                relu=nn.ReLU6(inplace=True),
            )
        )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped at expansion 1), 3x3 depthwise, linear 1x1 project; residual add when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if expansion != 1:
            layers["expand"] = ConvBNReLU6(in_channels, hidden, kernel=1)
        layers["depthwise"] = ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden)
        layers["project"] = nn.Conv2d(hidden, out_channels, 1, bias=False)
        layers["bn"] = nn.BatchNorm2d(out_channels)
        self.conv = nn.Sequential(layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """3x3 stem, the inverted residual stages of :data:`STAGES`, a 1x1 head convolution, pooling, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, last_channels: int = 128) -> None:
        super().__init__()
        for key, value in dict(
            in_channels=in_channels, num_classes=num_classes, width=width, last_channels=last_channels
        ).items():
            if value < 1:
                raise ValueError(f"{key}={value} must be >= 1")
        blocks: OrderedDict[str, nn.Module] = OrderedDict(stem=ConvBNReLU6(in_channels, width))
        channels = width
        for s, (expansion, multiple, count, stride) in enumerate(STAGES):
            out_channels = max(1, width * multiple // 16)
            for b in range(count):
                blocks[f"b{s}_{b}"] = InvertedResidual(channels, out_channels, stride if b == 0 else 1, expansion)
                channels = out_channels
        blocks["head"] = ConvBNReLU6(channels, last_channels, kernel=1)
        self.features = nn.Sequential(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mobilenet_v2_small(
    in_channels: int = 1, num_classes: int = 10, width: int = 16, last_channels: int = 128
) -> nn.Module:
    """MobileNetV2-style classifier for ``(batch, in_channels, 32, 32)`` inputs (see module docstring)."""
    return MobileNetV2(in_channels, num_classes, width, last_channels)
