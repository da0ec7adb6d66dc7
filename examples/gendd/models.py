"""Backbones of the example: the classifier zoo (``ddg_models.classifiers``) for CIFAR / ImageNet, and two
small CNNs for the ``tiny`` preset registered into it, so all follow its pooled-feature protocol:
``features`` (pooled penultimate feature), ``classifier`` (the final Linear) and ``feature_dim``."""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from ddg_models.classifiers import (build_classifier, classifier_of, feature_dim, load_classifier, pooled_features,
                                    register_classifier)

TINY = {"tiny_teacher": (32, 64, 128), "tiny_student": (8, 16, 32)}


class TinyCNN(nn.Module):
    """conv3x3-BN-ReLU stages (2x2 max-pool between them) on 1x8x8 digits, global average pool, Linear.
    The pooled feature (post-ReLU, like a ResNet's) has ``widths[-1]`` dimensions."""

    def __init__(self, widths: Sequence[int], num_classes: int, in_channels: int = 1):
        super().__init__()
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


for _name, _widths in TINY.items():
    register_classifier(_name, functools.partial(TinyCNN, _widths))
del _name, _widths


def build(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised classifier by name ('tiny_teacher', 'tiny_student' or a zoo name)."""
    return build_classifier(name, num_classes)


def load(name: str, path: str, num_classes: int) -> nn.Module:
    """A trained classifier from a local checkpoint (the zoo's checkpoint formats, the tiny models' too)."""
    return load_classifier(name, path, num_classes)


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled penultimate feature [B, D] (what GenDD distils)."""
    return pooled_features(model, x)


def classifier(model: nn.Module) -> nn.Linear:
    return classifier_of(model)


def freeze(model: nn.Module) -> nn.Module:
    """eval() and no gradients (the teacher)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
