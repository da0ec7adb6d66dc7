"""The ``tiny`` preset's world, built on CPU from scikit-learn's digits: a BN teacher trained on the real
digits (upsampled to 16x16), and a text-conditioned latent diffusion prior (a diffusers AutoencoderKL and
UNet2DConditionModel, a tiny CLIP tokenizer / text encoder) trained briefly on an *other* digit domain
(rotated, thickened strokes). The prior is a real prior of digit shapes but off the teacher's domain: that
is what DAG (pull the BN statistics toward the teacher's) and CAT (pull the class evidence) have to fix.

Every trained piece is cached under ``<out>/world`` (diffusers / transformers ``save_pretrained`` layouts and
state dicts), so a second run, or a resumed one, loads instead of retraining.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ddg_models import PromptEncoder

from ..common import tiny_latent_diffusion
from ..common.digits import DIGIT_NAMES, digits_split
from ..common.tiny_text import build_word_tokenizer, tiny_text_encoder

SIZE = 16  # digits are upsampled 8 -> 16 so that the VAE has a latent grid (8x8) worth denoising
# Words that carry no information about the image: the prior also sees "a {word} {class name}", so its text
# encoder learns that the slot before the class name holds a modifier -- the slot the class token takes.
FILLER_WORDS = ("small", "large", "neat", "plain", "bold", "thin")


class TinyBNNet(nn.Module):
    """conv3x3-BN-ReLU stages with stride-2 downsampling on 1x16x16 digits, global average pool, Linear."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        layers, c = [], 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def real_digits(limit=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) at 1x16x16 in [0, 1]: the teacher's domain."""
    x_tr, y_tr, x_te, y_te = digits_split(limit=limit)
    up = lambda x: F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False).clamp(0, 1)  # noqa: E731
    return up(x_tr), y_tr, up(x_te), y_te


