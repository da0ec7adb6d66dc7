"""DDG's method (docs/methods/ddg.md §2): what each stage trains and its loss on one step's batch. Pure: no I/O;
the step's random choices (diffusion timesteps and noise, the patch tokens of conditioning B) come from the
generator the caller passes.

* ``erm``: the student (backbone f, projection P, frozen zero-shot head W) on the CE of the source labels,
  f and P trained.
* ``align`` (VL2V): Stage I trains P on ``lmd * -cos(z, v_CLIP) + (1 - lmd) * -cos(z, t_y)``; Stage II trains f
  (P frozen) on the same loss.
* ``ddg``: ``align`` plus, in Stage II, ``beta * L_diff``: the frozen SD teacher denoises the VAE latents of each
  source domain's first images conditioned on the student's c(x), with the domain-debiasing CFG
  ``eps_n + w (eps_c - eps_n)`` against the empty or the source-domain prompt.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ddg_losses import GuidedDenoisingLoss, ImageTextAlignmentLoss
from ddg_models import (CLIPVisionBackbone, DDGStudent, PatchTokenAdapter, ProbabilityWeightedPromptAdapter,
                        StudentConditioning, ZeroShotHead, build_backbone, images_to_sd)

from .presets import Preset

METHODS = ("erm", "align", "ddg")


class DDGModule(nn.Module):
    """What the optimizer and DDP see: the student and, for DDG, the conditioning adapter c(x)."""

    def __init__(self, student: DDGStudent, conditioning: Optional[StudentConditioning]):
        super().__init__()
        self.student = student
        self.conditioning = conditioning

    def forward(self, x: torch.Tensor, context_index: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None):
        logits, z, tokens = self.student.encode(x)
        context = None
        if context_index is not None:
            context = self.conditioning(logits[context_index], tokens[context_index], generator)
        return logits, z, context


def uses_diffusion(method: str, p: Preset) -> bool:
    return method == "ddg" and p.beta > 0


def stages(method: str, p: Preset) -> List[tuple]:
    """(name, stage number, first step, end step) of each stage of a run: ERM is one stage; align and DDG switch
    from Stage I to Stage II at ``stage1_steps``."""
    if method == "erm":
        return [("train", 1, 0, p.steps)]
    if not 0 < p.stage1_steps < p.steps:
        raise ValueError(f"stages: {method} needs 0 < stage1_steps < steps, got stage1_steps={p.stage1_steps}, "
                         f"steps={p.steps}")
    return [("stage1", 1, 0, p.stage1_steps), ("stage2", 2, p.stage1_steps, p.steps)]


def build_backbone_for(p: Preset, clip_path, backbone_weights: Optional[str]) -> nn.Module:
    if p.backbone == "clip_vit":
        return CLIPVisionBackbone.from_pretrained(clip_path)
    return build_backbone(p.backbone, backbone_weights)


def build_module(p: Preset, backbone: nn.Module, class_text: torch.Tensor, logit_scale: float,
                 sd_class_prompts: Optional[torch.Tensor], context_shape, method: str) -> DDGModule:
    """The student (``backbone`` -> new projection -> zero-shot head over ``class_text``) and, when the method
    uses the diffusion term, the conditioning adapter. The patch-token adapter is built only when the
    conditioning uses it: a module that never gets a gradient would be one DDP waits for."""
    student = DDGStudent(backbone, ZeroShotHead(class_text.cpu(), logit_scale))
    conditioning = None
    if uses_diffusion(method, p):
        seq_len, width = context_shape
        prompts = ProbabilityWeightedPromptAdapter(sd_class_prompts.cpu())
        patches = None
        if p.conditioning in ("patches", "both"):
            patches = PatchTokenAdapter(backbone.token_dim, width, num_tokens=seq_len,
                                        has_cls_token=p.backbone != "resnet50")
        conditioning = StudentConditioning(p.conditioning, prompts=prompts, patches=patches)
    return DDGModule(student, conditioning)


def trainable(module: DDGModule, method: str, stage: int, p: Preset) -> List[nn.Parameter]:
    """Set requires_grad for the stage and return the optimised parameters.

    ERM: backbone + projection. Stage I (VL2V): P only ('projection') or f and P. Stage II: f only
    ('featurizer', P frozen) or f and P, plus the patch-token adapter when the diffusion term uses it.
    Only parameters that receive a gradient are trainable: DDP (find_unused_parameters=False, its fast path,
    which it keeps) registers exactly the parameters that require a gradient and waits for each of them."""
    module.requires_grad_(False)
    s = module.student
    if method == "erm":
        groups = [s.featurizer_parameters(), s.projection_parameters()]
    elif stage == 1:
        groups = [s.projection_parameters()] + ([s.featurizer_parameters()] if p.stage1_train == "all" else [])
    else:
        groups = [s.featurizer_parameters()] + ([s.projection_parameters()] if p.stage2_train == "all" else [])
        patches = module.conditioning.patches if module.conditioning is not None else None
        if patches is not None and uses_diffusion(method, p):
            groups.append(patches.parameters())
    params = [q for g in groups for q in g]
    for q in params:
        q.requires_grad_(True)
    return params


def diffusion_index(per_domain: int, n_domains: int, images: int, device) -> torch.Tensor:
    """The first ``images`` (0: all) of each source domain's block of the batch."""
    m = per_domain if images <= 0 else min(images, per_domain)
    return torch.cat([torch.arange(k * per_domain, k * per_domain + m) for k in range(n_domains)]).to(device)


class DDGLoss:
    """The loss terms of one step. ``teachers`` is the frozen CLIP + SD pair (``teachers.Teachers``); it is held
    here, never inside the trained module."""

    def __init__(self, p: Preset, method: str, teachers, n_sources: int, diffusion_images: int):
        if method not in METHODS:
            raise ValueError(f"DDGLoss: 'method' must be one of {METHODS}, got {method!r}")
        self.p, self.method, self.teachers = p, method, teachers
        self.n_sources, self.diffusion_images = n_sources, diffusion_images
        self.align = ImageTextAlignmentLoss(p.lmd)
        self.diffusion = GuidedDenoisingLoss(p.guidance_scale, p.guidance_rescale, p.timesteps_per_image)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor, stage: int,
                 generator: Optional[torch.Generator]) -> Dict[str, torch.Tensor]:
        p, t = self.p, self.teachers
        with_diff = stage == 2 and uses_diffusion(self.method, p)
        index = None
        if with_diff:
            index = diffusion_index(len(y) // self.n_sources, self.n_sources, self.diffusion_images, x.device)
        logits, z, context = model(x, context_index=index, generator=generator)
        terms = {"ce": F.cross_entropy(logits.float(), y)}
        if self.method == "erm":
            terms["loss"] = terms["ce"]
            return terms
        v = t.image_embeddings(x) if p.lmd > 0 else None
        terms["align"] = self.align(z, v, t.class_text[y])
        loss = terms["align"] + p.ce_weight * terms["ce"]
        if with_diff:
            x_sd = images_to_sd(x[index].float(), p.mean, p.std, p.sd_resolution, t.sd.vae.config.in_channels)
            terms["diff"] = self.diffusion(t.sd, x_sd, context, t.negatives_for(d[index]), generator)
            loss = loss + p.beta * terms["diff"]
        terms["loss"] = loss
        return terms
