"""Discrete Gaussian diffusion schedules (DDPM / IDDPM), as tables the split-token ops read.

Same tables as the ADM/IDDPM code that MAR and GenDD use (docs/methods/gendd.md §2.8): betas of the
cosine or linear schedule, their cumulative products and the posterior coefficients, built
in float64 and handed to kernels as float32 columns. ``respace`` gives the evenly strided
sub-schedule used for sampling (e.g. 100 of 1000 steps) with its own betas; the network is
still fed the original timestep indices (``timestep_map``).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Union

import torch

NOISE_SCHEDULES = ("cosine", "linear")
MAX_BETA = 0.999  # IDDPM clips cosine betas here to avoid a singularity at t = T


def _cosine_betas(steps: int) -> torch.Tensor:
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), MAX_BETA) for i in range(steps)],
                        dtype=torch.float64)


def _linear_betas(steps: int) -> torch.Tensor:
    scale = 1000 / steps  # IDDPM: the 1000-step DDPM range, rescaled to other lengths
    return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, spacing: Union[int, str, Sequence[int]]) -> List[int]:
    """The timesteps kept when respacing: ``spacing`` is a step count (``100`` or ``"100"``) or a
    comma-separated list of per-section counts (``"10,15,20"``): the schedule is cut into equal
    sections and each is strided evenly with rounded indices, as IDDPM's ``space_timesteps``."""
    if isinstance(spacing, str):
        counts = [int(c) for c in spacing.split(",")] if spacing else [num_timesteps]
    elif isinstance(spacing, int):
        counts = [spacing]
    else:
        counts = [int(c) for c in spacing]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"space_timesteps: cannot take {count} steps from a section of {size} "
                             f"(num_timesteps={num_timesteps}, spacing={spacing!r})")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):  # accumulated like IDDPM, so the rounding matches it step for step
            kept.append(start + round(position))
            position += stride
        start += size
    return kept


class GaussianDiffusionSchedule:
    """Float64 tables of a discrete DDPM schedule given its betas ([T])."""

    def __init__(self, betas: torch.Tensor, timestep_map: Sequence[int] = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or betas.numel() < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"GaussianDiffusionSchedule: 'betas' must be a 1-D tensor of at least 2 values "
                             f"in (0, 1], got shape {tuple(betas.shape)}")
        self.betas = betas
        self.num_timesteps = betas.numel()
        self.timestep_map = torch.as_tensor(list(range(self.num_timesteps)) if timestep_map is None
                                            else list(timestep_map), dtype=torch.long)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.alphas_cumprod = ac
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = ac.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0: its log is clipped to the t = 1 value.
        self.posterior_log_variance_clipped = torch.cat(
            [self.posterior_variance[1:2], self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)

    @classmethod
    def named(cls, name: str = "cosine", num_timesteps: int = 1000) -> "GaussianDiffusionSchedule":
        if name not in NOISE_SCHEDULES:
            raise ValueError(f"GaussianDiffusionSchedule: 'name' must be one of {NOISE_SCHEDULES}, got {name!r}")
        return cls(_cosine_betas(num_timesteps) if name == "cosine" else _linear_betas(num_timesteps))

    def respace(self, spacing: Union[int, str, Sequence[int]],
                skip_last_timestep: bool = False) -> "GaussianDiffusionSchedule":
        """The sub-schedule on the kept timesteps, with betas 1 - abar(t_i)/abar(t_{i-1}).

        ``skip_last_timestep`` leaves t = T-1 out of the kept steps (the reverse chain then starts at the
        next kept timestep). Why: the cosine schedule clips beta at 0.999, so abar(T-1) = 2.4e-9 and the
        first reverse step multiplies a model's epsilon error by sqrt(abar_next / abar(T-1)) (x1674 with
        20 evenly strided steps); one step later N(0, I) is still the right prior (abar = 7e-3 at 20 steps).
        """
        kept = space_timesteps(self.num_timesteps, spacing)
        if skip_last_timestep:
            kept = [t for t in kept if t < self.num_timesteps - 1]
            if len(kept) < 2:
                raise ValueError(f"GaussianDiffusionSchedule.respace: skip_last_timestep needs spacing {spacing!r} "
                                 f"to keep at least 2 timesteps below T-1 = {self.num_timesteps - 1}")
        ac = self.alphas_cumprod[kept]
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return GaussianDiffusionSchedule(1.0 - ac / prev, self.timestep_map[kept].tolist())

    # ---------------------------------------------------------------- tables for the ops

    def noising_tables(self, device=None, dtype: torch.dtype = torch.float32):
        """(sqrt(abar_t), sqrt(1 - abar_t)) as [T] tensors (float32 unless asked), for q(x_t | x_0)."""
        return (self.sqrt_alphas_cumprod.to(device, dtype), self.sqrt_one_minus_alphas_cumprod.to(device, dtype))

    def loss_coefs(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[T, 3] (float32 unless asked): (posterior_mean_coef1 * sqrt(1/abar - 1), log beta, clipped log posterior
        variance). The first column maps (eps_hat - eps) to mu_q - mu_theta (= x_0 - mu_theta at t = 0),
        so the hybrid loss needs only eps, eps_hat, v and t (docs/methods/gendd.md §3; docs/split_token_kernels.md §5, K5)."""
        cols = [self.posterior_mean_coef1 * self.sqrt_recipm1_alphas_cumprod, self.betas.log(),
                self.posterior_log_variance_clipped]
        return torch.stack(cols, 1).to(device, dtype)

    def fixed_log_variance(self, large: bool = True) -> torch.Tensor:
        """Log variance of the fixed-variance sampler: beta_t ('large', the posterior variance
        at t = 0) or the clipped posterior variance ('small'), float64 [T]."""
        if large:
            return torch.cat([self.posterior_variance[1:2], self.betas[1:]]).log()
        return self.posterior_log_variance_clipped
