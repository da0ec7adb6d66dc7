"""Small helpers shared by the functional API and the reference ops."""
from __future__ import annotations

import torch


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """A [B] tensor viewed as [B, 1, ..., 1] to broadcast against a [B, ...] tensor."""
    return value.reshape(value.shape[0], *([1] * (ndim - 1)))
