"""Diffusion components, preprocessing and the DAG sampler of a preset. Nothing is downloaded: Stable
Diffusion comes from a local diffusers directory (``--pretrained-model``), the teacher from a local checkpoint.

Under mixed precision the frozen UNet and VAE hold their weights in the half dtype (as diffusers' training
scripts do); the text encoder stays fp32 (CAT trains its embedding rows) and so does the classifier (its BN
statistics are the guidance). The latents and the DAG update are fp32 throughout: ``GuidedTeacher`` and
``VAECodec`` cast at their boundaries."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from torch import nn

from ddg_losses import BNGuidanceLoss
from ddg_models import (ClassifierPreprocess, DAGSampler, GuidedTeacher, PromptEncoder, VAECodec,
                        set_attention_backend)

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


HALF = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_stable_diffusion(path, scheduler: str = "pndm", mixed_precision: str = "no") -> Dict[str, object]:
    """unet, vae, text_encoder, tokenizer and the scheduler ('pndm': the pipeline's PNDM as the DDIS code;
    'ddim': DDIM from the same scheduler config) from a local diffusers model directory."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path) if path else None
    if root is None or not root.is_dir():
        raise FileNotFoundError(f"--pretrained-model must be a local diffusers directory (e.g. a snapshot of "
                                f"stabilityai/stable-diffusion-2-1-base), got {path!r}")
    missing = [p for p in SD_PARTS if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} lacks the subfolders {missing} of a diffusers Stable Diffusion model")
    if mixed_precision not in HALF:
        raise ValueError(f"load_stable_diffusion: 'mixed_precision' must be one of {sorted(HALF)}, got "
                         f"{mixed_precision!r}")
    half = {} if HALF[mixed_precision] is None else {"torch_dtype": HALF[mixed_precision]}
    schedulers = {"pndm": PNDMScheduler, "ddim": DDIMScheduler}
    if scheduler not in schedulers:
        raise ValueError(f"scheduler must be one of {sorted(schedulers)}, got {scheduler!r}")
    parts = dict(unet=UNet2DConditionModel.from_pretrained(root / "unet", **half),
                 vae=AutoencoderKL.from_pretrained(root / "vae", **half),
                 text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
                 tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
                 scheduler=schedulers[scheduler].from_pretrained(root / "scheduler"))
    for name in ("unet", "vae", "text_encoder"):
        parts[name].requires_grad_(False).eval()
    return parts


def preprocess_of(kind: str, size: int) -> nn.Module:
    """'ddis_code' (nearest resize, no normalisation), 'imagenet' (antialiased bilinear + ImageNet mean/std)
    or 'none' (clamp to [0, 1] only: a classifier trained on the decoded resolution and range)."""
    if kind == "ddis_code":
        return ClassifierPreprocess.ddis_code(size)
    if kind == "imagenet":
        return ClassifierPreprocess.imagenet(size)
    if kind == "none":
        return ClassifierPreprocess()
    raise ValueError(f"preprocess must be 'ddis_code', 'imagenet' or 'none', got {kind!r}")


def build_sampler(preset, parts: Dict[str, object], classifier: nn.Module, scheduler,
                  attention_backend: str = "sdpa") -> DAGSampler:
    """The preset's DAG sampler: the SD UNet as a guided teacher (on the chosen attention backend), its VAE codec
    and prompt encoder, and the BN-statistics loss of ``classifier`` as the guidance loss."""
    set_attention_backend(parts["unet"], attention_backend)
    teacher = GuidedTeacher(parts["unet"], scheduler.config.prediction_type, preset.guidance_scale)
    loss = BNGuidanceLoss(classifier, preprocess_of(preset.dag_preprocess, preset.classifier_size),
                          form=preset.bn_form, first_bn_multiplier=preset.first_bn_multiplier, batch=preset.bn_batch)
    return DAGSampler(teacher, VAECodec(parts["vae"]), scheduler, loss,
                      prompt_encoder=PromptEncoder.clip(parts["tokenizer"], parts["text_encoder"]), eta=preset.eta,
                      guide_target=preset.guide_target)


