"""Argument checks of the public functional API.

They run on both paths (kernel and reference) so a bad call fails the same way with or
without the extension, with a message that names the op, the argument, what was
expected and what came. The C++ ops repeat the checks for direct torch.ops callers.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"ddg.{op}: '{name}' must be a torch.Tensor, got {type(value).__name__}")


def check_operands(op: str, **operands: torch.Tensor) -> torch.Tensor:
    """All operands share the first one's shape, dtype and device; returns the first."""
    (first_name, ref), *_ = operands.items()
    for name, t in operands.items():
        check_tensor(op, name, t)
    if ref.ndim < 1:
        raise ValueError(f"ddg.{op}: '{first_name}' must have a leading batch dimension (at least 1-D), "
                         "got a 0-D tensor")
    if ref.dtype not in _DTYPES:
        raise TypeError(f"ddg.{op}: '{first_name}' must be float32, float64, float16 or bfloat16, got {ref.dtype}")
    for name, t in operands.items():
        if t.shape != ref.shape:
            raise ValueError(f"ddg.{op}: '{name}' must have the shape of '{first_name}' {tuple(ref.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"ddg.{op}: '{name}' must have the dtype of '{first_name}' ({ref.dtype}), got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"ddg.{op}: '{name}' must be on the device of '{first_name}' ({ref.device}), "
                             f"got {t.device}")
    return ref


def check_per_sample(op: str, name: str, value, ref: torch.Tensor) -> None:
    """A coefficient: a finite real number, or a floating tensor with one value per sample."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"ddg.{op}: '{name}' must be a floating-point tensor, got {value.dtype}")
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != ref.shape[0]):
            raise ValueError(f"ddg.{op}: '{name}' must be a number, a 0-D tensor or a tensor of shape "
                             f"[{ref.shape[0]}] (one value per sample), got shape {tuple(value.shape)}")
        if value.device != ref.device:
            raise ValueError(f"ddg.{op}: '{name}' must be on {ref.device} like the other operands, got {value.device}")
    elif isinstance(value, Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"ddg.{op}: '{name}' must be finite, got {value}")
    else:
        raise TypeError(f"ddg.{op}: '{name}' must be a number or a tensor, got {type(value).__name__}")


def check_number(op: str, name: str, value) -> None:
    """A finite real number (not a tensor)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"ddg.{op}: '{name}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"ddg.{op}: '{name}' must be finite, got {value}")


def check_in_range(op: str, name: str, value, low: float, high: float, low_open: bool = False) -> None:
    """Range check for plain numbers (per-sample tensors are not synchronised to the host)."""
    if isinstance(value, torch.Tensor):
        return
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"ddg.{op}: '{name}' must be in {bracket}{low}, {high}], got {value}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"ddg.{op}: '{name}' must be one of {', '.join(map(repr, choices))}, got {value!r}")
