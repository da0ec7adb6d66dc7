"""DDIS' three steps (docs/methods/ddis.md §2-§3), pure: no files, no processes; randomness from the generators
they are handed.

* CAT (class alignment token): one optimiser step of a class group's token rows: sample with DAG, classify
  the final image with the teacher, and backpropagate the cross-entropy into the token through the last
  ``grad_steps`` denoising steps only; ``prompts_per_step`` prompts per class accumulate into one step, the
  token gradient is clipped after the backward (the reference's clipping was dead code) and weight decay is
  undone on every other row of the embedding matrix.
* DAG synthesis: a batch of images, image k of class c starting from the noise of its own generator
  ``(seed, c, k)``, so an image does not depend on the batch or the process that made it (with per-image BN
  statistics, ``bn_batch='per_image'``).
* KD: Hinton's KL of the temperature-softened outputs of the teacher and the student on synthetic images
  (``ddg_losses.KLDistillationLoss``); the synthetic labels are not used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ddg_losses import KLDistillationLoss

NOISE_STRIDE = 1_000_003


def latent_shape(sampler) -> Tuple[int, ...]:
    """(C, h, w) of the UNet's latents."""
    cfg = sampler.teacher.model.config
    size = cfg.sample_size
    return (cfg.in_channels,) + ((size, size) if isinstance(size, int) else tuple(size))


def class_groups(num_classes: int, joint: bool) -> List[List[int]]:
    """One group per class (DDIS), or every class in one group (the tiny preset's joint training)."""
    return [list(range(num_classes))] if joint else [[c] for c in range(num_classes)]


def teacher_logits(teacher: nn.Module, preprocess: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits of images in [0, 1] (the preprocess modules take the VAE's [-1, 1] range)."""
    return teacher(preprocess(images * 2 - 1))


# ------------------------------------------------------------------------------------------------ CAT

@dataclass
class CATBatch:
    """What one CAT step needs besides the models: the labels of its prompts (``prompts_per_step`` copies of
    the group), the sampling call's settings, and the seed of its noises."""
    labels: torch.Tensor
    steps: int
    grad_steps: int
    chunk: int
    seed: int


def cat_step(sampler, tokens, teacher: nn.Module, ce_preprocess: nn.Module, optimizer, batch: CATBatch,
             uncond: Dict[str, torch.Tensor], max_grad_norm: float, latent: Sequence[int]) -> Dict[str, float]:
    """One optimiser step of the trainable token rows; returns the summed cross-entropy (``loss``), the
    accuracy of the teacher on the images and the gradient norm before clipping. The noises are drawn from a
    generator seeded with ``batch.seed`` (DDIS reseeds every epoch: the same noises recur)."""
    g = torch.Generator().manual_seed(batch.seed)
    device = sampler.codec.device
    optimizer.zero_grad(set_to_none=True)
    total, correct, n = 0.0, 0, len(batch.labels)
    for chunk in batch.labels.split(batch.chunk):
        latents = torch.randn((len(chunk),) + tuple(latent), generator=g).to(device)
        cond = sampler.prompt_encoder(tokens.prompts(chunk.tolist()))
        out = sampler(cond, uncond, latents=latents, num_inference_steps=batch.steps, grad_steps=batch.grad_steps)
        logits = teacher_logits(teacher, ce_preprocess, out.images).float()
        loss = F.cross_entropy(logits, chunk.to(device), reduction="sum") / n
        loss.backward()
        total += float(loss.detach())
        correct += int((logits.argmax(1).cpu() == chunk).sum())
    grad_norm = float(tokens.clip_grad_norm_(max_grad_norm))
    if not math.isfinite(total):
        classes = sorted(set(batch.labels.tolist()))
        raise FloatingPointError(f"cat_step: non-finite cross-entropy {total} (classes {classes})")
    optimizer.step()
    tokens.restore_frozen_rows()
    return {"loss": total, "accuracy": correct / n, "grad_norm": grad_norm}


def cat_optimizer(tokens, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(tokens.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


# ------------------------------------------------------------------------------------------------ synthesis

def image_noise(seed: int, c: int, k: int, shape: Sequence[int]) -> torch.Tensor:
    """The initial latent of image k of class c (fp32, CPU): a function of (seed, c, k) only."""
    g = torch.Generator().manual_seed((seed * NOISE_STRIDE + c) * NOISE_STRIDE + k)
    return torch.randn(tuple(shape), generator=g)


@torch.no_grad()
def class_conditionings(sampler, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The conditioning rows of every class prompt, encoded one by one (padding never depends on a batch)."""
    one_by_one = [sampler.prompt_encoder([p]) for p in prompts]
    return {k: torch.cat([e[k] for e in one_by_one]) for k in one_by_one[0]}


def synthesize_batch(sampler, embeds: Dict[str, torch.Tensor], uncond: Dict[str, torch.Tensor],
                     jobs: Sequence[Tuple[int, int]], *, seed: int, steps: int, guided: bool = True):
    """Images [N, C, H, W] in [0, 1] (fp32) of the (class, k) ``jobs`` and the DAG losses of the batch. The
    latents and the DAG update stay fp32 whatever the models' dtype (GuidedTeacher and VAECodec cast at their
    boundaries)."""
    if not jobs:
        raise ValueError("synthesize_batch: 'jobs' must hold at least one (class, k) pair")
    shape = latent_shape(sampler)
    latents = torch.stack([image_noise(seed, c, k, shape) for c, k in jobs]).to(sampler.codec.device)
    rows = [c for c, _ in jobs]
    cond = {k: v[rows] for k, v in embeds.items()}
    with torch.no_grad():
        out = sampler(cond, uncond, latents=latents, num_inference_steps=steps, guided_steps=None if guided else [])
    return out.images.float(), list(out.guidance_losses)


# ------------------------------------------------------------------------------------------------ KD

def kd_step(student: nn.Module, teacher: nn.Module, x: torch.Tensor,
            criterion: KLDistillationLoss) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The KD loss of a batch of synthetic images (fp32 on the logits whatever the autocast)."""
    with torch.no_grad():
        t_logits = teacher(x).float()
    s_logits = student(x).float()
    loss = criterion(s_logits, t_logits)
    agree = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean()
    return loss, {"kd_loss": loss.detach(), "agreement": agree.detach()}


def kd_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"kd_optimizer: 'name' must be 'sgd' or 'adamw', got {name!r}")


@torch.no_grad()
def top1(model: nn.Module, batches, device=None) -> Tuple[int, int]:
    """(correct, total) of ``model`` over (image, label) batches."""
    model.eval()
    correct = total = 0
    for x, y in batches:
        if device is not None:
            x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct, total


__all__ = ["latent_shape", "class_groups", "teacher_logits", "CATBatch", "cat_step", "cat_optimizer", "image_noise",
           "class_conditionings", "synthesize_batch", "kd_step", "kd_optimizer", "top1"]
