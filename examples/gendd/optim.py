"""Optimiser pieces of GenDD's recipe: AdamW with a per-iteration beta2 ramp, weight-decay groups that
exempt the diffusion head, and the per-epoch learning-rate schedules of the released scripts."""
from __future__ import annotations

import math
import re
from typing import Dict, List

import torch
from torch import nn

from ddg_models import SplitTokenDiffusionHead

from .presets import StageConfig

_LN = re.compile(r"(^|\.)ln(\d*|_[^.]*)(\.|$)")


def beta2_at(step: int, total_steps: int, beta2_min: float, beta2_max: float) -> float:
    """beta2(s) = bmax - (bmax - bmin) (1 + cos(pi s / S)) / 2: bmin at s = 0, bmax at s = S."""
    progress = step / max(total_steps, 1)
    return beta2_max - 0.5 * (beta2_max - beta2_min) * (1 + math.cos(math.pi * progress))


def named_ln(name: str) -> bool:
    """A parameter name with an 'ln' component ('ln', 'ln1', 'ln_f', ...): the original exempts them."""
    return bool(_LN.search(name))


def param_groups(model: nn.Module, cfg: StageConfig) -> List[Dict]:
    """[no-decay group, decay group] over the trainable parameters, in module order. No weight decay for
    the diffusion head (every ``SplitTokenDiffusionHead`` inside ``model``: the original's 'diffloss')
    and parameters named 'ln*'; ``cond_norm`` (the original ``cls_projector``) keeps weight decay."""
    head_params = {id(p) for m in model.modules() if isinstance(m, SplitTokenDiffusionHead) for p in m.parameters()}
    exempt, decayed = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if id(p) in head_params or named_ln(name) else decayed).append(p)
    groups = [{"params": exempt, "weight_decay": cfg.head_weight_decay, "name": "no_decay"},
              {"params": decayed, "weight_decay": cfg.weight_decay, "name": "decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: StageConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw | sgd)")
    beta2 = cfg.beta2_min if cfg.beta2_min is not None else cfg.beta2
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, beta2))


class EpochLR:
    """Learning-rate factor of epoch e (0-based) for ``torch.optim.lr_scheduler.LambdaLR``; see
    ``StageConfig``. A callable object, so the scheduler's state_dict records its settings."""

    def __init__(self, cfg: StageConfig):
        self.schedule, self.epochs, self.warmup = cfg.schedule, cfg.epochs, cfg.warmup_epochs
        self.milestones, self.decay_rate = tuple(cfg.milestones), cfg.decay_rate
        self.min_ratio = cfg.min_lr / cfg.lr if cfg.lr else 0.0

    def __call__(self, epoch: int) -> float:
        e = epoch + 1  # the scripts count epochs from 1
        if self.schedule == "step":
            warm = min(1.0, e / self.warmup) if self.warmup else 1.0
            return warm * self.decay_rate ** sum(e > m for m in self.milestones)
        if self.schedule != "cosine":
            raise ValueError(f"unknown lr schedule {self.schedule!r} (cosine | step)")
        if epoch < self.warmup:
            return e / self.warmup
        span = max(self.epochs - self.warmup, 1)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * (e - self.warmup) / span))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch; the lr of epoch 0 is set at construction."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, EpochLR(cfg))


def set_beta2(optimizer: torch.optim.Optimizer, beta2: float) -> None:
    for group in optimizer.param_groups:
        group["betas"] = (group["betas"][0], beta2)
