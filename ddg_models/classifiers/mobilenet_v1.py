"""MobileNetV1 (width 1.0) for 224x224 ImageNet, the ResNet-50 -> MobileNet student of the KD literature.

Architecture of Howard et al. (2017): a strided 3x3 conv-BN-ReLU stem (32 channels) and 13
depthwise-separable blocks (3x3 depthwise conv-BN-ReLU, 1x1 pointwise conv-BN-ReLU) reaching
1024 channels at stride 32, global average pooling and one linear layer. This is the model used
as the ImageNet student by CRD-era KD code (e.g. ``megvii-research/mdistiller``) and by GenDD
(``GenDD_imagenet/models/mobilenetv1.py``): layers live in ``model.0`` ... ``model.13`` and the
linear layer is ``fc``, so those checkpoints load unchanged. Initialisation is PyTorch's default,
as there.

The reference pools with AvgPool2d(7), i.e. only 224x224 inputs; global average pooling is the
same there and also allows smaller inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MobileNetV1", "mobilenet_v1"]

# (output channels, stride) of the 13 depthwise-separable blocks.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
STEM_CHANNELS = 32


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1) -> list:
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class MobileNetV1(nn.Module):
    """MobileNetV1, width multiplier 1.0.

    ``forward_features`` returns the post-ReLU, average-pooled penultimate feature [B, 1024];
    ``fc`` maps it to the logits.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers = [nn.Sequential(*_conv_bn_relu(3, STEM_CHANNELS, 3, 2))]
        in_channels = STEM_CHANNELS
        for out_channels, stride in BLOCKS:
            layers.append(nn.Sequential(*_conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels),
                                        *_conv_bn_relu(in_channels, out_channels, 1, 1)))
            in_channels = out_channels
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.model(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes)
