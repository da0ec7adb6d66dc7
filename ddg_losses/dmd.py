"""Distribution-matching loss (DMD / DMD2 / DP-DMD) as an nn.Module over ddg_ops.dmd_grad."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from ddg_ops import DMD_PREDICTIONS, DMDGradOutput, dmd_grad

from .noise_levels import NoiseLevel

RealScore = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
FakeScore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NoisedDMDOutput(NamedTuple):
    loss: torch.Tensor    # 0.5 * mean(g^2); its gradient w.r.t. the generator output is g / numel
    grad: torch.Tensor    # g (constant), fp32
    denom: torch.Tensor   # per-sample normaliser mean|p_real| (log it: it shows the scale of the scores)
    level: NoiseLevel     # the timesteps drawn


class DistributionMatchingLoss(nn.Module):
    """The DMD generator loss: 0.5 * mean(g^2) with gradient g / numel into the generator output.

    g is the per-sample normalised difference between the real score (teacher CFG of
    uncond/cond with ``guidance_scale``) and the fake score, computed by the fused
    ``dmd_grad`` op in fp32 (docs/methods/dpdmd.md). The teacher and fake predictions get no gradient.

    Args:
        guidance_scale: CFG scale of the real score (DP-DMD: 3.5; DMD2 SDXL: 8).
        prediction: 'velocity' (flow matching) or 'epsilon' (DDPM; forward then needs x_t, alpha_bar).
    """

    def __init__(self, guidance_scale: float, prediction: str = "velocity"):
        super().__init__()
        if prediction not in DMD_PREDICTIONS:
            raise ValueError(f"DistributionMatchingLoss: 'prediction' must be one of {DMD_PREDICTIONS}, "
                             f"got {prediction!r}")
        self.guidance_scale = guidance_scale
        self.prediction = prediction

    def forward(self, x: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor, fake: torch.Tensor,
                x_t: Optional[torch.Tensor] = None,
                alpha_bar: Optional[Union[float, torch.Tensor]] = None) -> DMDGradOutput:
        """Returns (grad, denom, loss); backpropagate ``loss``, log ``denom`` if useful."""
        return dmd_grad(x, uncond, cond, fake, self.guidance_scale, prediction=self.prediction, x_t=x_t,
                        alpha_bar=alpha_bar)

    def noised(self, x: torch.Tensor, real: RealScore, fake: FakeScore, schedule,
               noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> NoisedDMDOutput:
        """The whole DMD generator loss at a random noise level of ``schedule``.

        Draws the level (per sample or per batch, as ``schedule`` says) and the noise, noises the detached
        generator output ``x``, asks ``real(x_t, timestep)`` for the teacher's (uncond, cond) predictions
        and ``fake(x_t, timestep)`` for the fake score's, and applies the fused loss. Only ``x`` gets a
        gradient: g / numel with g = (v_real - v_fake) / mean|v_real| (velocity) or
        (x0_fake - x0_real) / mean|x - x0_real| (epsilon). Note the sign: the generator *descends*
        along g, which moves x0 towards the real score's x0.

        Args:
            schedule: ``FlowMatchingNoise`` (prediction='velocity') or ``DDPMNoise`` ('epsilon').
            noise: the epsilon to use (default: drawn with ``generator``).
        """
        if getattr(schedule, "prediction", None) != self.prediction:
            raise ValueError(f"DistributionMatchingLoss.noised: the noise schedule must be for prediction="
                             f"{self.prediction!r}, got {type(schedule).__name__} "
                             f"({getattr(schedule, 'prediction', None)!r})")
        level = schedule.draw(x.shape[0], x.device, generator)
        noise = schedule.noise_for("DistributionMatchingLoss.noised", x, noise, generator)
        x_t = schedule.add_noise(x.detach(), noise, level)
        with torch.no_grad():
            uncond, cond = real(x_t, level.timestep)
            fake_pred = fake(x_t, level.timestep)
        out = self(x, uncond, cond, fake_pred, **schedule.dmd_inputs(x_t, level))
        return NoisedDMDOutput(out.loss, out.grad, out.denom, level)

    def extra_repr(self) -> str:
        return f"guidance_scale={self.guidance_scale}, prediction={self.prediction!r}"
