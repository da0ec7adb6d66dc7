"""The frozen teachers of a DDG run, and the tiny preset's teachers trained on the run's source domains.

``Teachers`` holds the CLIP teacher (image embeddings v for the alignment loss, class text embeddings for the
zero-shot head) and the Stable Diffusion teacher with the precomputed SD prompt encodings (one per class for
conditioning A, the CFG negatives). It is a plain object, never part of the student's module tree.

For the tiny preset, ``train_tiny_teachers`` builds and briefly trains, on the source domains only:
a tiny CLIP (CLIPModel from configs, the class-prompt image->text cross-entropy), a tiny AutoencoderKL
(reconstruction + KL) and a tiny UNet2DConditionModel (SD's epsilon loss under the DDPM schedule, on captions
"a <domain> photo of a <class>" with the class, the domain or both dropped at random, so that the class prompts,
the domain prompts and the empty prompt are all in the teacher's distribution). They are saved in the
transformers / diffusers folder layouts and loaded back through the same path as the real checkpoints.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ddg_models import (PromptEncoder, StableDiffusionTeacher, VAECodec, encode_class_prompts,
                        set_attention_backend)

from ..common.tiny_text import build_word_tokenizer, tiny_text_encoder
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


def load_teachers(p: Preset, envs: Environments, clip_dir, sd_dir, device, attention_backend: str = "sdpa") -> Teachers:
    """Load the CLIP folder (a transformers CLIPModel with its tokenizer) and the SD folder, frozen."""
    from transformers import CLIPModel, CLIPTokenizer

    for flag, path in (("--clip-dir", clip_dir), ("--sd-dir", sd_dir)):
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path}: not a directory (local CLIP / Stable Diffusion weights; "
                                    "nothing is downloaded)")
    clip = CLIPModel.from_pretrained(str(clip_dir)).to(device).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir))
    sd = StableDiffusionTeacher.from_pretrained(sd_dir, device=device)
    set_attention_backend(sd.unet, attention_backend)
    if p.sd_gradient_checkpointing:
        sd.enable_gradient_checkpointing()
    class_text = encode_class_prompts(clip, tokenizer, envs.class_names, p.class_template)
    sd_prompts = sd.encode_prompts([p.class_template.format(c.replace("_", " ")) for c in envs.class_names])
    negatives = sd.encode_prompts([""] if p.negative == "empty" else envs.domain_prompts)
    stats = {}
    if p.clip_mean is not None:
        view = lambda v: torch.tensor(v, device=device).view(1, -1, 1, 1)  # noqa: E731
        stats = dict(clip_mean=view(p.clip_mean), clip_std=view(p.clip_std), mean=view(p.mean), std=view(p.std))
    return Teachers(clip, sd, class_text.to(device), min(float(clip.logit_scale.exp()), 100.0), sd_prompts,
                    negatives, Path(clip_dir), **stats)


# ------------------------------------------------------------------------------------------- tiny teachers

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


def _train(steps: int, params, loss_fn, n: int, batch: int, g: torch.Generator, lr: float, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False)
    for _ in bar:
        loss = loss_fn(torch.randint(n, (batch,), generator=g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss.item()


def train_tiny_teachers(p: Preset, envs: Environments, sources: Sequence[int], directory: Path, seed: int,
                        quiet: bool = False) -> dict:
    """Train (or reuse, when ``directory`` holds them) the tiny CLIP and SD teachers on ``sources``; returns
    their final training losses. Writes ``directory/clip`` and ``directory/sd``."""
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

    def clip_loss(idx):  # image -> class-prompt cross-entropy (CLIP's image-side loss over the C prompts)
        return F.cross_entropy(clip(input_ids=class_ids, pixel_values=x[idx]).logits_per_image, y[idx])

    losses = {"clip": _train(clip_steps, clip.parameters(), clip_loss, len(y), 128, g, 3e-3, "tiny CLIP", quiet)}
    clip.save_pretrained(directory / "clip")
    tokenizer.save_pretrained(directory / "clip")

    sd_x = x * torch.tensor(p.std).view(1, -1, 1, 1) + torch.tensor(p.mean).view(1, -1, 1, 1)
    sd_x = sd_x * 2 - 1
    vae = AutoencoderKL(in_channels=p.image_channels, out_channels=p.image_channels,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=p.image_size, mid_block_add_attention=False)

    codec = VAECodec(vae)

    def vae_loss(idx):
        recon, posterior = codec.reconstruct(sd_x[idx], generator=g)
        return F.mse_loss(recon, sd_x[idx]) + 1e-5 * posterior.kl().mean()

    losses["vae"] = _train(vae_steps, vae.parameters(), vae_loss, len(y), 64, g, 2e-3, "tiny VAE", quiet)
    with torch.no_grad():  # SD's latent scaling: unit variance of the posterior means (SD v1: 0.18215)
        std = vae.encode(sd_x[:512]).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
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

    def unet_loss(idx):
        noise = torch.randn(z0[idx].shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        pred = unet(scheduler.add_noise(z0[idx], noise, t), t, encoder_hidden_states=context[idx]).sample
        return F.mse_loss(pred, noise)

    losses["unet"] = _train(unet_steps, unet.parameters(), unet_loss, len(y), 32, g, 2e-3, "tiny UNet", quiet)
    StableDiffusionTeacher(vae, unet, scheduler, text, tokenizer).save_pretrained(directory / "sd")
    done.write_text(json.dumps(losses))
    return losses


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
