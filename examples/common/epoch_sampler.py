"""A sampler whose epoch order is a function of (seed, epoch) alone, sharded by the pipeline across ranks.

Exact resume needs it (docs/examples.md, "Checkpoints"): a loader that shuffles with one generator drawn
from epoch after epoch replays epoch 1's order after a restart, and accelerate's own sharding fetches a batch
ahead. Rank r of ``world`` takes every world-th index from r (all ranks get equally many);
``set_epoch(e, start)`` skips the first ``start`` indices of the rank's share without loading them.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    def __init__(self, size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"EpochSampler: 'size' must be a non-negative int, got {size!r}")
        if not isinstance(world, int) or world < 1 or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"EpochSampler: need 0 <= rank < world, got rank={rank!r}, world={world!r}")
        self.size, self.seed, self.rank, self.world, self.epoch, self.start = size, seed, rank, world, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if epoch < 0 or start < 0:
            raise ValueError(f"EpochSampler.set_epoch: 'epoch' and 'start' must be >= 0, got {epoch}, {start}")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> torch.Tensor:
        """The whole permutation of ``epoch`` (every rank's share), cut to a multiple of ``world``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g)[:self.size // self.world * self.world]

    def __iter__(self):
        return iter(self.order(self.epoch)[self.rank::self.world][self.start:].tolist())

    def __len__(self) -> int:
        return max(self.size // self.world - self.start, 0)
