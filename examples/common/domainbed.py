"""DomainBed's data protocol: environments read from the standard folder layouts, the seeded 80/20 holdout
split of every environment, and leave-one-domain-out test environments. Nothing is downloaded: the folders
are the ones ``python -m domainbed.scripts.download --data_dir=...`` builds."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

# DomainBed dataset name -> folder under --data_dir, and the environments it must contain (sorted = env index).
DOMAINBED_FOLDERS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "PACS": ("PACS", ("art_painting", "cartoon", "photo", "sketch")),
    "VLCS": ("VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007")),
    "OfficeHome": ("office_home", ("Art", "Clipart", "Product", "Real World")),
    "TerraIncognita": ("terra_incognita", ("location_100", "location_38", "location_43", "location_46")),
    "DomainNet": ("domain_net", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")),
}


def seed_hash(*args) -> int:
    """A seed derived from the arguments, stable across runs and machines (DomainBed's ``misc.seed_hash``:
    md5 of their string, modulo 2**31)."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2 ** 31)


def holdout_split(n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(out_idx, in_idx): a seeded permutation of range(n); the first int(n * fraction) indices are the
    holdout ("out", validation), the rest "in" (DomainBed's ``split_dataset``)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"holdout_split: 'n' must be a non-negative int, got {n!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_split: 'fraction' must be in [0, 1), got {fraction}")
    keys = np.arange(n)
    np.random.RandomState(seed).shuffle(keys)
    cut = int(n * fraction)
    return keys[:cut], keys[cut:]


def environment_names(root: Path) -> List[str]:
    """Sub-directories of ``root``, sorted: DomainBed's environment order."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def domainbed_environments(data_dir: str, dataset: str, transform=None) -> Tuple[List[str], list]:
    """(environment names, one torchvision ImageFolder per environment) for a DomainBed dataset. Every
    environment must have the same class sub-folders."""
    from torchvision.datasets import ImageFolder

    if dataset not in DOMAINBED_FOLDERS:
        raise ValueError(f"domainbed_environments: 'dataset' must be one of {sorted(DOMAINBED_FOLDERS)}, "
                         f"got {dataset!r}")
    folder, expected = DOMAINBED_FOLDERS[dataset]
    root = Path(data_dir) / folder
    if not root.is_dir():
        raise FileNotFoundError(f"domainbed_environments: {root} does not exist (expected {dataset} in DomainBed's "
                                f"layout: {folder}/{{{','.join(expected)}}}/<class>/<image>)")
    names = environment_names(root)
    missing = sorted(set(expected) - set(names))
    if missing:
        raise FileNotFoundError(f"domainbed_environments: {root} lacks environment folders {missing}")
    envs = [ImageFolder(str(root / name), transform=transform) for name in names]
    classes = envs[0].classes
    for name, env in zip(names, envs):
        if env.classes != classes:
            raise ValueError(f"domainbed_environments: environment {name!r} has classes {env.classes[:5]}..., "
                             f"unlike {names[0]!r} ({classes[:5]}...)")
    return names, envs


def source_environments(num_envs: int, test_envs: Sequence[int]) -> List[int]:
    """The training environments of a leave-``test_envs``-out run."""
    bad = [t for t in test_envs if not 0 <= t < num_envs]
    if bad:
        raise ValueError(f"source_environments: test environments {bad} out of range for {num_envs} environments")
    return [i for i in range(num_envs) if i not in set(test_envs)]
