"""DMD2's few-step generator for epsilon-prediction UNets: backward simulation (docs/methods/dpdmd.md §3.2).

The generator is a DDPM epsilon model run at fixed timesteps (SD/SDXL 4-step: 999, 749, 499, 249). A
training sample picks a step j (uniform, or given): j passes without gradient from fresh noise, each
predicting x0 and re-noising it to the next timestep with *new* noise, then one pass with gradient at t_j
whose x0 is the output. The DMD loss applies to that x0; no backpropagation through time (DMD2 issue #45).
``sample`` runs all steps without gradient (inference).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .few_step_generator import FewStepOutput
from .model_call import Conditioning, batch_timestep, model_prediction


class BackwardSimulationGenerator(nn.Module):
    """Args:
        model: the trainable epsilon-prediction network (e.g. UNet2DConditionModel).
        alphas_cumprod: the DDPM alpha_bar table ([T], e.g. DDPMScheduler(...).alphas_cumprod).
        timesteps: the generator's timesteps, descending (DMD2 4-step: 999, 749, 499, 249).
    """

    def __init__(self, model: nn.Module, alphas_cumprod: torch.Tensor, timesteps: Sequence[int] = (999, 749, 499, 249)):
        super().__init__()
        timesteps = [int(t) for t in timesteps]
        if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.ndim != 1:
            raise ValueError("BackwardSimulationGenerator: 'alphas_cumprod' must be a 1-D tensor, got "
                             f"{getattr(alphas_cumprod, 'shape', type(alphas_cumprod).__name__)}")
        if not timesteps or any(not 0 <= t < len(alphas_cumprod) for t in timesteps) or \
                any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"BackwardSimulationGenerator: 'timesteps' must be strictly descending in "
                             f"[0, {len(alphas_cumprod)}), got {timesteps}")
        self.model = model
        self.timesteps = timesteps
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().to(torch.float64), persistent=False)

    def _x0(self, x_t: torch.Tensor, i: int, cond: Conditioning) -> torch.Tensor:
        t = self.timesteps[i]
        eps = model_prediction(self.model, x_t, batch_timestep(t, x_t), cond)
        ab = float(self.alphas_cumprod[t])
        # fp64 scalars, fp32 math: the reference computes x0 in float64 (docs/methods/dpdmd.md §3.2).
        return ((x_t.float() - (1 - ab) ** 0.5 * eps.float()) / ab ** 0.5).to(x_t.dtype)

    def _renoise(self, x0: torch.Tensor, i: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        ab = float(self.alphas_cumprod[self.timesteps[i]])
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
        return (ab ** 0.5 * x0.float() + (1 - ab) ** 0.5 * noise).to(x0.dtype)

    def forward(self, noise: torch.Tensor, cond: Conditioning, step: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> FewStepOutput:
        """x0 of the pass at t_step (with gradient) after ``step`` simulated passes; ``step`` None draws it
        uniformly (pass the same ``generator`` seed on every rank so all ranks pick the same step)."""
        n = len(self.timesteps)
        if step is None:
            step = int(torch.randint(0, n, (1,), generator=generator))
        if not isinstance(step, int) or not 0 <= step < n:
            raise ValueError(f"BackwardSimulationGenerator: 'step' must be an int in [0, {n}), got {step!r}")
        x = noise
        with torch.no_grad():
            for i in range(step):
                x = self._renoise(self._x0(x, i, cond), i + 1, generator)
        return FewStepOutput(self._x0(x, step, cond), None)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Conditioning, generator: Optional[torch.Generator] = None):
        """All steps (inference): the x0 of the last pass."""
        x = noise
        for i in range(len(self.timesteps)):
            x0 = self._x0(x, i, cond)
            if i + 1 < len(self.timesteps):
                x = self._renoise(x0, i + 1, generator)
        return x0

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}"
