"""Per-rank and shared random streams.

Every process of a run seeds its global generators (torch, numpy, python) with ``rank_seed(seed, rank)`` =
``seed + rank * RANK_STRIDE``: each rank draws its own timesteps, noise and masks, so the global batch sees
``num_processes`` independent draws rather than one rank's randomness repeated. This is accelerate's
``set_seed(seed, device_specific=True)`` (which adds the process index) with a wide stride, for two reasons:
rank 0 keeps the base seed, so a one-process run is the same whatever the launcher; and ``--seeds 0,1,2`` on
several ranks never hands two (seed, rank) pairs one stream (with a stride of 1, seed 0 on rank 1 is seed 1 on
rank 0). Draws that must be identical on every rank (e.g. a reference noise shared across ranks) come from
``shared_generator``, a generator the run owns and checkpoints with the rest of its RNG state.
"""
from __future__ import annotations

import random

import numpy as np
import torch

RANK_STRIDE = 1_000_003  # a prime above any seed a sweep uses


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s stream for base ``seed``."""
    if not isinstance(seed, int) or not isinstance(rank, int) or rank < 0 or seed < 0:
        raise ValueError(f"rank_seed: expected non-negative ints seed and rank, got seed={seed!r}, rank={rank!r}")
    return seed + rank * RANK_STRIDE


def seed_rank_stream(seed: int, rank: int) -> int:
    """Seed torch (CPU and CUDA), numpy and python with ``rank_seed(seed, rank)``; returns that seed."""
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)
    return s


def seed_shared(seed: int) -> None:
    """Seed the global generators identically on every rank (what must agree before DDP syncs anything:
    e.g. building a frozen module whose random init is not broadcast)."""
    seed_rank_stream(seed, 0)


def rank_generator(seed: int, rank: int, device="cpu") -> torch.Generator:
    """A generator of ``rank``'s own stream (distinct per rank)."""
    return torch.Generator(device=device).manual_seed(rank_seed(seed, rank))


def shared_generator(seed: int, device="cpu") -> torch.Generator:
    """A generator that draws the same numbers on every rank."""
    return torch.Generator(device=device).manual_seed(rank_seed(seed, 0))
