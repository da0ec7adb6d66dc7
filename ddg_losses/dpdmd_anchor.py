"""DP-DMD's anchor ("diversity") loss on the student's first step (docs/methods/dpdmd.md §2.5a,c; docs/guidance_kernels.md §4, K4).

The teacher runs k CFG Euler steps from the student's own noise x1 to z_k at sigma_k; the target is
the average velocity from the noise to that state, v* = (x1 - z_k) / (1 - sigma_k), and the student's
first velocity v_0 is regressed onto it: w * mean(v_0 - v*)^2 in fp32. Since the student's first Euler
step lands at x1 - (1 - sigma_1) v_0, the loss pins where the first step goes for each noise, which is
what keeps different noises apart (diversity) while DMD, blocked at the first step, shapes the rest.
"""
from __future__ import annotations

import torch
from torch import nn


def anchor_target(x1: torch.Tensor, z_k: torch.Tensor, sigma_k: float) -> torch.Tensor:
    """v* = (x1 - z_k) / (1 - sigma_k) in fp32; sigma_k = 0 gives x1 - x0_teacher."""
    if not isinstance(x1, torch.Tensor) or not isinstance(z_k, torch.Tensor) or x1.shape != z_k.shape:
        raise ValueError(f"anchor_target: 'x1' and 'z_k' must be tensors of one shape, got "
                         f"{tuple(getattr(x1, 'shape', ()))} and {tuple(getattr(z_k, 'shape', ()))}")
    sigma_k = float(sigma_k)
    if not 0.0 <= sigma_k < 1.0:
        raise ValueError(f"anchor_target: 'sigma_k' must be in [0, 1) (at least one teacher step), got {sigma_k}")
    return (x1.float() - z_k.float()) / (1.0 - sigma_k)


class AnchorLoss(nn.Module):
    """weight * mean((v_0 - v*)^2), v* = anchor_target(x1, z_k, sigma_k); gradient only into v_0.

    Args:
        weight: w (DP-DMD ``--div_weight`` 0.05).
    """

    def __init__(self, weight: float = 0.05):
        super().__init__()
        if not float(weight) >= 0:
            raise ValueError(f"AnchorLoss: 'weight' must be >= 0, got {weight!r}")
        self.weight = float(weight)

    def forward(self, first_velocity: torch.Tensor, x1: torch.Tensor, z_k: torch.Tensor,
                sigma_k: float) -> torch.Tensor:
        if first_velocity.shape != x1.shape:
            raise ValueError(f"AnchorLoss: 'first_velocity' must be shaped like 'x1' {tuple(x1.shape)}, got "
                             f"{tuple(first_velocity.shape)}")
        target = anchor_target(x1.detach(), z_k.detach(), sigma_k)
        return self.weight * (first_velocity.float() - target).square().mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
