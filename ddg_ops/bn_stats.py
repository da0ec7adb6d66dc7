"""BN-statistics ops (csrc/*/bn_stats.*): per-channel batch mean and variance of a feature map in one
pass, and the BN-statistics alignment loss built on them (optionally synchronised across processes).

Each function validates its arguments, then runs the compiled kernel for CPU/CUDA tensors when
the extension is loaded, and the pure-PyTorch reference otherwise.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import reference
from ._distributed import merge_channel_stats
from ._ext import use_kernel
from ._validate import check_choice, check_number, check_operands, check_tensor
from .reference import BNStatsLossOutput

BN_LOSS_FORMS = ("unsquared", "squared")

__all__ = ["bn_stats", "bn_stats_loss", "BNStatsLossOutput", "BN_LOSS_FORMS"]


def _check_feature_map(op: str, x: torch.Tensor) -> None:
    check_operands(op, x=x)
    if x.ndim < 2:
        raise ValueError(f"ddg.{op}: 'x' must be [N, C, ...] (at least 2-D), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"ddg.{op}: 'x' must have elements to take statistics of, got shape {tuple(x.shape)}")


def bn_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of a feature map, as BatchNorm computes them.

    ``x`` is [N, C, *] (NCHW, NC, NCL, ...; contiguous, channels-last or any strides); the
    statistics run over every dim but 1 in one Welford/Chan pass with fp32 accumulation
    (fp64 for fp64). Returns fp32 (fp64) [C] tensors; differentiable w.r.t. ``x``, the
    backward being one elementwise pass dL/dx = a_c + b_c * (x - mean_c).
    """
    _check_feature_map("bn_stats", x)
    if not use_kernel(x):
        return reference.bn_stats(x)
    return tuple(torch.ops.ddg.bn_stats(x))


def bn_stats_loss(x: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor, *, form: str = "unsquared",
                  weight: float = 1.0, sync: bool = False, process_group=None) -> BNStatsLossOutput:
    """BN-statistics alignment loss of DeepInversion / DDIS (docs/methods/ddis.md §4).

    ``weight * R`` with R = ||var - target_var||_2 + ||mean - target_mean||_2 (form='unsquared',
    DeepInversion and the DDIS code) or ||mean - target_mean||^2 + ||var - target_var||^2
    (form='squared', the DDIS paper); mean/var are ``bn_stats(x)``, the targets a BN layer's
    running statistics (constants). With ``sync=True`` the statistics are merged across the
    processes of ``process_group`` (default: the world) as SyncBatchNorm does, so every rank
    gets the loss of the global batch and each rank's ``x`` the exact gradient of it (right for
    optimising inputs, as DeepInversion and DAG do). Under DDP, which averages parameter
    gradients over ranks, multiply the loss by the world size to weight it as SyncBatchNorm would.
    """
    op = "bn_stats_loss"
    check_choice(op, "form", form, BN_LOSS_FORMS)
    check_number(op, "weight", weight)
    _check_feature_map(op, x)
    channels = x.shape[1]
    for name, t in (("target_mean", target_mean), ("target_var", target_var)):
        check_tensor(op, name, t)
        if t.shape != (channels,) or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"ddg.{op}: '{name}' must be a floating [C] = [{channels}] tensor on {x.device} "
                             f"(a BN layer's running statistics), got {t.dtype} {tuple(t.shape)} on {t.device}")
    mean, var = bn_stats(x)
    if sync:
        mean, var = merge_channel_stats(mean, var, x.numel() // channels, process_group)
    return BNStatsLossOutput(weight * reference.bn_alignment(mean, var, target_mean, target_var, form), mean, var)
