"""DomainBed data for DDG: environments, the 80/20 holdout per environment, one minibatch per source domain.

Batches are drawn with replacement (DomainBed's InfiniteDataLoader) from a generator seeded by (trial seed,
environment, step) on the rank's own stream (examples/common/seeding.py), so a resumed run draws exactly the
batches an uninterrupted one would and every process draws its own. The total batch is split evenly over the
processes, or refused (``per_process_batch``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..common.domainbed import domainbed_environments, holdout_split, seed_hash
from ..common.rotated_digits import rotated_digits
from ..common.seeding import rank_seed
from .presets import DOMAIN_PROMPTS, Preset


class TensorImages(Dataset):
    """In-memory (normalised image, label) pairs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class TransformedSubset(Dataset):
    """``base[indices[i]]`` with its image through ``transform`` (one ImageFolder scan serves every split)."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.base[self.indices[i]]
        return self.transform(image), label


@dataclass
class Split:
    """One environment's two parts: 'in' (train / test accuracy) and 'out' (the 20% validation holdout)."""
    name: str
    train_in: Dataset      # 'in' with the training transform (used only when this env is a source)
    eval_in: Dataset
    eval_out: Dataset


@dataclass
class Environments:
    names: List[str]
    class_names: List[str]
    domain_prompts: List[str]   # one negative prompt per environment
    splits: List[Split]


def _transforms(p: Preset):
    from torchvision import transforms as T

    normalize = T.Normalize(p.mean, p.std)
    evaluation = T.Compose([T.Resize((p.image_size, p.image_size)), T.ToTensor(), normalize])
    if not p.augment:
        return evaluation, evaluation
    train = T.Compose([T.RandomResizedCrop(p.image_size, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
                       T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale(p=0.1), T.ToTensor(), normalize])
    return train, evaluation


def load_environments(p: Preset, data_dir: Optional[str], trial_seed: int) -> Environments:
    """All environments of ``p.dataset`` with their holdout split for ``trial_seed``."""
    if p.dataset == "RotatedDigits":
        from ..common.digits import DIGIT_NAMES

        names, envs = rotated_digits(p.angles, size=p.image_size)
        mean, std = torch.tensor(p.mean).view(1, -1, 1, 1), torch.tensor(p.std).view(1, -1, 1, 1)
        splits = []
        for i, (name, (x, y)) in enumerate(zip(names, envs)):
            out_idx, in_idx = holdout_split(len(y), p.holdout, seed_hash(trial_seed, i))
            x = (x - mean) / std
            part_in = TensorImages(x[in_idx], y[in_idx])
            splits.append(Split(name, part_in, part_in, TensorImages(x[out_idx], y[out_idx])))
        return Environments(names, list(DIGIT_NAMES), [f"a {n} photo" for n in names], splits)
    if not data_dir:
        raise FileNotFoundError(f"--data-root is required for {p.dataset} (DomainBed folder layout)")
    names, folders = domainbed_environments(data_dir, p.dataset)
    train_tf, eval_tf = _transforms(p)
    splits = []
    for i, (name, folder) in enumerate(zip(names, folders)):
        out_idx, in_idx = holdout_split(len(folder), p.holdout, seed_hash(trial_seed, i))
        splits.append(Split(name, TransformedSubset(folder, in_idx, train_tf),
                            TransformedSubset(folder, in_idx, eval_tf), TransformedSubset(folder, out_idx, eval_tf)))
    prompts = DOMAIN_PROMPTS.get(p.dataset, {})
    return Environments(names, folders[0].classes, [prompts.get(n, f"a {n} image") for n in names], splits)


def per_process_batch(total: int, num_processes: int, flag: str = "--batch-per-domain") -> int:
    """Each process' share of a total batch. A total the processes cannot share equally is refused rather than
    rounded: DDP averages the processes' gradients with equal weight, so unequal shares would weight some images
    more than others, and a floor would silently train on fewer images than configured."""
    if not isinstance(total, int) or total < 1:
        raise ValueError(f"per_process_batch: 'total' must be a positive int, got {total!r}")
    if total % num_processes:
        lower, upper = total - total % num_processes, total + num_processes - total % num_processes
        raise SystemExit(f"{flag} {total} is not divisible by the {num_processes} processes: use a multiple of "
                         f"{num_processes} ({', '.join(str(v) for v in (lower, upper) if v > 0)})")
    return total // num_processes


def step_indices(n: int, batch: int, seed: int) -> torch.Tensor:
    """``batch`` indices in [0, n), with replacement, from a generator seeded by ``seed``."""
    return torch.randint(n, (batch,), generator=torch.Generator().manual_seed(seed))


class StepBatchSampler:
    """Yields the index batch of step s, s = start, start + 1, ... (seeded per step: resume-exact)."""

    def __init__(self, n: int, batch: int, seed: int, start: int):
        if n < 1:
            raise ValueError(f"StepBatchSampler: an environment split is empty (n={n})")
        self.n, self.batch, self.seed, self.start = n, batch, seed, start

    def __iter__(self) -> Iterator[List[int]]:
        step = self.start
        while True:
            yield step_indices(self.n, self.batch, seed_hash(self.seed, step)).tolist()
            step += 1


class SourceBatches:
    """One minibatch per source domain per step: (x, y, domain index) concatenated over the domains."""

    def __init__(self, envs: Environments, sources: Sequence[int], batch: int, seed: int, start: int,
                 rank: int, num_workers: int):
        self.domains = list(sources)
        self.iters = []
        for d in self.domains:
            data = envs.splits[d].train_in
            sampler = StepBatchSampler(len(data), batch, rank_seed(seed_hash(seed, d), rank), start)
            if isinstance(data, TensorImages):  # in memory: index directly, no loader overhead
                self.iters.append(((data.x[idx], data.y[idx]) for idx in map(torch.tensor, sampler)))
            else:
                self.iters.append(iter(DataLoader(data, batch_sampler=sampler, num_workers=num_workers,
                                                  persistent_workers=num_workers > 0)))

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys, ds = [], [], []
        for d, it in zip(self.domains, self.iters):
            x, y = next(it)
            xs.append(x)
            ys.append(y)
            ds.append(torch.full_like(y, d))
        return torch.cat(xs), torch.cat(ys), torch.cat(ds)


def eval_loader(data: Dataset, batch: int, num_workers: int) -> DataLoader:
    """In order; its own generator, so that evaluating never draws from the training streams (an iterator draws
    a base seed when it starts)."""
    return DataLoader(data, batch_size=batch, shuffle=False, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(0))

