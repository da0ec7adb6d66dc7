"""The tiny CPU experiment (RotatedDigits): its teachers, trained briefly on source domains only.

``train_tiny_teachers`` builds and trains a tiny CLIP (CLIPModel from configs, the class-prompt image->text
cross-entropy), a tiny AutoencoderKL (reconstruction + KL) and a tiny UNet2DConditionModel (SD's epsilon loss
under the DDPM schedule, on captions "a <domain> photo of a <class>" with the class, the domain or both dropped at
random, so that the class prompts, the domain prompts and the empty prompt are all in the teacher's distribution);
the latent-diffusion part goes through examples/common/tiny_latent_diffusion.py. They are saved in the
transformers / diffusers folder layouts and loaded back through ``teachers.load_teachers``, the path of the real
checkpoints. The rest of the tiny run is the DomainBed pipeline (pipeline.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

import torch
import torch.nn.functional as F

from ddg_models import PromptEncoder, StableDiffusionTeacher

from ..common import tiny_latent_diffusion
from ..common.domainbed import source_environments
from ..common.tiny_text import build_word_tokenizer, tiny_text_encoder
from .data import Environments
from .presets import Preset


def teacher_sources(per_run: bool, n_envs: int, test_envs: Sequence[int], test_env: int) -> List[int]:
    """The tiny teachers' domains: the run's sources (``per_run``), or (shared) the domains no run tests on."""
    if per_run:
        return source_environments(n_envs, [test_env])
    return source_environments(n_envs, test_envs)


def _tiny_words(envs: Environments) -> List[str]:
    return ["a", "photo", "of", *envs.class_names, *envs.names]


def _caption(envs: Environments, y: int, d: int, keep_class: bool, keep_domain: bool) -> str:
    if keep_class and keep_domain:
        return f"a {envs.names[d]} photo of a {envs.class_names[y]}"
    if keep_class:
        return f"a photo of a {envs.class_names[y]}"
    return f"a {envs.names[d]} photo" if keep_domain else ""


def _source_tensors(envs: Environments, sources: Sequence[int]):
    xs = [envs.splits[d].train_in.x for d in sources]
    ys = [envs.splits[d].train_in.y for d in sources]
    ds = [torch.full((len(y),), d) for d, y in zip(sources, ys)]
    return torch.cat(xs), torch.cat(ys), torch.cat(ds)


def _train_clip(clip, class_ids, x, y, steps: int, g: torch.Generator, quiet: bool) -> float:
    """Image -> class-prompt cross-entropy (CLIP's image-side loss over the C prompts), AdamW lr 3e-3."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(clip.parameters(), lr=3e-3, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="tiny CLIP", disable=quiet, leave=False)
    for _ in bar:
        idx = torch.randint(len(y), (128,), generator=g)
        loss = F.cross_entropy(clip(input_ids=class_ids, pixel_values=x[idx]).logits_per_image, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss.item()


def train_tiny_teachers(p: Preset, envs: Environments, sources: Sequence[int], directory: Path, seed: int,
                        quiet: bool = False) -> dict:
    """Train (or reuse, when ``directory`` holds them) the tiny CLIP and SD teachers on ``sources``; returns
    the CLIP's final training loss (the VAE and UNet trainers show theirs in their progress bars). Writes
    ``directory/clip`` and ``directory/sd``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionConfig

    directory = Path(directory)
    done = directory / "teachers.json"
    if done.is_file():
        return json.loads(done.read_text())
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y, d = _source_tensors(envs, sources)
    clip_steps, vae_steps, unet_steps = p.teacher_steps
    tokenizer = build_word_tokenizer(_tiny_words(envs), directory / "tokenizer", max_length=16)
    text = tiny_text_encoder(tokenizer)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=p.image_size, patch_size=4, num_channels=p.image_channels, projection_dim=32)
    clip = CLIPModel(CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.to_dict(), projection_dim=32))
    class_ids = tokenizer([p.class_template.format(c) for c in envs.class_names], padding="max_length",
                          return_tensors="pt").input_ids
    losses = {"clip": _train_clip(clip, class_ids, x, y, clip_steps, g, quiet)}
    clip.save_pretrained(directory / "clip")
    tokenizer.save_pretrained(directory / "clip")

    sd_x = x * torch.tensor(p.std).view(1, -1, 1, 1) + torch.tensor(p.mean).view(1, -1, 1, 1)
    sd_x = sd_x * 2 - 1
    vae = AutoencoderKL(in_channels=p.image_channels, out_channels=p.image_channels,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=p.image_size, mid_block_add_attention=False)
    # SD's latent scaling: unit variance of the posterior means (SD v1: 0.18215)
    vae = tiny_latent_diffusion.train_vae(vae, sd_x, vae_steps, 64, g, lr=2e-3, kl_weight=1e-5, l1_weight=0.0,
                                          quiet=quiet)
    vae.requires_grad_(False).eval()
    # SD's text encoder = the (frozen) CLIP text tower, as SD v1 uses CLIP ViT-L/14's.
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    text.requires_grad_(False).eval()
    # Cross-attention only at the 4x4 level and no mid block: CPU-sized, still text-conditioned like SD's UNet.
    unet = UNet2DConditionModel(sample_size=p.image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type=None,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon")
    with torch.no_grad():
        z0 = torch.cat([vae.encode(sd_x[i:i + 512]).latent_dist.mean for i in range(0, len(y), 512)])
        z0 = z0 * vae.config.scaling_factor
        # Condition dropout for the CFG branches: 10% empty, 20% class only, 20% domain only, 50% both.
        u = torch.rand(len(y), generator=g).tolist()
        captions = [_caption(envs, int(yi), int(di), keep_class=not (ui < 0.1 or 0.3 <= ui < 0.5),
                             keep_domain=ui >= 0.3) for yi, di, ui in zip(y, d, u)]
        prompts = PromptEncoder.clip(tokenizer, text)
        ids = prompts.token_ids(captions)
        context = torch.cat([prompts.encode_ids(ids[i:i + 512])["encoder_hidden_states"]
                             for i in range(0, len(y), 512)])
    unet = tiny_latent_diffusion.train_text_unet(unet, z0, scheduler, unet_steps, 32, g,
                                                 lambda idx: {"encoder_hidden_states": context[idx]}, lr=2e-3,
                                                 quiet=quiet)
    StableDiffusionTeacher(vae, unet, scheduler, text, tokenizer).save_pretrained(directory / "sd")
    done.write_text(json.dumps(losses))
    return losses
