"""The frozen teachers of a DDG run, loaded from local folders (a transformers CLIP folder, a diffusers Stable
Diffusion folder): the paper's weights, the smoke preset's generated ones and the tiny preset's trained ones all
take this path.

``Teachers`` holds the CLIP teacher (image embeddings v for the alignment loss, class text embeddings for the
zero-shot head) and the Stable Diffusion teacher with the precomputed SD prompt encodings (one per class for
conditioning A, the CFG negatives). It is a plain object, never part of the student's module tree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ddg_models import StableDiffusionTeacher, encode_class_prompts, set_attention_backend

from .data import Environments
from .presets import Preset


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; earlier versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class Teachers:
    clip: object                      # transformers CLIPModel, frozen
    sd: StableDiffusionTeacher
    class_text: torch.Tensor          # [C, d_clip] normalised CLIP text embeddings of the class prompts
    logit_scale: float                # CLIP's exp(logit_scale), at most 100
    sd_class_prompts: torch.Tensor    # [C, L, D] SD text-encoder states of the class prompts (conditioning A)
    sd_negatives: torch.Tensor        # [1, L, D] (empty prompt) or [num_envs, L, D] (domain prompts)
    clip_dir: Path
    clip_mean: Optional[torch.Tensor] = None  # renormalisation of the student's input for CLIP
    clip_std: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None

    @torch.no_grad()
    def image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """v = CLIP image embedding of a normalised student batch (renormalised to CLIP's statistics)."""
        if self.clip_mean is not None:
            x = ((x * self.std + self.mean) - self.clip_mean) / self.clip_std
        return F.normalize(_features(self.clip.get_image_features(pixel_values=x)).float(), dim=-1)

    def negatives_for(self, domains: torch.Tensor) -> torch.Tensor:
        """The CFG negative context of each sample: [1, L, D] (shared) or [B, L, D] (its own domain)."""
        return self.sd_negatives if self.sd_negatives.shape[0] == 1 else self.sd_negatives[domains]


def load_teachers(p: Preset, envs: Environments, clip_dir, sd_dir, device, attention_backend: str = "sdpa",
                  sd_dtype: Optional[torch.dtype] = None) -> Teachers:
    """Load the CLIP folder (a transformers CLIPModel with its tokenizer) and the SD folder, frozen. ``sd_dtype``:
    the SD teacher's weights (bf16/fp16 under mixed precision); its latents, prompt encodings and the denoising
    loss stay fp32 (the teacher casts at its boundary)."""
    from transformers import CLIPModel, CLIPTokenizer

    for flag, path in (("--clip-model", clip_dir), ("--pretrained-model", sd_dir)):
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path}: not a directory (local CLIP / Stable Diffusion weights; "
                                    "nothing is downloaded)")
    clip = CLIPModel.from_pretrained(str(clip_dir)).to(device).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir))
    sd = StableDiffusionTeacher.from_pretrained(sd_dir, torch_dtype=sd_dtype, device=device)
    set_attention_backend(sd.unet, attention_backend)
    if p.sd_gradient_checkpointing:
        sd.enable_gradient_checkpointing()
    class_text = encode_class_prompts(clip, tokenizer, envs.class_names, p.class_template)
    sd_prompts = sd.encode_prompts([p.sd_class_template.format(c.replace("_", " ")) for c in envs.class_names])
    negatives = sd.encode_prompts([""] if p.negative == "empty" else envs.domain_prompts)
    stats = {}
    if p.clip_mean is not None:
        view = lambda v: torch.tensor(v, device=device).view(1, -1, 1, 1)  # noqa: E731
        stats = dict(clip_mean=view(p.clip_mean), clip_std=view(p.clip_std), mean=view(p.mean), std=view(p.std))
    return Teachers(clip, sd, class_text.to(device), min(float(clip.logit_scale.exp()), 100.0), sd_prompts,
                    negatives, Path(clip_dir), **stats)


@torch.no_grad()
def teacher_samples(teachers: Teachers, prompts: Sequence[str], steps: int = 15, guidance_scale: float = 3.0,
                    seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] the SD teacher generates for ``prompts`` (DDIM, CFG against the empty prompt): a check
    that the teacher has learned the source domains."""
    from diffusers import DDIMScheduler

    sd = teachers.sd
    cond = {"encoder_hidden_states": sd.encode_prompts(list(prompts))}
    uncond = {"encoder_hidden_states": sd.encode_prompts([""])}
    size = sd.unet.config.sample_size
    g = torch.Generator(sd.device).manual_seed(seed)
    latents = torch.randn(len(prompts), sd.unet.config.in_channels, size, size, generator=g, device=sd.device)
    latents = sd.teacher.sample(latents, cond, uncond, DDIMScheduler.from_config(sd.scheduler.config), steps,
                                scale=guidance_scale)
    return (sd.codec.decode(latents) + 1) / 2
