"""GenDD's method: what is trained in each stage and its loss on one batch (pure: no I/O, no RNG of its own;
the random choices of a GenDD step come from the generator the caller passes).

* stage 1 (optional): the student backbone + Linear(D_S -> D_T) feeding the frozen teacher classifier, CE.
* stage 2 (GenDD): the teacher is frozen in eval(); f_T its pooled feature, f_S the student's. Loss =
  ``GenDDLoss(f_S, f_T, y).loss + CE(student.fc(sg(f_S)), y)``: the backbone learns only through the
  diffusion loss (via the condition z = LN(f_S)), the student's linear head only through the CE.
* probe (optional third stage): a fresh student.fc on frozen features, CE.
* ``ce`` / ``kd``: the baselines of the tiny comparison (plain cross-entropy; Hinton KD).

Each ``*_loss`` takes the (possibly DDP-wrapped) trainable module, the frozen teacher where needed, a batch and
the step's generator, and returns ``(loss, metrics)``; the metrics are detached scalars for the log.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ddg_losses import GenDDLoss
from ddg_models import SplitTokenDiffusionHead

from . import models
from .presets import Preset

Metrics = Dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ stage 1

class Stage1Model(nn.Module):
    """student backbone -> proj Linear(D_S, D_T) (identity when D_S = D_T) -> frozen teacher classifier.
    The student's own fc is frozen (unused)."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        d_s, d_t = models.feature_dim(student), models.feature_dim(teacher)
        self.student = student
        self.proj = nn.Linear(d_s, d_t) if d_s != d_t else nn.Identity()
        self.teacher_fc = models.freeze(copy.deepcopy(models.classifier(teacher)))
        for p in models.classifier(student).parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_fc.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_fc(self.proj(models.features(self.student, x)))


def stage1_loss(model: nn.Module, batch, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Metrics]:
    x, y = batch
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    return ce, {"loss": ce.detach(), "ce": ce.detach(), "train_acc": _acc(logits, y)}


def load_stage1_backbone(student: nn.Module, stage1_state: Dict[str, torch.Tensor]) -> Dict[str, list]:
    """Load the ``student.*`` weights of a ``Stage1Model`` state dict non-strictly (the projection and the
    teacher classifier copy are dropped). Returns the missing / unexpected keys for the log."""
    state = {k[len("student."):]: v for k, v in stage1_state.items() if k.startswith("student.")}
    if not state:
        raise ValueError("the stage-1 checkpoint holds no 'student.*' weights")
    result = student.load_state_dict(state, strict=False)
    dropped = sorted(k for k in stage1_state if not k.startswith("student."))
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "dropped": dropped}


# ------------------------------------------------------------------------------------------------ stage 2

def build_gendd_loss(preset: Preset, student: nn.Module, teacher: nn.Module) -> GenDDLoss:
    """The diffusion head (width/depth/R of the preset) and GenDD's loss around it; the class prototypes
    of the contraction are the teacher classifier's weight rows."""
    d_s, d_t = models.feature_dim(student), models.feature_dim(teacher)
    if d_t % preset.token_size:
        raise ValueError(f"the teacher feature dim {d_t} is not a multiple of the token size {preset.token_size}")
    head = SplitTokenDiffusionHead(num_tokens=d_t // preset.token_size, cond_dim=d_s, token_size=preset.token_size,
                                   width=preset.head_width, depth=preset.head_depth, learn_sigma=preset.learn_sigma)
    prototypes = models.classifier(teacher).weight.detach().float()
    return GenDDLoss(head, prototypes=prototypes, contraction=preset.contraction, mix_beta=preset.mix_beta,
                     cond_drop_prob=preset.cond_drop_prob, batch_mul=preset.batch_mul)


class GenDDModel(nn.Module):
    """The stage-2 trainables: the student and ``GenDDLoss`` (cond_norm LayerNorm + diffusion head)."""

    def __init__(self, student: nn.Module, gendd: GenDDLoss):
        super().__init__()
        self.student = student
        self.gendd = gendd

    def forward(self, x: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor,
                generator: Optional[torch.Generator] = None):
        f_s = models.features(self.student, x)
        probe_logits = models.classifier(self.student)(f_s.detach())  # CE trains the linear head only
        with torch.autocast(device_type=x.device.type, enabled=False):  # the diffusion loss runs in fp32
            out = self.gendd(f_s.float(), teacher_features.float(), labels, generator=generator)
        return out, probe_logits


def teacher_outputs(teacher: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pooled feature f_T, logits) of the frozen teacher."""
    with torch.no_grad():
        f_t = models.features(teacher, x)
        return f_t, models.classifier(teacher)(f_t)


def gendd_loss(model: nn.Module, teacher: nn.Module, batch,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Metrics]:
    """Stage 2: the diffusion loss (timesteps, noise, CFG-drop mask and mixup drawn from ``generator``, else
    from the global generators) plus the CE of the student's fc on the detached feature."""
    x, y = batch
    f_t, _ = teacher_outputs(teacher, x)
    out, logits = model(x, f_t, y, generator=generator)
    ce = F.cross_entropy(logits.float(), y)
    loss = out.loss + ce
    return loss, {"loss": loss.detach(), "diff": out.loss.detach(), "mse": out.mse, "vb": out.vb, "ce": ce.detach(),
                  "train_acc": _acc(logits, y)}


# ------------------------------------------------------------------------------------------------ probe

class ProbeModel(nn.Module):
    """A linear classifier on the frozen (eval-mode) student backbone."""

    def __init__(self, student: nn.Module, reset: bool = True):
        super().__init__()
        self.student = student
        for p in student.parameters():
            p.requires_grad_(False)
        fc = models.classifier(student)
        if reset:
            fc.reset_parameters()
        for p in fc.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.eval()  # frozen BN statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = models.features(self.student, x)
        return models.classifier(self.student)(f)


def ce_loss(model: nn.Module, batch, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Metrics]:
    """Plain cross-entropy (the teacher, the CE baseline and the probe stage)."""
    x, y = batch
    logits = model(x)
    ce = F.cross_entropy(logits.float(), y)
    return ce, {"loss": ce.detach(), "ce": ce.detach(), "train_acc": _acc(logits, y)}


def kd_loss(model: nn.Module, teacher: nn.Module, batch, generator: Optional[torch.Generator] = None,
            temperature: float = 4.0, alpha: float = 0.9) -> Tuple[torch.Tensor, Metrics]:
    """Hinton KD: alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) CE (RepDistiller: T 4, alpha 0.9)."""
    x, y = batch
    _, t_logits = teacher_outputs(teacher, x)
    logits = model(x).float()
    ce = F.cross_entropy(logits, y)
    kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(t_logits.float() / temperature, 1),
                  reduction="batchmean") * temperature ** 2
    loss = alpha * kl + (1 - alpha) * ce
    return loss, {"loss": loss.detach(), "kd": kl.detach(), "ce": ce.detach(), "train_acc": _acc(logits, y)}


def _acc(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).float().mean().detach()


def unwrap(model: nn.Module, accelerator=None) -> nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    return getattr(model, "module", model)


__all__ = ["Stage1Model", "stage1_loss", "load_stage1_backbone", "build_gendd_loss", "GenDDModel", "gendd_loss",
           "ProbeModel", "ce_loss", "kd_loss", "teacher_outputs", "unwrap"]
