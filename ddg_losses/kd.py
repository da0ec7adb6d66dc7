"""Hinton knowledge distillation: KL between temperature-softened teacher and student distributions."""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_NAME = "KLDistillationLoss"


class KLDistillationLoss(nn.Module):
    r"""``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)`` (Hinton et al. 2015).

    The KL term is averaged over the batch (``batchmean``, the per-sample KL of the distributions, which is
    what the T^2 factor is calibrated for: it keeps the gradient magnitude independent of T). The teacher
    logits are treated as constants (detached). Data-free KD (DeepInversion, DDIS) has no labels: leave
    ``alpha=1`` and call without ``target``. With ``alpha < 1`` the call needs ``target`` for the
    cross-entropy term. Logits of any floating dtype are computed in fp32 (fp64 stays fp64).

    Args:
        temperature: T > 0 (DeepInversion / DDIS' unpublished protocol: T = 3-4 is the common choice).
        alpha: weight of the KL term in [0, 1]; ``1 - alpha`` weights the cross-entropy on labels.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0):
        super().__init__()
        for what, value in (("temperature", temperature), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"{_NAME}: '{what}' must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{_NAME}: '{what}' must be finite, got {value}")
        if temperature <= 0:
            raise ValueError(f"{_NAME}: 'temperature' must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{_NAME}: 'alpha' must be in [0, 1], got {alpha}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_logits(student_logits, teacher_logits, target, need_target=self.alpha < 1.0)
        dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        s = student_logits.to(dtype)
        t = teacher_logits.detach().to(dtype)
        T = self.temperature
        kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean",
                      log_target=True) * (T * T)
        if self.alpha == 1.0:
            return kl
        return self.alpha * kl + (1.0 - self.alpha) * F.cross_entropy(s, target)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


def _check_logits(student, teacher, target, need_target: bool) -> None:
    for what, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{_NAME}: '{what}' must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point() or x.dim() != 2:
            raise ValueError(f"{_NAME}: '{what}' must be floating [batch, classes] logits, got "
                             f"{x.dtype} of shape {tuple(x.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"{_NAME}: 'student_logits' and 'teacher_logits' must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if target is None:
        if need_target:
            raise ValueError(f"{_NAME}: 'target' (class indices) is required when alpha < 1, got None")
        return
    if not isinstance(target, torch.Tensor) or target.dtype != torch.long or target.shape != student.shape[:1]:
        raise ValueError(f"{_NAME}: 'target' must be int64 class indices of shape ({student.shape[0]},), got "
                         f"{getattr(target, 'dtype', type(target).__name__)} of shape "
                         f"{tuple(getattr(target, 'shape', ()))}")
