"""The ``smoke`` preset's local assets: an SD3.5-Medium pipeline folder from the released architecture configs
(depth cut; examples/common/paper_configs/sd3_5_medium.py), a DINOv2-base diversity model (one block), and
prompt files, all with random weights from a fixed seed, written under ``<out>/smoke_assets/`` and reused.

The pipeline folder is what ``StableDiffusion3Pipeline.save_pretrained`` writes for the release (model_index.json,
transformer/, vae/, text_encoder{,_2}/, tokenizer{,_2}/, scheduler/; no text_encoder_3/: T5 is left out, see
SMOKE_CUTS), in bf16 as the released weights are, so the run loads it through the same code as real weights.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..common.paper_configs import dinov2, sd3_5_medium as sd35
from ..common.tiny_text import build_word_tokenizer

SEED = 1234
WORDS = ("a", "photo", "of", "red", "blue", "green", "cat", "dog", "bird", "house", "tree", "car", "on", "the",
         "beach", "street", "painting", "small", "large", "at", "night", "in", "snow")
PROMPTS = ("a photo of a red cat", "a painting of a blue house", "a green tree on the beach",
           "a small dog on the street", "a large bird in the snow", "a photo of a car at night",
           "a blue bird on a tree", "a painting of a red car")
EVAL_PROMPTS = ("a photo of a dog", "a painting of a tree at night")


@dataclass(frozen=True)
class SmokeAssets:
    model: Path            # StableDiffusion3Pipeline folder
    prompts: Path
    eval_prompts: Path
    diversity_model: Path  # Dinov2Model folder with its image processor


def assets_in(root: Path) -> SmokeAssets:
    root = Path(root)
    return SmokeAssets(root / "sd3_5_medium", root / "prompts.txt", root / "eval_prompts.txt", root / "dinov2_base")


def build_smoke_assets(out: Path, accelerator=None) -> SmokeAssets:
    """``<out>/smoke_assets/`` (built by the main process, reused when complete); every process waits for it."""
    root = Path(out) / "smoke_assets"
    assets = assets_in(root)
    is_main = accelerator is None or accelerator.is_main_process
    if is_main and not (root / "complete").is_file():
        _build(root)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return assets


def _build(root: Path) -> None:
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    assets = assets_in(tmp)
    build_sd3_5_medium(assets.model)
    build_dinov2(assets.diversity_model)
    assets.prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    assets.eval_prompts.write_text("\n".join(EVAL_PROMPTS) + "\n", encoding="utf-8")
    (tmp / "complete").write_text("")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)


def _cut(prefix: str, config: dict) -> dict:
    cuts = {k.split(".", 1)[1]: v for k, v in sd35.SMOKE_CUTS.items() if k.startswith(prefix + ".")}
    return {**config, **cuts}


def _clip_text(config: dict, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = {**_cut("clip", config), "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return CLIPTextModelWithProjection(CLIPTextConfig(**config))


def build_sd3_5_medium(directory: Path) -> Path:
    """The SD3.5-Medium pipeline folder with the SMOKE_CUTS applied, random weights, bf16."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as vocab:  # the pipeline's save_pretrained keeps its own copy
        tokenizer = build_word_tokenizer(WORDS, Path(vocab), max_length=sd35.CLIP_L["max_position_embeddings"])
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**_cut("transformer", sd35.TRANSFORMER)),
        scheduler=FlowMatchEulerDiscreteScheduler(**sd35.SCHEDULER),
        vae=AutoencoderKL(**_cut("vae", sd35.VAE)),
        text_encoder=_clip_text(sd35.CLIP_L, tokenizer), tokenizer=tokenizer,
        text_encoder_2=_clip_text(sd35.CLIP_G, tokenizer), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.bfloat16).save_pretrained(directory)
    return Path(directory)


def build_dinov2(directory: Path) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(SEED + 1)
    Dinov2Model(Dinov2Config(**{**dinov2.MODEL, **dinov2.SMOKE_CUTS})).save_pretrained(directory)
    BitImageProcessor(**dinov2.PROCESSOR).save_pretrained(directory)
    return Path(directory)
