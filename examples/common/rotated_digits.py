"""RotatedDigits: DomainBed's RotatedMNIST protocol on scikit-learn's bundled digits (nothing downloaded).

The 1797 digits are shuffled once (fixed seed) and dealt into one disjoint subset per angle; subset i is
rotated by ``angles[i]`` degrees (bilinear, zero fill), after an upsampling from 8x8 to ``size`` x ``size``."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

ROTATED_DIGITS_ANGLES = (0, 15, 30, 45, 60, 75)
ROTATED_DIGITS_SEED = 0  # the deal into environments is fixed, whatever a run's seed


def rotated_digits(angles: Sequence[int] = ROTATED_DIGITS_ANGLES, size: int = 16
                   ) -> Tuple[List[str], List[Tuple[torch.Tensor, torch.Tensor]]]:
    """(environment names 'rot<angle>', [(images [N_i, 1, size, size] in [0, 1], labels [N_i]) per angle])."""
    from sklearn.datasets import load_digits
    from torchvision.transforms.functional import InterpolationMode, rotate

    if not angles:
        raise ValueError("rotated_digits: 'angles' is empty")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"rotated_digits: 'size' must be an int >= 8, got {size!r}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(ROTATED_DIGITS_SEED))
    envs = []
    for i, angle in enumerate(angles):
        idx = perm[i::len(angles)]
        envs.append((rotate(x[idx], float(angle), interpolation=InterpolationMode.BILINEAR).clamp(0, 1), y[idx]))
    return [f"rot{a}" for a in angles], envs
