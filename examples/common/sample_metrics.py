"""Sample-set metrics for generators: distribution distance, diversity and mode coverage (fp32/fp64 math)."""
from __future__ import annotations

import torch


def _points(name: str, fn: str, x: torch.Tensor, min_rows: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{fn}: '{name}' must be an [N, D] tensor with N >= {min_rows}, got "
                         f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    return x.detach().to(torch.float64)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Energy distance 2 E|a - b| - E|a - a'| - E|b - b'| (Szekely & Rizzo; V-statistic): 0 iff the
    distributions are equal, and, unlike a kernel MMD, free of a bandwidth."""
    a, b = _points("a", "energy_distance", a), _points("b", "energy_distance", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"energy_distance: 'a' and 'b' need one dimension, got {a.shape[1]} and {b.shape[1]}")
    return 2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()


def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance over the pairs i < j: a diversity of a point set."""
    x = _points("x", "mean_pairwise_distance", x, 2)
    n = x.shape[0]
    return torch.pdist(x).sum() / (n * (n - 1) / 2)


def mean_pairwise_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the pairs i < j of L2-normalised embeddings (DP-DMD's diversity is 1 - this)."""
    e = torch.nn.functional.normalize(_points("embeddings", "mean_pairwise_cosine", embeddings, 2), dim=1)
    n = e.shape[0]
    sim = e @ e.T
    return sim.triu(diagonal=1).sum() / (n * (n - 1) / 2)


def nearest_center_counts(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """How many points of ``x`` fall nearest to each of ``centers`` ([M, D]); int64 [M]."""
    x, centers = _points("x", "nearest_center_counts", x), _points("centers", "nearest_center_counts", centers)
    return torch.bincount(torch.cdist(x, centers).argmin(dim=1), minlength=centers.shape[0])
