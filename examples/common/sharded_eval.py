"""Evaluation split between ranks whose result does not depend on the process count.

The test set is cut into fixed chunks of ``batch_size`` consecutive images (the last may be shorter); rank r of
``world`` evaluates chunks r, r + world, ... and the per-chunk counts are summed over the ranks. A chunk is the
same images in the same batch whatever the process count, and randomness an evaluation draws (e.g. a sampler's
noise) is seeded per chunk, so one process, eight, or a user re-evaluating an exported model on one process get
the same numbers. Every image is evaluated once: no padding duplicates to remove.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset


def num_chunks(size: int, batch_size: int, max_batches: Optional[int] = None) -> int:
    """How many chunks of ``batch_size`` cover ``size`` images (at most ``max_batches``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"num_chunks: batch_size must be a positive int, got {batch_size!r}")
    n = math.ceil(size / batch_size)
    return n if max_batches is None else min(n, max_batches)


def rank_chunks(dataset: Dataset, batch_size: int, rank: int = 0, world: int = 1, max_batches: Optional[int] = None,
                num_workers: int = 0) -> Tuple[List[int], DataLoader]:
    """This rank's chunk indices and a loader yielding their batches in that order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank_chunks: rank must be in [0, {world}), got {rank}")
    size = len(dataset)
    mine = list(range(rank, num_chunks(size, batch_size, max_batches), world))
    batches = [list(range(c * batch_size, min(size, (c + 1) * batch_size))) for c in mine]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available())
    return mine, loader


def sum_over_ranks(accelerator, counts: torch.Tensor) -> torch.Tensor:
    """``counts`` (int64) summed over every process (itself without an accelerator or with one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return counts
    return accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
