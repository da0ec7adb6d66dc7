"""CIFAR ResNets of the knowledge-distillation literature (resnet8 ... resnet110, resnet8x4, resnet32x4).

Architecture as in RepDistiller / CRD (Tian et al., ICLR 2020; ``HobbitLong/RepDistiller``,
``models/resnet.py``), itself the CIFAR ResNet of He et al. (2016): a 3x3 stem, three stages of
``n = (depth - 2) / 6`` post-activation BasicBlocks at 32x32, 16x16 and 8x8, global average
pooling and one linear layer. Widths are (stem, stage1, stage2, stage3) = (16, 16, 32, 64), or
(32, 64, 128, 256) for the "x4" variants. GenDD uses these as CIFAR-100 teachers and students.

Module names follow RepDistiller so its checkpoints (``ckpt_epoch_240.pth``) load unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
           "resnet110", "resnet8x4", "resnet32x4"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection and ReLU after the sum; the shortcut is a
    strided 1x1 conv + BN where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` with BasicBlocks.

    widths: (stem, stage1, stage2, stage3) channels. ``forward_features`` returns the post-ReLU,
    average-pooled penultimate feature [B, widths[3]]; ``fc`` maps it to the logits.
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        if len(widths) != 4:
            raise ValueError(f"CifarResNet: widths must be (stem, stage1, stage2, stage3), got {tuple(widths)}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        # He initialisation (fan_out) of the convolutions, as the reference; Linear keeps torch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_channels, out_channels, stride),
                             *[BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        # Global average pooling: the reference's AvgPool2d(8) on the 8x8 map of a 32x32 input.
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


_NARROW = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _NARROW, num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, _NARROW, num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, _NARROW, num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _NARROW, num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, _NARROW, num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, _NARROW, num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, _NARROW, num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _X4, num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _X4, num_classes)
