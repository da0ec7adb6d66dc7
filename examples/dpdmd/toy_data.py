"""The 2-D ground truth of the tiny preset: a ring of Gaussian modes, grouped by condition.

``num_modes`` modes sit evenly on a circle; condition c owns the modes c, c + C, c + 2C, ... (C =
``num_conditions``), so the modes of one condition are spread around the ring and a mode-seeking
student that drops some of them is easy to see. Within a condition the j-th mode has weight
proportional to ``mode_decay ** j`` (1: equally likely; < 1: light modes, which mode-seeking
objectives drop first).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class RingMixture:
    num_conditions: int = 3
    modes_per_condition: int = 4
    radius: float = 2.5
    std: float = 0.15
    mode_decay: float = 1.0

    def __post_init__(self):
        if self.num_conditions < 1 or self.modes_per_condition < 1 or not self.radius > 0 or not self.std > 0 \
                or not 0 < self.mode_decay <= 1:
            raise ValueError(f"RingMixture: counts must be >= 1, radius/std > 0 and mode_decay in (0, 1], got {self}")

    def mode_weights(self) -> torch.Tensor:
        """[modes_per_condition] probabilities of a condition's modes (in ``modes_of`` order)."""
        w = self.mode_decay ** torch.arange(self.modes_per_condition, dtype=torch.float32)
        return w / w.sum()

    @property
    def num_modes(self) -> int:
        return self.num_conditions * self.modes_per_condition

    def centers(self) -> torch.Tensor:
        """[M, 2] mode centres, mode m at angle 2 pi m / M."""
        angle = torch.arange(self.num_modes, dtype=torch.float32) * (2 * math.pi / self.num_modes)
        return self.radius * torch.stack([angle.cos(), angle.sin()], dim=1)

    def modes_of(self, condition: int) -> torch.Tensor:
        """Indices of the modes owned by ``condition``."""
        if not 0 <= condition < self.num_conditions:
            raise ValueError(f"RingMixture.modes_of: 'condition' must be in [0, {self.num_conditions}), "
                             f"got {condition}")
        return torch.arange(condition, self.num_modes, self.num_conditions)

    def sample(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One point per label ([N] int64): a mode of its condition (``mode_weights``) plus Gaussian noise."""
        pick = torch.multinomial(self.mode_weights(), labels.numel(), replacement=True, generator=generator)
        mode = labels * 1 + pick * self.num_conditions
        return self.centers()[mode] + self.std * torch.randn(labels.shape[0], 2, generator=generator)
