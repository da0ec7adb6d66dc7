"""Synthetic-dataset generation in ImageFolder layout: ``<out>/<index>_<class>/<k>.png``, N images per class.

Resumable: images already on disk are skipped, and image k of class c always starts from the noise of
generator seed ``(seed, c, k)``, so which images exist never changes what the others look like (with
``bn_batch='batch'`` the DAG statistics are shared by the images of one sampling batch, so a resumed run's
batches, and thereby its images, may differ slightly from an uninterrupted run's). Under accelerate, each
process generates every ``num_processes``-th missing image. A grid per class (``save_class_grids``) and a
CSV of the DAG loss per batch (``synthesis.csv``, in the set's folder) are written.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from .cat import latent_shape

GRID_IMAGES = 16


def class_dir(out: Path, c: int, name: str) -> Path:
    return Path(out) / f"{c:04d}_{name.replace(' ', '_').replace('/', '_')}"


def image_path(out: Path, c: int, name: str, k: int) -> Path:
    return class_dir(out, c, name) / f"{k:05d}.png"


def noise_for(seed: int, c: int, k: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + c) * 1_000_003 + k)
    return torch.randn(shape, generator=g)


def missing_jobs(out: Path, names: Sequence[str], per_class: int) -> List[Tuple[int, int]]:
    """(class, k) pairs without a file, interleaved over classes (k-major) so a batch mixes classes."""
    return [(c, k) for k in range(per_class) for c in range(len(names))
            if not image_path(out, c, names[c], k).is_file()]


def _save(image: torch.Tensor, path: Path, save_size: Optional[int]) -> None:
    if save_size is not None and image.shape[-1] != save_size:
        image = F.interpolate(image[None], size=save_size, mode="nearest")[0]  # DDIS: nearest to 256
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    save_image(image, tmp)
    os.replace(tmp, path)  # a run killed mid-write leaves no half file that resume would skip


def synthesize(sampler, prompts: Sequence[str], names: Sequence[str], out: Path, *, per_class: int,
               batch_size: int, steps: int, seed: int, uncond: Dict[str, torch.Tensor], guided: bool = True,
               save_size: Optional[int] = None, rank: int = 0, world_size: int = 1, quiet: bool = False) -> dict:
    """Generate the missing images of ``out``; ``prompts[c]`` is class c's prompt. Returns counts."""
    out = Path(out)
    jobs = missing_jobs(out, names, per_class)[rank::world_size]
    shape = latent_shape(sampler)
    device = sampler.codec.device
    with torch.no_grad():
        one_by_one = [sampler.prompt_encoder([p]) for p in prompts]
        embeds = {k: torch.cat([e[k] for e in one_by_one]) for k in one_by_one[0]}
    log_path = out / (f"synthesis.rank{rank}.csv" if world_size > 1 else "synthesis.csv")
    out.mkdir(parents=True, exist_ok=True)
    new_log = not log_path.is_file()
    with open(log_path, "a", newline="") as f:
        writer = csv.writer(f)
        if new_log:
            writer.writerow(["first_class", "first_k", "batch", "dag_loss_first_step", "dag_loss_last_step"])
        for start in tqdm(range(0, len(jobs), batch_size), desc=f"synthesize {out.name}", disable=quiet):
            batch = jobs[start:start + batch_size]
            latents = torch.stack([noise_for(seed, c, k, shape) for c, k in batch]).to(device)
            rows = [c for c, _ in batch]
            cond = {k: v[rows] for k, v in embeds.items()}
            result = sampler(cond, uncond, latents=latents, num_inference_steps=steps,
                             guided_steps=None if guided else [])
            for (c, k), image in zip(batch, result.images.float().cpu()):
                _save(image, image_path(out, c, names[c], k), save_size)
            losses = result.guidance_losses or [float("nan")]
            writer.writerow([batch[0][0], batch[0][1], len(batch), losses[0], losses[-1]])
            f.flush()
    return {"generated": len(jobs), "total": per_class * len(names)}


def save_class_grids(out: Path, names: Sequence[str], per_class: int, grids: Path) -> Path:
    """``<grids>/<index>_<class>.png``: the first images of each class of the set ``out``, and ``<grids>/all.png``
    (one row per class). ``grids`` must lie outside ``out`` (an ImageFolder would read it as a class)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    grids = Path(grids)
    grids.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, name in enumerate(names):
        files = [image_path(out, c, name, k) for k in range(min(per_class, GRID_IMAGES))]
        images = [pil_to_tensor(Image.open(p)).float() / 255 for p in files if p.is_file()]
        if not images:
            continue
        save_image(make_grid(images, nrow=8, padding=1), grids / f"{class_dir(out, c, name).name}.png")
        rows.append(torch.stack(images[:8]))
    if rows:
        width = min(len(r) for r in rows)
        save_image(torch.cat([r[:width] for r in rows]), grids / "all.png", nrow=width, padding=1)
    return grids
