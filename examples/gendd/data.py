"""Datasets of the example. Nothing is downloaded: CIFAR-100 and ImageNet are read from ``--data-root``
(a clear error says what is missing); the ``tiny`` preset uses scikit-learn's bundled digits."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..common.digits import digits_split
from ..common.epoch_sampler import EpochSampler

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DigitsDataset(Dataset):
    """8x8 digits as 1x8x8 tensors in [0, 1] (augmentation happens per batch, in ``ShiftCollate``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class ShiftCollate:
    """Stack a batch and shift each image by a random -1..1 pixels in x and y (zero padding), drawn from
    torch's global generator (so a resumed run draws the same shifts)."""

    def __call__(self, items):
        x = torch.stack([i[0] for i in items])
        y = torch.stack([torch.as_tensor(i[1]) for i in items])
        B, _, H, W = x.shape
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
        dy, dx = torch.randint(0, 3, (2, B))
        rows = (dy[:, None] + torch.arange(H))[:, :, None]
        cols = (dx[:, None] + torch.arange(W))[:, None, :]
        return padded[torch.arange(B)[:, None, None], 0, rows, cols].unsqueeze(1), y


def digits(augment: bool = True, limit: Optional[int] = None) -> Tuple[Dataset, Dataset]:
    """scikit-learn's digits (1797 images, 10 classes), the fixed stratified 80/20 split of ``digits_split``."""
    x_train, y_train, x_test, y_test = digits_split(limit=limit)
    return DigitsDataset(x_train, y_train, augment), DigitsDataset(x_test, y_test, False)


def _missing(what: str, root: Path, expected: str, error: Exception) -> FileNotFoundError:
    reason = str(error).split(". You can use download=True")[0]  # torchvision's hint does not apply here
    return FileNotFoundError(f"{what} not found under --data-root {root} ({reason}). Nothing is downloaded: "
                             f"put the dataset there ({expected}) or pass --data-root pointing at it.")


def cifar100(root: str) -> Tuple[Dataset, Dataset]:
    """CIFAR-100 (python version, ``root/cifar-100-python/``) through torchvision's reader: random crop 32
    (pad 4) + flip for training."""
    from torchvision import transforms

    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    root = Path(root)
    reader = _cifar100_reader()
    try:
        return (reader(str(root), train=True, transform=train_tf, download=False),
                reader(str(root), train=False, transform=test_tf, download=False))
    except RuntimeError as e:
        raise _missing("CIFAR-100", root, "the extracted 'cifar-100-python/' folder of the python version", e)


def _cifar100_reader():
    """torchvision's CIFAR100 with the md5 of each pickle replaced by an existence check (torchvision's own
    ``check_integrity`` without a checksum): the files are read the same way, and a copy in the same layout that
    is not the published archive (re-packed, or the smoke preset's generated one) loads too. A damaged pickle
    still fails, in ``pickle.load``."""
    from torchvision import datasets

    class CIFAR100Files(datasets.CIFAR100):
        train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
        test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
        meta = {**datasets.CIFAR100.meta, "md5": None}

    return CIFAR100Files


def imagenet(root: str, crop_scale: Tuple[float, float] = (0.6, 1.0),
             image_size: int = 224) -> Tuple[Dataset, Dataset]:
    """ImageFolder ``root/train`` (RandomResizedCrop ``image_size`` with ``crop_scale`` + flip) and ``root/val``
    (resize to 256/224 of ``image_size``, center crop ``image_size``: 256 and 224 for the paper's runs)."""
    from torchvision import datasets, transforms

    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"imagenet: image_size must be an int >= 8, got {image_size!r}")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size, scale=tuple(crop_scale)),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size),
                                  transforms.ToTensor(), normalize])
    root = Path(root)
    try:
        return (datasets.ImageFolder(str(root / "train"), train_tf), datasets.ImageFolder(str(root / "val"), test_tf))
    except (FileNotFoundError, RuntimeError) as e:
        raise _missing("ImageNet", root, "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG", e)


def datasets_for(dataset: str, data_root: Optional[str], crop_scale=None, limit: Optional[int] = None,
                 image_size: int = 224):
    if dataset == "digits":
        return digits(limit=limit)
    if data_root is None:
        raise SystemExit(f"--data-root is required for {dataset}: nothing is downloaded")
    if dataset == "cifar100":
        train, test = cifar100(data_root)
    elif dataset == "imagenet":
        train, test = imagenet(data_root, crop_scale or (0.6, 1.0), image_size)
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    if limit:
        train = torch.utils.data.Subset(train, range(min(limit, len(train))))
        test = torch.utils.data.Subset(test, range(min(limit, len(test))))
    return train, test


def train_loader(train: Dataset, batch_size: int, seed: int, num_workers: int = 0, rank: int = 0,
                 world: int = 1) -> DataLoader:
    """The training loader over this rank's ``EpochSampler`` share (drop_last: every step sees a full batch);
    ``batch_size`` is per process. Digits with ``augment`` are shifted per batch.
    It is not handed to accelerate: it is already sharded, and it loads a batch only when the step asks for it
    (accelerate's loader fetches one batch ahead, so a checkpoint taken inside an epoch would hold RNG states
    past the next batch's augmentation). Its own generator seeds the worker processes, so creating an iterator
    does not draw from the training RNG. Test sets are read by ``evaluate.accuracies``."""
    collate = ShiftCollate() if getattr(train, "augment", False) else None
    return DataLoader(train, batch_size=batch_size, sampler=EpochSampler(len(train), seed, rank, world),
                      drop_last=True, collate_fn=collate, generator=torch.Generator().manual_seed(seed),
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)
