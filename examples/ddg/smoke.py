"""The smoke preset's fixtures: the paper's models with random weights and a generated PACS, written once under
``<out>/smoke_assets/`` (deterministic from a fixed seed, reused when present) in the layouts a user's real
weights and data have, so the smoke run loads them through the same code as a DomainBed run:

* ``data/PACS/<environment>/<class>/<i>.png``: DomainBed's PACS layout, 4 environments x 7 classes, a few small
  images each (a class is a shape, an environment a rendering style);
* ``clip-vit-large-patch14/``: a transformers CLIPModel folder (config, safetensors, tokenizer) of CLIP ViT-L/14,
  the teacher (examples/common/paper_configs/clip.py; one layer per tower, images of ``IMAGE_SIZE``);
* ``clip-vit-base-patch16/``: the same for CLIP ViT-B/16, the student backbone;
* ``stable-diffusion-v1-4/``: a diffusers folder (unet/ vae/ scheduler/ text_encoder/ tokenizer/) of SD v1.4
  (examples/common/paper_configs/sd_v1_4.py: two UNet and two VAE levels, one layer per block, one
  text-encoder layer).

Tokenizers are word-level CLIPTokenizers over the prompts' words (examples/common/tiny_text.py): the real
classes with a small vocabulary; the text encoders keep CLIP's widths and heads.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict

import torch

from ..common.domainbed import DOMAINBED_FOLDERS
from ..common.paper_configs import clip as clip_configs
from ..common.paper_configs import sd_v1_4
from ..common.tiny_text import build_word_tokenizer
from .presets import DOMAIN_PROMPTS

SEED = 0
IMAGE_SIZE = 112            # a multiple of both patch sizes (14, 16); CLIP's 224 costs 4x the tokens
IMAGES_PER_CLASS = 3
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
VERSION = 2                 # bump when the fixtures change: older asset folders are rebuilt


def asset_paths(root: Path) -> Dict[str, Path]:
    root = Path(root)
    return {"data_root": root / "data", "clip_model": root / "clip-vit-large-patch14",
            "student_model": root / "clip-vit-base-patch16", "pretrained_model": root / "stable-diffusion-v1-4"}


def build_smoke_assets(root: Path) -> Dict[str, Path]:
    """Write the fixtures under ``root`` unless a complete set of this version is there; returns their paths."""
    root = Path(root)
    stamp = {"version": VERSION, "seed": SEED, "image_size": IMAGE_SIZE}
    if (root / "assets.json").is_file() and json.loads((root / "assets.json").read_text()) == stamp:
        return asset_paths(root)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    paths = asset_paths(tmp)
    torch.manual_seed(SEED)
    _write_pacs(paths["data_root"])
    words = _prompt_words()
    for key, name in (("clip_model", "ViT-L/14"), ("student_model", "ViT-B/16")):
        _write_clip(paths[key], name, words)
    _write_sd(paths["pretrained_model"], words)
    (tmp / "assets.json").write_text(json.dumps(stamp))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return asset_paths(root)


def _prompt_words():
    prompts = list(DOMAIN_PROMPTS["PACS"].values()) + [f"a photo of a {c}" for c in PACS_CLASSES]
    return sorted({w for p in prompts for w in p.split()})


def _write_pacs(data_root: Path) -> None:
    """Class k: a filled disc, square or bar at a class-specific place; environment e: its colours, background
    texture and stroke style. Sizes vary (DomainBed's images are not square)."""
    from PIL import Image

    folder, envs = DOMAINBED_FOLDERS["PACS"]
    g = torch.Generator().manual_seed(SEED)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 40), indexing="ij")
    for e, env in enumerate(envs):
        for k, cls in enumerate(PACS_CLASSES):
            directory = data_root / folder / env / cls
            directory.mkdir(parents=True, exist_ok=True)
            cx, cy = 0.6 * torch.cos(torch.tensor(k * 0.9)), 0.6 * torch.sin(torch.tensor(k * 0.9))
            shape = ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.12 + 0.03 * k).float()
            for i in range(IMAGES_PER_CLASS):
                noise = torch.rand(3, 48, 40, generator=g)
                colour = torch.tensor([(e + 1) % 2, (e // 2) % 2, 0.5]).view(3, 1, 1)
                image = 0.25 * noise * (e + 1) / 4 + 0.75 * shape * colour + 0.1 * i
                pixels = (image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(directory / f"{i}.png")


def _tokenizer(directory: Path, words):
    return build_word_tokenizer(words, directory, max_length=sd_v1_4.TOKENIZER_MAX_LENGTH)


def _write_clip(directory: Path, name: str, words) -> None:
    from transformers import CLIPModel

    tokenizer = _tokenizer(directory / "_vocab", words)
    config = clip_configs.smoke_clip_config(name, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                            tokenizer.pad_token_id, image_size=IMAGE_SIZE)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    shutil.rmtree(directory / "_vocab")


def _write_sd(directory: Path, words) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ddg_models import StableDiffusionTeacher

    tokenizer = _tokenizer(directory / "_vocab", words)
    text = CLIPTextModel(CLIPTextConfig(**sd_v1_4.smoke_text_encoder(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)))
    scheduler = PNDMScheduler.from_config({k: v for k, v in sd_v1_4.SCHEDULER.items() if k != "_class_name"})
    teacher = StableDiffusionTeacher(AutoencoderKL(**sd_v1_4.smoke_vae()),
                                     UNet2DConditionModel(**sd_v1_4.smoke_unet()), scheduler, text, tokenizer)
    teacher.save_pretrained(directory)
    shutil.rmtree(directory / "_vocab")
