"""The 2-D velocity field of the tiny preset: an MLP over (x, timestep, condition).

It has the calling convention of the diffusers denoisers the library wraps,
``forward(x, timestep, label)`` with ``timestep = 1000 sigma``; label ``num_conditions`` is the
null condition of classifier-free guidance. Teacher, student and fake score are three copies.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class VelocityMLP(nn.Module):
    def __init__(self, num_conditions: int, dim: int = 2, width: int = 256, depth: int = 4, time_features: int = 32):
        super().__init__()
        self.config = dict(num_conditions=num_conditions, dim=dim, width=width, depth=depth,
                           time_features=time_features)
        self.num_conditions = num_conditions
        self.time_features = time_features
        self.label_embed = nn.Embedding(num_conditions + 1, width)  # + the null label
        self.inp = nn.Linear(dim + time_features, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, dim)

    def _time(self, timestep: torch.Tensor) -> torch.Tensor:
        # Sinusoidal features of sigma = timestep / 1000 (frequencies 1 .. 2^(F/2 - 1) * pi).
        sigma = (timestep.float() / 1000.0)[:, None]
        freqs = math.pi * 2.0 ** torch.arange(self.time_features // 2, device=sigma.device)
        return torch.cat([(sigma * freqs).sin(), (sigma * freqs).cos()], dim=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or label.shape != x.shape[:1]:
            raise ValueError(f"VelocityMLP: expected x [B, D] and label [B], got {tuple(x.shape)} and "
                             f"{tuple(label.shape)}")
        h = self.inp(torch.cat([x.float(), self._time(timestep.expand(x.shape[0]))], dim=1))
        h = torch.nn.functional.silu(h + self.label_embed(label))
        for block in self.blocks:
            h = h + torch.nn.functional.silu(block(h))
        return self.out(h).to(x.dtype)
