"""The fake-score loss of DMD / DMD2 / DP-DMD (docs/methods/dpdmd.md §2.4, §3.2; docs/guidance_kernels.md §4, K5).

The fake score learns the denoising of the *generator's* samples: noise the (detached) generator output
at a random level and regress the model onto the flow-matching target eps - x (DP-DMD) or onto
eps (DMD2's epsilon UNets). The squared error is taken in fp32 whatever the model's dtype.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .noise_levels import NoiseLevel

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FakeScoreOutput(NamedTuple):
    loss: torch.Tensor
    level: NoiseLevel


class FakeScoreLoss(nn.Module):
    """mean || fake(x_t, t) - target ||^2 over a noise level drawn from ``schedule``.

    Args:
        schedule: ``FlowMatchingNoise`` (target eps - x) or ``DDPMNoise`` (target eps).
    """

    def __init__(self, schedule):
        super().__init__()
        if not all(hasattr(schedule, a) for a in ("draw", "add_noise", "target", "prediction", "noise_for")):
            raise TypeError(f"FakeScoreLoss: 'schedule' must be a FlowMatchingNoise or DDPMNoise, got "
                            f"{type(schedule).__name__}")
        self.schedule = schedule

    def forward(self, fake: Denoiser, x: torch.Tensor, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> FakeScoreOutput:
        """``fake(x_t, timestep)`` is the fake score's prediction; ``x`` the generator samples (detached here)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
            raise ValueError(f"FakeScoreLoss: 'x' must be a floating [B, ...] tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        x = x.detach()
        level = self.schedule.draw(x.shape[0], x.device, generator)
        noise = self.schedule.noise_for("FakeScoreLoss", x, noise, generator)
        pred = fake(self.schedule.add_noise(x, noise, level), level.timestep)
        loss = (pred.float() - self.schedule.target(x, noise)).square().mean()
        return FakeScoreOutput(loss, level)

    def extra_repr(self) -> str:
        return f"prediction={self.schedule.prediction!r}, per_sample={self.schedule.per_sample}"
