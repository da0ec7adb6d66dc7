"""Distribution-matching loss (DMD / DMD2 / DP-DMD) as an nn.Module over ddg_ops.dmd_grad."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ddg_ops import DMD_PREDICTIONS, DMDGradOutput, dmd_grad


class DistributionMatchingLoss(nn.Module):
    """The DMD generator loss: 0.5 * mean(g^2) with gradient g / numel into the generator output.

    g is the per-sample normalised difference between the real score (teacher CFG of
    uncond/cond with ``guidance_scale``) and the fake score, computed by the fused
    ``dmd_grad`` op in fp32 (specs/dpdmd.md). The teacher and fake predictions get no gradient.

    Args:
        guidance_scale: CFG scale of the real score (DP-DMD: 3.5; DMD2 SDXL: 8).
        prediction: 'velocity' (flow matching) or 'epsilon' (DDPM; forward then needs x_t, alpha_bar).
    """

    def __init__(self, guidance_scale: float, prediction: str = "velocity"):
        super().__init__()
        if prediction not in DMD_PREDICTIONS:
            raise ValueError(f"DistributionMatchingLoss: 'prediction' must be one of {DMD_PREDICTIONS}, got {prediction!r}")
        self.guidance_scale = guidance_scale
        self.prediction = prediction

    def forward(self, x: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor, fake: torch.Tensor,
                x_t: Optional[torch.Tensor] = None,
                alpha_bar: Optional[Union[float, torch.Tensor]] = None) -> DMDGradOutput:
        """Returns (grad, denom, loss); backpropagate ``loss``, log ``denom`` if useful."""
        return dmd_grad(x, uncond, cond, fake, self.guidance_scale, prediction=self.prediction, x_t=x_t,
                        alpha_bar=alpha_bar)

    def extra_repr(self) -> str:
        return f"guidance_scale={self.guidance_scale}, prediction={self.prediction!r}"
