"""The files of a DDIS run: the synthetic set as an ImageFolder (``<set>/<index>_<class>/<k>.png``), its
completeness, per-class grids, the class-name file and the image loaders of KD and its evaluation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

GRID_IMAGES = 16


def class_dir(out: Path, c: int, name: str) -> Path:
    return Path(out) / f"{c:04d}_{name.replace(' ', '_').replace('/', '_')}"


def image_path(out: Path, c: int, name: str, k: int) -> Path:
    return class_dir(out, c, name) / f"{k:05d}.png"


def all_jobs(num_classes: int, per_class: int) -> List[Tuple[int, int]]:
    """Every (class, k) of a set, k-major so that a batch mixes classes."""
    return [(c, k) for k in range(per_class) for c in range(num_classes)]


def missing_by_class(out: Path, names: Sequence[str], per_class: int) -> List[Tuple[int, int]]:
    """(class, number of missing images) of every class that lacks some."""
    counts = [(c, sum(not image_path(out, c, n, k).is_file() for k in range(per_class))) for c, n in enumerate(names)]
    return [(c, m) for c, m in counts if m]


def check_complete(out: Path, names: Sequence[str], per_class: int) -> None:
    """Refuse (SystemExit) a set that lacks images, naming each class and how many it lacks."""
    missing = missing_by_class(out, names, per_class)
    if missing:
        listing = ", ".join(f"{names[c]}: {m} of {per_class} missing" for c, m in missing[:20])
        more = f" (and {len(missing) - 20} more classes)" if len(missing) > 20 else ""
        raise SystemExit(f"the synthetic set {out} is incomplete: {listing}{more}. Run the synthesize stage "
                         f"(with --resume it generates only the missing images) before distilling.")


def save_image_atomic(image: torch.Tensor, path: Path, save_size: Optional[int]) -> None:
    """An image in [0, 1] as PNG, nearest-resized to ``save_size`` (DDIS: 256); written through a temporary file,
    so that a killed run leaves no half file that a resume would take as done."""
    from torchvision.utils import save_image

    if save_size is not None and image.shape[-1] != save_size:
        image = F.interpolate(image[None], size=save_size, mode="nearest")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    save_image(image, tmp)
    os.replace(tmp, path)


def save_class_grids(out: Path, names: Sequence[str], per_class: int, grids: Path) -> Path:
    """``<grids>/<index>_<class>.png``: the first images of each class of the set ``out``, and ``<grids>/all.png``
    (one row per class). ``grids`` must lie outside ``out`` (an ImageFolder would read it as a class)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    from torchvision.utils import make_grid, save_image

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


def image_transforms(size: int, train: bool):
    """KD's augmentation (RandomResizedCrop + flip) or the evaluation's resize + center crop, with the ImageNet
    statistics the teacher's checkpoint was trained with."""
    from torchvision import transforms as T

    from ddg_models import ClassifierPreprocess

    imagenet = ClassifierPreprocess.imagenet()
    head = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if train
            else [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)])
    return T.Compose(head + [T.ToTensor(), T.Normalize(imagenet.mean.flatten().tolist(),
                                                        imagenet.std.flatten().tolist())])


def image_folder(root: Path, size: int, train: bool):
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    return ImageFolder(str(root), transform=image_transforms(size, train))
