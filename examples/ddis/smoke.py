"""The files of the ``smoke`` preset, written under ``<out>/smoke_assets/`` in the layouts a user's real weights
and data have, and read by the same loaders:

* ``sd/``: a Stable Diffusion 2.1-base diffusers folder (``model_index.json``, unet/, vae/, text_encoder/,
  tokenizer/, scheduler/) of random weights from the real configs with depth cut
  (examples/common/paper_configs/sd_2_1_base.py: 2 UNet levels at 320/640 with 5/10 heads and 1024-wide
  cross-attention, the VAE's first 2 levels at 128/256, one 1024-wide 16-head text layer, the real PNDM
  config); the tokenizer is a word-level CLIPTokenizer built here (examples/common/tiny_text.py);
* ``teacher.pth``: a torchvision ResNet-34 state dict WITHOUT ``num_batches_tracked`` (as torchvision's older
  files), for ``ddg_models.load_classifier``;
* ``class_names.txt``: ImageNet-style lines (``name, synonym``), one per class;
* ``test/``: an ImageFolder of generated images (class c: a colour of its own plus noise), for ``--test-root``.

Everything is deterministic from a fixed seed and reused when ``done.json`` says it was built with the same
settings. Nothing is downloaded.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict

import torch

from ..common.paper_configs import sd_2_1_base
from ..common.tiny_text import build_word_tokenizer

SMOKE_SEED = 1234
CLASS_LINES = ("tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark, white shark",
               "tiger shark, Galeocerdo cuvieri", "hammerhead, hammerhead shark")
TEST_PER_CLASS = 4
LATENT_SIZE = 8  # 8x8 latents; the cut VAE (2 levels) decodes them to 16x16 images


def asset_paths(out: Path) -> Dict[str, Path]:
    root = Path(out) / "smoke_assets"
    return {"root": root, "pretrained_model": root / "sd", "teacher_ckpt": root / "teacher.pth",
            "class_names": root / "class_names.txt", "test_root": root / "test"}


def build_smoke_assets(out: Path, preset) -> Dict[str, Path]:
    """Write the assets of ``preset`` (its class count and teacher) under ``<out>/smoke_assets`` unless they are
    there; returns their paths. Call on the main process only."""
    paths = asset_paths(out)
    root = paths["root"]
    stamp = json.dumps({"seed": SMOKE_SEED, "classes": preset.num_classes, "teacher": preset.teacher,
                        "size": preset.classifier_size, "latent": LATENT_SIZE})
    done = root / "done.json"
    if done.is_file() and done.read_text() == stamp:
        return paths
    if preset.num_classes > len(CLASS_LINES):
        raise ValueError(f"build_smoke_assets: at most {len(CLASS_LINES)} classes, preset {preset.name} has "
                         f"{preset.num_classes}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    lines = CLASS_LINES[:preset.num_classes]
    paths["class_names"].write_text("".join(line + "\n" for line in lines))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SMOKE_SEED)
        _write_stable_diffusion(paths["pretrained_model"], [line.split(",")[0] for line in lines])
        _write_teacher(paths["teacher_ckpt"], preset.teacher, preset.num_classes)
        _write_test_set(paths["test_root"], [line.split(",")[0] for line in lines], preset.classifier_size)
    done.write_text(stamp)
    return paths


def _write_stable_diffusion(directory: Path, names) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    words = {"a"} | {w.lower() for n in names for w in n.split()}
    tokenizer = build_word_tokenizer(sorted(words), directory / "tokenizer_files",
                                     max_length=sd_2_1_base.TEXT_ENCODER["max_position_embeddings"])
    tokenizer.save_pretrained(directory / "tokenizer")
    shutil.rmtree(directory / "tokenizer_files")
    config = sd_2_1_base.smoke_text_encoder(vocab_size=len(tokenizer), text_layers=1)
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(directory / "text_encoder")
    unet = UNet2DConditionModel(**sd_2_1_base.smoke_unet(levels=2, sample_size=LATENT_SIZE))
    unet.save_pretrained(directory / "unet")
    AutoencoderKL(**sd_2_1_base.smoke_vae(levels=2, sample_size=2 * LATENT_SIZE)).save_pretrained(directory / "vae")
    PNDMScheduler.from_config(sd_2_1_base.SCHEDULER).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))


def _write_teacher(path: Path, name: str, num_classes: int) -> None:
    from ddg_models import build_classifier

    state = build_classifier(name, num_classes).state_dict()
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)


def _write_test_set(root: Path, names, size: int) -> None:
    from torchvision.utils import save_image

    palette = torch.rand(len(names), 3, 1, 1)
    for c, name in enumerate(names):
        for k in range(TEST_PER_CLASS):
            image = (0.7 * palette[c] + 0.3 * torch.rand(3, size, size)).clamp(0, 1)
            path = root / f"{c:04d}_{name.replace(' ', '_')}" / f"{k:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(image, path)
