"""ResNet-50/101 trunk (v1.5: the stride sits on the 3x3 conv) with torchvision's module names.

Only what MDETR keeps is built: the stem and ``layer1``..``layer4`` (no average pool, no classifier), so the
state-dict keys read ``conv1.weight``, ``bn1.running_var``, ``layer3.22.conv2.weight``,
``layer1.0.downsample.1.bias``, ... exactly as in the released checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]

DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
EXPANSION = 4  # bottleneck output channels = EXPANSION * width


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, each followed by a norm; ReLU after the sum."""

    def __init__(self, in_channels: int, width: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """``[B, 3, H, W]`` -> ``[B, 2048, ~H/32, ~W/32]`` (the ``layer4`` output)."""

    def __init__(self, depths: tuple[int, int, int, int], norm_layer: NormLayer):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512)), start=1):
            stride = 1 if index == 1 else 2
            blocks = []
            for b in range(depth):
                blocks.append(Bottleneck(in_channels, width, stride if b == 0 else 1, norm_layer))
                in_channels = width * EXPANSION
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.num_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_resnet(name: str, norm_layer: NormLayer) -> ResNet:
    return ResNet(DEPTHS[name], norm_layer)
