"""Noise levels of the DMD and fake-score losses (docs/methods/dpdmd.md §2.2, §3.2).

``FlowMatchingNoise`` (DP-DMD): sigma is drawn uniformly from a table of sigmas (SD3.5-M: the 1000
shifted sigmas of ``set_timesteps(1000)``, median 0.75), one per batch as the reference does or one
per sample; x_sigma = (1 - sigma) x + sigma eps, target eps - x, model timestep 1000 sigma.
``DDPMNoise`` (DMD2): t uniform in [min_step, max_step), one per sample by default;
x_t = sqrt(ab) x + sqrt(1 - ab) eps, target eps.
Both mix in fp32 (the reference rounds sigma to bf16 first, docs/methods/dpdmd.md §2.7) and return the latent dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class NoiseLevel(NamedTuple):
    timestep: torch.Tensor  # [B] float32: what the model is given
    coef: torch.Tensor      # [B] float32: sigma (flow matching) or alpha_bar (DDPM)


def _check_table(owner: str, name: str, table: torch.Tensor, low: float, high: float) -> torch.Tensor:
    if not isinstance(table, torch.Tensor) or table.ndim != 1 or table.numel() == 0:
        raise ValueError(f"{owner}: '{name}' must be a non-empty 1-D tensor, got "
                         f"{getattr(table, 'shape', type(table).__name__)}")
    table = table.detach().to(torch.float32).cpu()
    if not bool(((table >= low) & (table <= high)).all()):
        raise ValueError(f"{owner}: '{name}' must lie in [{low}, {high}], got [{table.min():.4g}, {table.max():.4g}]")
    return table


def _draw_indices(high: int, batch: int, per_sample: bool, low: int = 0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"draw: 'batch' must be a positive int, got {batch!r}")
    return torch.randint(low, high, (batch if per_sample else 1,), generator=generator).expand(batch)


class _NoiseSchedule:
    prediction: str

    def noise_like(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    def noise_for(self, owner: str, x: torch.Tensor, noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The given ``noise`` (checked: one value per element of ``x``) or fresh noise drawn with ``generator``.
        A smaller noise tensor would broadcast in the mix and silently share one draw across samples."""
        if noise is None:
            return self.noise_like(x, generator)
        if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"{owner}: 'noise' must be a tensor shaped like 'x' {tuple(x.shape)}, got {got}")
        return noise


class FlowMatchingNoise(_NoiseSchedule):
    """Rectified-flow noising with sigma drawn from ``sigmas`` (values in [0, 1]).

    Args:
        sigmas: candidate sigmas, e.g. ``ddg_models.shifted_flow_sigmas(1000, 3.0)[:-1]`` for SD3.5-M.
        per_sample: one sigma per sample (True) or one per batch (False, the DP-DMD reference).
        timestep_scale: the model timestep of sigma = 1.
    """
    prediction = "velocity"

    def __init__(self, sigmas: torch.Tensor, per_sample: bool = False, timestep_scale: float = 1000.0):
        self.sigmas = _check_table("FlowMatchingNoise", "sigmas", sigmas, 0.0, 1.0)
        self.per_sample = per_sample
        self.timestep_scale = timestep_scale

    def draw(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> NoiseLevel:
        sigma = self.sigmas[_draw_indices(len(self.sigmas), batch, self.per_sample, generator=generator)]
        return NoiseLevel((self.timestep_scale * sigma).to(device), sigma.to(device))

    @staticmethod
    def add_noise(x: torch.Tensor, noise: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        s = level.coef.to(x.device).view(-1, *([1] * (x.ndim - 1)))
        return ((1 - s) * x.float() + s * noise.float()).to(x.dtype)

    @staticmethod
    def target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise.float() - x.float()

    @staticmethod
    def dmd_inputs(x_t: torch.Tensor, level: NoiseLevel) -> dict:
        return {}


class DDPMNoise(_NoiseSchedule):
    """DDPM noising at integer timesteps t in [min_step, max_step) of ``alphas_cumprod`` ([T]).

    Args:
        alphas_cumprod: the scheduler's alpha_bar table (e.g. DDPMScheduler(...).alphas_cumprod).
        min_step, max_step: DMD2's DM loss uses [0.02 T, 0.98 T); its fake loss [0, T).
        per_sample: one t per sample (DMD2) or one per batch.
    """
    prediction = "epsilon"

    def __init__(self, alphas_cumprod: torch.Tensor, min_step: int = 0, max_step: Optional[int] = None,
                 per_sample: bool = True):
        self.alphas_cumprod = _check_table("DDPMNoise", "alphas_cumprod", alphas_cumprod, 0.0, 1.0)
        total = len(self.alphas_cumprod)
        max_step = total if max_step is None else max_step
        if not 0 <= min_step < max_step <= total:
            raise ValueError(f"DDPMNoise: need 0 <= min_step < max_step <= {total}, got min_step={min_step}, "
                             f"max_step={max_step}")
        self.min_step, self.max_step, self.per_sample = min_step, max_step, per_sample

    def draw(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> NoiseLevel:
        t = _draw_indices(self.max_step, batch, self.per_sample, self.min_step, generator)
        return NoiseLevel(t.to(device=device, dtype=torch.float32), self.alphas_cumprod[t].to(device))

    @staticmethod
    def add_noise(x: torch.Tensor, noise: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        ab = level.coef.to(x.device).view(-1, *([1] * (x.ndim - 1)))
        return (ab.sqrt() * x.float() + (1 - ab).sqrt() * noise.float()).to(x.dtype)

    @staticmethod
    def target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise.float()

    @staticmethod
    def dmd_inputs(x_t: torch.Tensor, level: NoiseLevel) -> dict:
        return {"x_t": x_t, "alpha_bar": level.coef}
