"""Wide ResNets for CIFAR (wrn_40_2, wrn_16_2, wrn_40_1, wrn_16_1).

Architecture of Zagoruyko & Komodakis (2016) as used by RepDistiller / CRD (``HobbitLong/RepDistiller``,
``models/wrn.py``): a 3x3 stem with 16 channels, three stages of ``n = (depth - 4) / 6``
pre-activation blocks with ``(16, 32, 64) * widen_factor`` channels at 32x32, 16x16 and 8x8, a
final BN + ReLU, global average pooling and one linear layer. No dropout (the reference's default).

Module names follow RepDistiller so its checkpoints load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideBasicBlock", "WideResNet", "wrn_40_2", "wrn_16_2", "wrn_40_1", "wrn_16_1"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    Where the shape changes, the shortcut is a 1x1 conv applied to the *pre-activated* input (the
    first BN-ReLU is shared by both paths); otherwise it is the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.convShortcut = None
        if stride != 1 or in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return out + shortcut


class WideStage(nn.Module):
    """A stage of blocks, kept under ``.layer`` as in the reference (checkpoint keys ``blockK.layer.i``)."""

    def __init__(self, blocks: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(WideBasicBlock(in_channels, out_channels, stride),
                                   *[WideBasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs.

    ``forward_features`` returns the post-ReLU, average-pooled penultimate feature
    [B, 64 * widen_factor]; ``fc`` maps it to the logits.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = WideStage(blocks, widths[0], widths[1], 1)
        self.block2 = WideStage(blocks, widths[1], widths[2], 2)
        self.block3 = WideStage(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])  # the pre-activation network's final BN before pooling
        self.fc = nn.Linear(widths[3], num_classes)
        # He initialisation (fan_out) of the convolutions and a zero Linear bias, as the reference.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)
