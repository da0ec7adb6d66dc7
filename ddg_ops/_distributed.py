"""Merging per-channel statistics across processes (SyncBatchNorm-style), differentiably."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


class _GatherStats(torch.autograd.Function):
    """all_gather of a [K] tensor into [world, K]. Every rank computes the same loss from the
    gathered values, so the gradient of a rank's own slice is already exact on that rank:
    backward takes the slice, with no communication (a summing all_gather backward would
    scale input gradients by the world size)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.rank = dist.get_rank(group)
        out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, local.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rank], None


def merge_channel_stats(mean: torch.Tensor, var: torch.Tensor, count: int,
                        group: Optional[object] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global per-channel mean and biased variance from each rank's (count, mean, var).

    Chan's combination over ranks: mean = sum n_r mean_r / N and
    var = sum n_r (var_r + (mean_r - mean)^2) / N, differentiable w.r.t. the local stats.
    """
    # Gathered and merged in fp64: counts stay exact and large totals lose nothing.
    local = torch.cat([mean.double(), var.double(), mean.new_full((1,), float(count), dtype=torch.float64)])
    gathered = _GatherStats.apply(local, group)
    c = mean.shape[0]
    means, vars_, counts = gathered[:, :c], gathered[:, c:2 * c], gathered[:, 2 * c:]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    global_var = (counts * (vars_ + (means - global_mean) ** 2)).sum(0) / total
    return global_mean.to(mean.dtype), global_var.to(var.dtype)
