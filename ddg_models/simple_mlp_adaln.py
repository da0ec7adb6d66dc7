"""The diffusion head of MAR / GenDD in its original layout, written as plain eager PyTorch.

``SimpleMLPAdaLN`` is the per-row head of docs/methods/gendd.md §3: every row carries its own
timestep, condition vector and token id, and every layer runs on all rows. It keeps the
parameter names of the released checkpoints (``input_proj``, ``time_embed.mlp.{0,2}``,
``cond_embed``, ``pos_embed``, ``res_blocks.{i}.in_ln`` / ``.mlp.{0,2}`` /
``.adaLN_modulation.1``, ``final_layer.norm_final`` / ``.linear`` / ``.adaLN_modulation.1``),
which is the layout ``ddg_models.split_token_head.convert_simple_mlp_adaln_state_dict`` reads.

It is the test oracle of ``SplitTokenDiffusionHead`` (the deduplicated, fused head) and the
benchmark's straightforward baseline, so it does the obvious thing everywhere, including
sampling (``sample``: IDDPM's ancestral ``p_sample_loop`` on a respaced schedule).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ddg_ops import GaussianDiffusionSchedule

FIXED_VARIANCES = ("large", "small")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [len(t), dim] in fp32: ``[cos(t f_i), sin(t f_i)]`` (cos first) with
    ``f_i = max_period^(-i / (dim // 2))``; an odd ``dim`` gets a trailing zero column."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid of the timestep, then Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """adaLN-modulated MLP block with a gated residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """LayerNorm without affine, adaLN modulation, then the output projection."""

    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Per-row diffusion head: ``y = time_embed(t) + cond_embed(c) + pos_embed(k)`` conditions
    ``num_res_blocks`` adaLN ResBlocks and the final layer on ``input_proj(x)``.

    Args:
        in_channels: token size C (the diffused vector).
        model_channels: width W.
        out_channels: C (epsilon only, fixed sampling variance) or 2C (epsilon and the
            learned-range variance interpolation v in [-1, 1]).
        z_channels: size of the condition vector c.
        num_res_blocks: depth.
        num_chunks: number of token positions N (rows of ``pos_embed``).
        frequency_embedding_size: size of the timestep sinusoid.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, num_chunks: int, frequency_embedding_size: int = 256):
        super().__init__()
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(f"SimpleMLPAdaLN: 'out_channels' must be in_channels ({in_channels}, epsilon only) or "
                             f"2 * in_channels ({2 * in_channels}, learned variance), got {out_channels}")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.time_embed = TimestepEmbedder(model_channels, frequency_embedding_size)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.pos_embed = nn.Embedding(num_chunks, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero biases; N(0, 0.02) time MLP; zero adaLN projections and
        output layer, so the head starts at output 0 with identity blocks."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.res_blocks), self.final_layer.adaLN_modulation[-1],
                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, chunk_idx: torch.Tensor) -> torch.Tensor:
        """x [R, C], t int64 [R], c [R, z_channels], chunk_idx int64 [R] -> [R, out_channels]."""
        y = self.time_embed(t) + self.cond_embed(c) + self.pos_embed(chunk_idx)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, chunk_idx: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """MAR's guided call on [conditional; unconditional] halves: both halves are evaluated on the
        conditional half's x, the guided epsilon is written to both halves, and every row keeps its
        own variance channel."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c, chunk_idx)
        eps, rest = out[:, :self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, chunk_idx: torch.Tensor, cfg: float = 1.0, temperature: float = 1.0,
               schedule: Optional[GaussianDiffusionSchedule] = None, generator: Optional[torch.Generator] = None,
               fixed_variance: str = "large") -> torch.Tensor:
        """IDDPM ancestral sampling (``p_sample_loop``, no clipping) of one token per row.

        z: conditions [R, z_channels]; with ``cfg != 1`` the first half holds the conditional rows and
        the second half their unconditional copies (z = 0), as MAR's ``DiffLoss.sample``.
        chunk_idx: token ids [R]. schedule: the (respaced) sampling schedule; its ``timestep_map``
        gives the timesteps the network sees (default: the 1000-step cosine schedule).
        Variance: learned range when ``out_channels == 2 * in_channels``, else the fixed
        ``fixed_variance`` ('large': beta_t, 'small': the posterior variance).

        Noise: with H conditional rows, x_T and then the noise of every step but the last are
        ``torch.randn(H, C, generator=generator)`` (fp32, cast to the head's dtype), shared by the
        unconditional copies (whose samples MAR never reads). Returns all R rows [R, in_channels].
        """
        if fixed_variance not in FIXED_VARIANCES:
            raise ValueError(f"SimpleMLPAdaLN.sample: 'fixed_variance' must be one of {FIXED_VARIANCES}, "
                             f"got {fixed_variance!r}")
        schedule = schedule or GaussianDiffusionSchedule.named("cosine", 1000)
        guided = cfg != 1.0
        rows = z.shape[0] // 2 if guided else z.shape[0]
        dtype, device = self.input_proj.weight.dtype, self.input_proj.weight.device

        def table(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return values.to(device=device, dtype=dtype)[t][:, None]

        def noise() -> torch.Tensor:
            where = generator.device if generator is not None else device
            n = torch.randn(rows, self.in_channels, generator=generator, device=where).to(device, dtype)
            return torch.cat([n, n]) if guided else n

        log_fixed = schedule.fixed_log_variance(large=fixed_variance == "large")
        x = noise()
        for i in reversed(range(schedule.num_timesteps)):
            t = torch.full((z.shape[0],), i, dtype=torch.long, device=device)
            t_model = schedule.timestep_map.to(device)[t]
            if guided:
                out = self.forward_with_cfg(x, t_model, z, chunk_idx, cfg)
            else:
                out = self.forward(x, t_model, z, chunk_idx)
            eps = out[:, :self.in_channels]
            if self.learn_sigma:
                frac = (out[:, self.in_channels:] + 1) / 2
                log_var = (frac * table(schedule.betas.log(), t)
                           + (1 - frac) * table(schedule.posterior_log_variance_clipped, t))
            else:
                log_var = table(log_fixed, t)
            pred_x0 = table(schedule.sqrt_recip_alphas_cumprod, t) * x - table(schedule.sqrt_recipm1_alphas_cumprod,
                                                                               t) * eps
            mean = table(schedule.posterior_mean_coef1, t) * pred_x0 + table(schedule.posterior_mean_coef2, t) * x
            x = mean if i == 0 else mean + torch.exp(0.5 * log_var) * noise() * temperature
        return x
