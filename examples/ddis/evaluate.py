"""Measures of a synthetic set: the teacher's BN-statistics loss on it (how far its statistics are from the
teacher's training data) and the teacher's accuracy on it (whether images show their prompt's class)."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from ddg_losses import BNStatAlignmentLoss


def load_image_folder(root: Path, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every image of an ImageFolder tree as one float tensor in [0, 1] and its labels (class folders in
    sorted order, which the ``<index>_<name>`` folders keep in class order)."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import Compose, Grayscale, ToTensor

    transform = Compose(([Grayscale(1)] if channels == 1 else []) + [ToTensor()])
    folder = ImageFolder(str(root), transform=transform)
    if len(folder) == 0:
        raise FileNotFoundError(f"no images under {root}")
    images, labels = zip(*(folder[i] for i in range(len(folder))))
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def set_measures(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, form: str = "unsquared") -> dict:
    """BN loss of the whole set as one batch (the statistics of the set against the teacher's running
    statistics) and the teacher's top-1 accuracy in %."""
    teacher.eval()
    with BNStatAlignmentLoss(teacher, form=form) as bn:
        logits = teacher(images)
        loss = float(bn())
    return {"bn_loss": loss, "teacher_acc": 100.0 * float((logits.argmax(1) == labels).float().mean())}
