"""CIFAR VGG with BatchNorm (vgg8, vgg11, vgg13, vgg16, vgg19).

The CIFAR variant of Simonyan & Zisserman's VGG used by RepDistiller / CRD (``HobbitLong/RepDistiller``,
``models/vgg.py``, the ``*_bn`` builders): five stages of 3x3 conv (with bias) + BN + ReLU, the
fully connected layers removed, global average pooling of the last stage and one linear layer
(512 -> classes). vgg8 is the reference's configuration "S", one conv per stage.

On a 32x32 input the first three stages end in 2x2 max pooling and the last two run at 4x4; on a
64x64 input (the reference's Tiny-ImageNet setting) the fourth stage is pooled as well.

Module names follow RepDistiller (``blockK.i``) except the final layer, called ``fc`` as in GenDD's
copy; ``registry.load_classifier`` renames RepDistiller's ``classifier.*`` keys.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarVGG", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]

STAGE_WIDTHS = (64, 128, 256, 512, 512)
# Convolutions per stage (VGG configurations S, A, B, D, E).
CONVS_PER_STAGE = {
    "vgg8": (1, 1, 1, 1, 1),
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}


def _stage(in_channels: int, out_channels: int, convs: int) -> nn.Sequential:
    """conv-BN-ReLU repeated, without the last ReLU: the network applies it after the stage."""
    layers = []
    for _ in range(convs):
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]
        in_channels = out_channels
    return nn.Sequential(*layers[:-1])


class CifarVGG(nn.Module):
    """VGG-BN for CIFAR with ``convs[k]`` convolutions in stage k.

    ``forward_features`` returns the post-ReLU, average-pooled penultimate feature [B, 512];
    ``fc`` maps it to the logits.
    """

    def __init__(self, convs: Sequence[int], num_classes: int = 100):
        super().__init__()
        if len(convs) != len(STAGE_WIDTHS) or min(convs) < 1:
            raise ValueError(f"CifarVGG: convs must give >= 1 convolution for each of 5 stages, got {tuple(convs)}")
        in_channels = 3
        for k, (width, n) in enumerate(zip(STAGE_WIDTHS, convs)):
            self.add_module(f"block{k}", _stage(in_channels, width, n))
            in_channels = width
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        # The reference's initialisation: He-normal (fan_out) convs with zero bias, N(0, 0.01) linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        pool_fourth_stage = x.shape[-2] == 64
        x = F.relu(self.block0(x))
        x = F.relu(self.block1(F.max_pool2d(x, 2)))
        x = F.relu(self.block2(F.max_pool2d(x, 2)))
        x = F.relu(self.block3(F.max_pool2d(x, 2)))
        if pool_fourth_stage:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def vgg8(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(CONVS_PER_STAGE["vgg8"], num_classes)


def vgg11(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(CONVS_PER_STAGE["vgg11"], num_classes)


def vgg13(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(CONVS_PER_STAGE["vgg13"], num_classes)


def vgg16(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(CONVS_PER_STAGE["vgg16"], num_classes)


def vgg19(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(CONVS_PER_STAGE["vgg19"], num_classes)
