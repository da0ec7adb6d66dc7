"""A frozen teacher with classifier-free guidance: the real score of DMD / DMD2 / DP-DMD (specs/dpdmd.md).

One batched call on [x; x] with [uncond; cond] conditioning gives both predictions; CFG runs on
ddg's fused ops. ``rollout`` is DP-DMD's anchor rollout: k CFG Euler steps on the teacher's
flow-matching grid (fused CFG + Euler, fp32 accumulation). Works with diffusers'
SD3Transformer2DModel (velocity; timestep 1000 * sigma), UNet2DConditionModel (epsilon; DDPM
timestep) or any module ``forward(x, timestep, **cond)``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ddg_ops import cfg_combine, cfg_step

from .few_step_generator import shifted_flow_sigmas
from .model_call import Conditioning, batch_timestep, concat_conditions, model_prediction

TEACHER_PREDICTIONS = ("velocity", "epsilon")


class CFGTeacher(nn.Module):
    """Frozen denoiser + CFG.

    Args:
        model: the teacher network; its parameters are frozen here (requires_grad False, eval mode).
        guidance_scale: CFG scale s of v_u + s (v_c - v_u) (DP-DMD 3.5; DMD2 SDXL 8, SD1.5 1.75).
        prediction: 'velocity' (flow matching) or 'epsilon' (DDPM).
        timestep_scale: timestep fed for sigma = 1 in flow rollouts (diffusers' num_train_timesteps).
    """

    def __init__(self, model: nn.Module, guidance_scale: float, prediction: str = "velocity",
                 timestep_scale: float = 1000.0):
        super().__init__()
        if prediction not in TEACHER_PREDICTIONS:
            raise ValueError(f"CFGTeacher: 'prediction' must be one of {TEACHER_PREDICTIONS}, got {prediction!r}")
        self.model = model.requires_grad_(False).eval()
        self.guidance_scale = float(guidance_scale)
        self.prediction = prediction
        self.timestep_scale = timestep_scale

    def train(self, mode: bool = True) -> "CFGTeacher":
        return super().train(False)  # a teacher stays in eval mode (dropout off) whatever the trainer does

    @torch.no_grad()
    def predict_pair(self, x_t: torch.Tensor, timestep, cond: Conditioning,
                     uncond: Conditioning) -> Tuple[torch.Tensor, torch.Tensor]:
        """(uncond, cond) predictions at x_t from one model call on the doubled batch."""
        t = batch_timestep(timestep, x_t)
        out = model_prediction(self.model, torch.cat([x_t, x_t]), torch.cat([t, t]), concat_conditions(uncond, cond))
        return out.chunk(2)

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, timestep, cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
        """The guided prediction u + s (c - u)."""
        return cfg_combine(*self.predict_pair(x_t, timestep, cond, uncond), self.guidance_scale)

    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, cond: Conditioning, uncond: Conditioning, num_inference_steps: int,
                steps: int, shift: float = 3.0) -> Tuple[torch.Tensor, float]:
        """``steps`` CFG Euler steps from ``noise`` (sigma = 1) on the ``num_inference_steps`` grid of ``shift``.
        Returns (z_k, sigma_k); steps = num_inference_steps samples the teacher to sigma = 0."""
        if self.prediction != "velocity":
            raise ValueError("CFGTeacher.rollout: the Euler rollout needs a flow-matching (prediction='velocity') "
                             f"teacher, this one is {self.prediction!r}")
        if not isinstance(steps, int) or not 0 <= steps <= num_inference_steps:
            raise ValueError(f"CFGTeacher.rollout: 'steps' must be an int in [0, num_inference_steps="
                             f"{num_inference_steps}], got {steps!r}")
        sigmas = shifted_flow_sigmas(num_inference_steps, shift, int(self.timestep_scale)).tolist()
        x = noise
        for i in range(steps):
            u, c = self.predict_pair(x, self.timestep_scale * sigmas[i], cond, uncond)
            x = cfg_step(x, u, c, self.guidance_scale, update="euler", coef_t=sigmas[i], coef_next=sigmas[i + 1])
        return x, sigmas[steps]

    def extra_repr(self) -> str:
        return f"guidance_scale={self.guidance_scale}, prediction={self.prediction!r}"
