"""The smoke presets' fixtures: data and teacher weights in the on-disk layouts a real run reads, so that
``--preset smoke`` / ``smoke_cifar`` go through the same loaders as ImageNet / CIFAR-100 and real teachers.

Written under ``<out>/smoke_assets/`` from a fixed seed (the same bytes every time; reused when complete):

* ``smoke`` (the ImageNet pair r34_r18): ``imagenet/train/<wnid>/*.JPEG`` and ``imagenet/val/<wnid>/*.JPEG``
  (torchvision ``ImageFolder``; the first four ImageNet-1k wnids, 8 training and 4 validation images each, 40x48
  JPEGs) and ``resnet34.pth``: a randomly initialised torchvision ResNet-34 (torchvision's ``resnet34``
  architecture with a 4-way fc: the preset's classes) saved as torchvision's weight files are, a plain
  ``state_dict``.
* ``smoke_cifar`` (the CIFAR pair res56_res20): ``cifar100/cifar-100-python/{train,test,meta}``, pickles in
  the python-version layout (``data`` uint8 [N, 3072] as R, G, B planes of 32x32, ``fine_labels``,
  ``coarse_labels``, ``filenames``, ``batch_label``; ``meta`` with the 100 fine and 20 coarse label names; 64
  training, 32 test images of the preset's first 10 classes) and ``resnet56_vanilla/ckpt_epoch_240.pth``: a
  randomly initialised RepDistiller resnet56 (10-way fc) in RepDistiller's teacher checkpoint format
  ``{'epoch', 'model', 'accuracy', 'optimizer'}``.

Images are class-coloured noise (each class its own mean colour), so the classes can be told apart.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

SEED = 2026
VERSION = 1  # bump when the fixtures change: a complete folder of another version is rebuilt
IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")  # the first four ImageNet-1k classes
IMAGENET_PER_CLASS = {"train": 8, "val": 4}
IMAGENET_IMAGE = (40, 48)  # height, width (ImageNet's are larger; the smoke preset crops 32)
CIFAR_COUNTS = {"train": 64, "test": 32}
CIFAR_CLASSES = 10  # of CIFAR-100's 100 labels, the smoke preset uses the first 10


def build(preset: str, out: Path) -> Tuple[str, str]:
    """(data root, teacher checkpoint) of ``preset``'s fixtures under ``out/smoke_assets/``, written if missing
    (call it on one process)."""
    builders = {"smoke": _imagenet, "smoke_cifar": _cifar}
    if preset not in builders:
        raise ValueError(f"smoke.build: no fixtures for preset {preset!r} (fixtures: {sorted(builders)})")
    root = Path(out) / "smoke_assets" / preset
    marker = root / "complete.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == {"seed": SEED, "version": VERSION}):
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        tmp.mkdir(parents=True)
        paths = builders[preset](tmp)
        (tmp / "complete.json").write_text(json.dumps({"seed": SEED, "version": VERSION}))
        tmp.rename(root)
    else:
        paths = builders[preset](None)
    return tuple(str(root / p) for p in paths)


def _colours(num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(40, 215, size=(num_classes, 3))


def _images(labels: np.ndarray, colours: np.ndarray, shape: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, H, W, 3]: the label's colour plus noise."""
    noise = rng.normal(0, 30, size=(len(labels), *shape, 3))
    return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def _imagenet(root) -> Tuple[str, str]:
    paths = ("imagenet", "resnet34.pth")
    if root is None:
        return paths
    from PIL import Image
    from torchvision.models import resnet34

    rng = np.random.default_rng(SEED)
    colours = _colours(len(IMAGENET_WNIDS), rng)
    for split, per_class in IMAGENET_PER_CLASS.items():
        labels = np.repeat(np.arange(len(IMAGENET_WNIDS)), per_class)
        for i, (label, image) in enumerate(zip(labels, _images(labels, colours, IMAGENET_IMAGE, rng))):
            folder = root / "imagenet" / split / IMAGENET_WNIDS[label]
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{IMAGENET_WNIDS[label]}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            Image.fromarray(image).save(folder / name, format="JPEG", quality=90)
    torch.manual_seed(SEED)
    torch.save(resnet34(weights=None, num_classes=len(IMAGENET_WNIDS)).state_dict(), root / paths[1])
    return paths


def _cifar(root) -> Tuple[str, str]:
    paths = ("cifar100", "resnet56_vanilla/ckpt_epoch_240.pth")
    if root is None:
        return paths
    from ddg_models.classifiers import build_classifier

    rng = np.random.default_rng(SEED + 1)
    colours = _colours(CIFAR_CLASSES, rng)
    folder = root / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in CIFAR_COUNTS.items():
        labels = np.arange(n) % CIFAR_CLASSES
        planes = _images(labels, colours, (32, 32), rng).transpose(0, 3, 1, 2).reshape(n, 3072)
        entry: Dict[str, object] = {"filenames": [f"smoke_{split}_{i}.png" for i in range(n)],
                                    "batch_label": f"{split}ing batch 1 of 1", "fine_labels": labels.tolist(),
                                    "coarse_labels": (labels // 5).tolist(), "data": planes}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i:02d}" for i in range(100)],
                     "coarse_label_names": [f"superclass_{i:02d}" for i in range(20)]}, f)
    torch.manual_seed(SEED)
    model = build_classifier("resnet56", CIFAR_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    (root / paths[1]).parent.mkdir(parents=True)
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(1.0),
                "optimizer": optimizer.state_dict()}, root / paths[1])
    return paths
