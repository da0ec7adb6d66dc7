"""DP-DMD's few-step generator: a deterministic Euler rollout of a flow-matching model (docs/methods/dpdmd.md §2.2, §2.5b).

From noise x1 at sigma = 1 the student takes ``num_steps`` Euler steps x <- x + (sigma_{i+1} - sigma_i) * v
on the shifted flow-matching grid of diffusers' FlowMatchEulerDiscreteScheduler (SD3.5-M: shift 3,
4 steps: sigma = 1, 0.8577, 0.6022, 0.0089, 0). The first step's velocity is returned for the anchor
loss, and the state after the first step is detached, so the DMD gradient reaches steps 1..n-1 only
("gradients from DMD blocked at the first step").
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .model_call import Conditioning, batch_timestep, model_prediction


def shifted_flow_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sigmas (float32, ``num_steps + 1`` values ending in 0) that diffusers' FlowMatchEulerDiscreteScheduler
    (static ``shift``, no dynamic shifting) uses after ``set_timesteps(num_steps)``. Like the scheduler, the
    smallest sigma carries the shift twice (SD3.5-M, 1000 steps: sigma_min = 0.0089)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"shifted_flow_sigmas: 'num_steps' must be a positive int, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shifted_flow_sigmas: 'shift' must be > 0, got {shift!r}")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=float(shift))
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.to(torch.float32).clone()


class FewStepOutput(NamedTuple):
    sample: torch.Tensor          # x after the last step (the generator output the DMD loss is applied to)
    first_velocity: torch.Tensor  # v_0 = model(x1, t = 1000), in the graph (the anchor loss trains it)


class FewStepGenerator(nn.Module):
    """Few-step Euler rollout of a velocity model (SD3Transformer2DModel or any ``forward(x, timestep, **cond)``).

    Args:
        model: the trainable velocity model; timesteps are passed as ``timestep_scale * sigma`` ([B] float).
        num_steps: Euler steps (DP-DMD: 4).
        shift: shift of the flow-matching grid (SD3.5-M: 3.0).
        detach_first_step: cut the graph after step 0 (DP-DMD); False backpropagates through every step.
        timestep_scale: the model's timestep for sigma = 1 (diffusers' num_train_timesteps).
    """

    def __init__(self, model: nn.Module, num_steps: int = 4, shift: float = 3.0, detach_first_step: bool = True,
                 timestep_scale: float = 1000.0):
        super().__init__()
        self.model = model
        self.num_steps = num_steps
        self.shift = shift
        self.detach_first_step = detach_first_step
        self.timestep_scale = timestep_scale
        # A buffer so the grid follows .to(device); not persistent: it is a function of the config.
        self.register_buffer("sigmas", shifted_flow_sigmas(num_steps, shift, int(timestep_scale)), persistent=False)

    def forward(self, noise: torch.Tensor, cond: Conditioning) -> FewStepOutput:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.ndim < 2:
            raise ValueError(f"FewStepGenerator: 'noise' must be a floating [B, ...] tensor, got "
                             f"{getattr(noise, 'dtype', type(noise).__name__)} {tuple(getattr(noise, 'shape', ()))}")
        x, first_velocity = noise, None
        sigmas = self.sigmas.tolist()
        for i in range(self.num_steps):
            v = model_prediction(self.model, x, batch_timestep(self.timestep_scale * sigmas[i], x), cond)
            # Euler step accumulated in fp32 (the reference does it in bf16), stored in the latent dtype.
            x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(noise.dtype)
            if i == 0:
                first_velocity = v
                if self.detach_first_step:
                    x = x.detach()
        return FewStepOutput(x, first_velocity)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The generator output without a graph (fake-score updates, evaluation)."""
        return self(noise, cond).sample

    def extra_repr(self) -> str:
        return (f"num_steps={self.num_steps}, shift={self.shift}, detach_first_step={self.detach_first_step}, "
                f"sigmas={[round(s, 4) for s in self.sigmas.tolist()]}")
