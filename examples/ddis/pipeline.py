"""The GPU presets end to end: learn the class tokens (CAT), synthesize the dataset with DAG, distil the student.

Stages (``--stages``, default all three) share the run directory: ``cat/`` (tokens + state), ``images/``
(ImageFolder), ``kd/`` (checkpoints, kd.csv). Every stage resumes from what is on disk. CAT runs on the
main process (one class at a time, batch 1, as DDIS); synthesis and KD use every accelerate process.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from ddg_models import ClassAlignmentTokens, ClassifierPreprocess, build_classifier, load_classifier

from ..common.tables import write_json
from .cat import TOKENS, load_state, train_class_tokens
from .components import build_sampler, load_stable_diffusion, preprocess_of
from .distill import distill
from .synthesize import save_class_grids, synthesize

STAGES = ("tokens", "synthesize", "distill")


@dataclass
class FullRun:
    preset: object
    out: Path
    pretrained_model: Optional[str]
    teacher_ckpt: Optional[str]
    class_names_file: Optional[str] = None
    test_root: Optional[str] = None
    stages: Tuple[str, ...] = STAGES
    seed: int = 0
    resume: bool = False
    quiet: bool = False
    attention_backend: str = "sdpa"


def read_class_names(preset, path: Optional[str]) -> Sequence[str]:
    """The preset's names, else one per line of ``path`` (ImageNet: the first synonym of each line, in class
    index order, e.g. 'tench, Tinca tinca' -> 'tench')."""
    if preset.class_names is not None:
        return preset.class_names
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"preset {preset.name} needs --class-names: a text file with one class name per "
                                f"line in class-index order, got {path!r}")
    names = [line.split(",")[0].strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) != preset.num_classes:
        raise ValueError(f"--class-names {path}: {len(names)} names, preset {preset.name} has "
                         f"{preset.num_classes} classes")
    return names


def _image_transforms(size: int, train: bool):
    from torchvision import transforms as T

    imagenet = ClassifierPreprocess.imagenet()  # the statistics the teacher's checkpoint was trained with
    head = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if train
            else [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)])
    return T.Compose(head + [T.ToTensor(), T.Normalize(imagenet.mean.flatten().tolist(),
                                                        imagenet.std.flatten().tolist())])


def _loader(root: Path, size: int, train: bool, preset, seed: int):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    return DataLoader(ImageFolder(str(root), transform=_image_transforms(size, train)), batch_size=preset.kd_batch,
                      shuffle=train, num_workers=preset.num_workers, drop_last=train,
                      generator=torch.Generator().manual_seed(seed) if train else None)


def run_full(rc: FullRun, accelerator) -> dict:
    preset, out, device = rc.preset, Path(rc.out), accelerator.device
    names = read_class_names(preset, rc.class_names_file)
    if not rc.teacher_ckpt:
        raise FileNotFoundError(f"preset {preset.name} needs --teacher-ckpt (a local {preset.teacher} checkpoint)")
    teacher = load_classifier(preset.teacher, rc.teacher_ckpt, preset.num_classes).to(device).eval()
    teacher.requires_grad_(False)
    summary = {"preset": preset.to_dict()}
    if "tokens" in rc.stages or "synthesize" in rc.stages:
        parts = load_stable_diffusion(rc.pretrained_model, preset.scheduler)
        for name in ("unet", "vae", "text_encoder"):
            parts[name].to(device)
        sampler = build_sampler(preset, parts, teacher, parts["scheduler"], rc.attention_backend)
        with torch.no_grad():
            uncond = sampler.prompt_encoder([""])
        cat_dir = out / "cat"
        tokens = ClassAlignmentTokens(parts["tokenizer"], parts["text_encoder"], names)
        if load_state(cat_dir)["done"]:
            tokens.load_embeddings(cat_dir / TOKENS)
        if "tokens" in rc.stages:
            if accelerator.is_main_process:
                summary["cat"] = train_class_tokens(sampler, tokens, teacher, preprocess_of(
                    preset.ce_preprocess, preset.classifier_size), preset, cat_dir, uncond, quiet=rc.quiet,
                    log=accelerator.print)
            accelerator.wait_for_everyone()
            tokens.load_embeddings(cat_dir / TOKENS)  # what the main process learned
        if "synthesize" in rc.stages:
            summary["synthesis"] = synthesize(
                sampler, [tokens.prompt(c) for c in range(len(names))], names, out / "images",
                per_class=preset.images_per_class, batch_size=preset.synth_batch, steps=preset.steps, seed=rc.seed,
                uncond=uncond, save_size=preset.save_size, rank=accelerator.process_index,
                world_size=accelerator.num_processes, quiet=rc.quiet)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_class_grids(out / "images", names, preset.images_per_class, out / "grids")
    if "distill" in rc.stages:
        torch.manual_seed(rc.seed)
        student = build_classifier(preset.student, preset.num_classes)
        test = _loader(Path(rc.test_root), preset.classifier_size, False, preset, rc.seed) if rc.test_root else None
        summary["kd"] = distill(teacher, student.to(device), _loader(out / "images", preset.classifier_size, True,
                                                                      preset, rc.seed), preset, out / "kd",
                                test_loader=test, accelerator=accelerator, resume=rc.resume, quiet=rc.quiet,
                                log=accelerator.print)
    if accelerator.is_main_process:
        write_json(out / "results.json", summary)
    return summary