def shifted_domain(x: torch.Tensor, angle_deg: float, thicken: int = 1,
                   intensity: Tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """The prior's domain: every digit rotated by ``angle_deg``, its strokes dilated (max filter of size
    ``thicken``, 1 = none) and its [0, 1] range mapped to ``intensity`` (e.g. grey strokes on a grey
    background): shapes stay digits while orientation and intensity statistics move off the teacher's data."""
    a = math.radians(angle_deg)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if thicken % 2 != 1:
        raise ValueError(f"shifted_domain: 'thicken' must be an odd kernel size (1 = none), got {thicken}")
    if thicken > 1:
        x = F.max_pool2d(x, thicken, stride=1, padding=thicken // 2)
    lo, hi = intensity
    return lo + (hi - lo) * x.clamp(0, 1)


@dataclass(frozen=True)
class TinyWorldConfig:
    angle_deg: float = 20.0
    thicken: int = 1
    intensity: Tuple[float, float] = (0.1, 0.9)
    teacher_widths: Tuple[int, ...] = (16, 32, 64)
    student_widths: Tuple[int, ...] = (8, 16, 32)
    teacher_epochs: int = 15
    vae_steps: int = 200
    unet_steps: int = 700
    batch_size: int = 64
    text_hidden: int = 32
    cond_drop_prob: float = 0.15


def vae_config() -> dict:
    return dict(in_channels=1, out_channels=1, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=SIZE)


def unet_config(cross_attention_dim: int) -> dict:
    # Cross-attention at the 4x4 level only: on CPU attention over 64 tokens costs more than the convolutions.
    return dict(sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
                attention_head_dim=8, norm_num_groups=16)


def scheduler_config() -> dict:
    # Stable Diffusion's betas; 'trailing' spacing so the last step (the CAT's only gradient path) starts at
    # t = T/n - 1 rather than t = 1, where the step barely depends on the model output.
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int,
                     generator: torch.Generator, lr: float = 3e-3, quiet: bool = False) -> nn.Module:
    """Cross-entropy training with +-1 pixel shifts; returns the model in eval mode."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(epochs), desc="tiny world: teacher epochs", disable=quiet, leave=False):
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-1, 2, (2,), generator=generator).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100.0


def train_vae(vae, x: torch.Tensor, steps: int, batch_size: int, generator: torch.Generator, kl_weight=1e-4,
              quiet: bool = False):
    """Reconstruction (L1 + MSE) + a small KL on ``x`` in [0, 1]; afterwards ``scaling_factor`` = 1 / std of the
    latents, the way Stable Diffusion's 0.18215 was chosen (examples/common/tiny_latent_diffusion.py)."""
    return tiny_latent_diffusion.train_vae(vae, x * 2 - 1, steps, batch_size, generator, lr=2e-3,
                                           kl_weight=kl_weight, l1_weight=1.0, desc="tiny world VAE",
                                           quiet=quiet)


def train_unet(unet, vae, text_encoder, tokenizer, x: torch.Tensor, y: torch.Tensor, scheduler, steps: int,
               batch_size: int, cond_drop_prob: float, generator: torch.Generator, quiet: bool = False):
    """Epsilon-prediction training on VAE latents, prompt "a {class name}" or "a {filler word} {class name}",
    dropped to "" with ``cond_drop_prob`` (what classifier-free guidance needs); the text encoder trains along
    (examples/common/tiny_latent_diffusion.py)."""
    with torch.no_grad():
        latents = vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        variants = [""] + [w + " " for w in FILLER_WORDS]
        prompts = [f"a {v}{n}" for n in DIGIT_NAMES for v in variants] + [""]
        encoder = PromptEncoder.clip(tokenizer, text_encoder)
        ids = encoder.token_ids(prompts)

    def condition(idx: torch.Tensor):
        prompt = y[idx] * len(variants) + torch.randint(0, len(variants), (len(idx),), generator=generator)
        prompt = torch.where(torch.rand(len(idx), generator=generator) < cond_drop_prob, len(prompts) - 1, prompt)
        return encoder.encode_ids(ids[prompt])

    text_encoder.train()
    unet = tiny_latent_diffusion.train_text_unet(
        unet, latents, scheduler, steps, batch_size, generator, condition, lr=2e-3, weight_decay=1e-2,
        extra_params=text_encoder.parameters(), one_cycle_pct_start=0.1, clip_grad_norm=1.0,
        desc="tiny world UNet", quiet=quiet)
    text_encoder.eval()
    return unet, text_encoder


def build_tiny_world(out: Path, config: TinyWorldConfig, seed: int = 0, log=print, quiet: bool = False):
    """Teacher, prior (vae, unet, text encoder, tokenizer), scheduler config; trained once and cached."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextModel, CLIPTokenizer

    world = Path(out) / "world"
    stamp = json.dumps({"config": asdict(config), "seed": seed})
    if (world / "world.json").is_file() and (world / "world.json").read_text() != stamp:
        log(f"tiny world: {world} was built with other settings; rebuilding")
        shutil.rmtree(world)
    x_tr, y_tr, x_te, y_te = real_digits()
    teacher_path = world / "teacher.pt"
    teacher = TinyBNNet(config.teacher_widths)
    if teacher_path.is_file():
        teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
        teacher.eval()
    else:
        torch.manual_seed(seed)
        teacher = train_classifier(TinyBNNet(config.teacher_widths), x_tr, y_tr, config.teacher_epochs,
                                   config.batch_size, torch.Generator().manual_seed(seed), quiet=quiet)
        world.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), teacher_path)
    x_prior = shifted_domain(x_tr, config.angle_deg, config.thicken, config.intensity)
    if (world / "unet" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(world / "vae").eval()
        unet = UNet2DConditionModel.from_pretrained(world / "unet").eval()
        tokenizer = CLIPTokenizer.from_pretrained(world / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(world / "text_encoder").eval()
    else:
        # Own generator and global seed: the prior is the same whether the teacher was trained now or loaded.
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        tokenizer = build_word_tokenizer(("a",) + DIGIT_NAMES + FILLER_WORDS, world / "tokenizer")
        text_encoder = tiny_text_encoder(tokenizer, hidden_size=config.text_hidden)
        vae, unet = AutoencoderKL(**vae_config()), UNet2DConditionModel(**unet_config(config.text_hidden))
        for part in (vae, unet):
            part.set_attn_processor(AttnProcessor())
        log(f"tiny world: training the VAE ({config.vae_steps} steps) on the shifted domain")
        vae = train_vae(vae, x_prior, config.vae_steps, config.batch_size, g)
        log(f"tiny world: training the UNet + text encoder ({config.unet_steps} steps)")
        unet, text_encoder = train_unet(unet, vae, text_encoder,
                                        tokenizer, x_prior, y_tr, DDIMScheduler(**scheduler_config()),
                                        config.unet_steps, config.batch_size, config.cond_drop_prob, g)
        for name, part in (("vae", vae), ("unet", unet), ("tokenizer", tokenizer), ("text_encoder", text_encoder)):
            part.save_pretrained(world / name)
        (world / "world.json").write_text(stamp)
    for part in (vae, unet):
        # The classic attention: on CPU, SDPA's flash kernel is slower than bmm + softmax at these sizes.
        part.set_attn_processor(AttnProcessor())
    for part in (vae, unet, text_encoder):
        part.requires_grad_(False)
    teacher.requires_grad_(False)
    return dict(teacher=teacher, vae=vae, unet=unet, tokenizer=tokenizer, text_encoder=text_encoder,
                real=(x_tr, y_tr, x_te, y_te), prior_data=x_prior)

