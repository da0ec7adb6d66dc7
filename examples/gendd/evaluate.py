"""Evaluation: GenDD's sampling-based accuracy and the student's linear-probe accuracy ("Acc_new").

Sampling accuracy (docs/methods/gendd.md §2, Inference): z = LN(f_S) conditions the head's CFG sampler (``num_samples``
draws averaged, ``cfg_scale``, ``num_steps`` respaced steps); the generated teacher feature goes through
the teacher classifier (weight and bias) and its top-1 is reported. The probe accuracy is the top-1 of
``student.fc(f_S)``. The test set is split between the processes in fixed chunks
(``examples.common.sharded_eval``) and the sampling noise of a chunk comes from a generator seeded by (seed,
chunk): evaluating does not move the training RNG, two evaluations of the same weights agree, and the result
does not depend on the process count (an exported model re-evaluated on one process gives the run's numbers).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..common.sharded_eval import rank_chunks, sum_over_ranks
from . import models

LogitsFn = Callable[[torch.Tensor, int], Dict[str, torch.Tensor]]  # (images, chunk index) -> {name: logits}


@torch.no_grad()
def accuracies(logits_fn: LogitsFn, names: Sequence[str], dataset, batch_size: int, device, accelerator=None,
               max_batches: Optional[int] = None, num_workers: int = 0, desc: Optional[str] = None) -> Dict[str, float]:
    """Top-1 (percent) of every logits tensor ``logits_fn(x, chunk)`` returns (its keys: ``names``) over
    ``dataset`` in chunks of ``batch_size`` (the first ``max_batches``), this process' share of them, summed
    over the processes. ``desc``: a progress bar with that title (None: none)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    chunks, loader = rank_chunks(dataset, batch_size, rank, world, max_batches, num_workers)
    counts = torch.zeros(len(names) + 1, dtype=torch.int64)  # correct per name, then the number of images
    show = desc is not None and (accelerator is None or accelerator.is_local_main_process)
    for chunk, (x, y) in tqdm(zip(chunks, loader), total=len(chunks), desc=desc, leave=False, disable=not show):
        x, y = x.to(device), torch.as_tensor(y).to(device)
        logits = logits_fn(x, chunk)
        if set(logits) != set(names):
            raise KeyError(f"accuracies: logits_fn returned {sorted(logits)}, expected {sorted(names)}")
        for i, name in enumerate(names):
            counts[i] += int((logits[name].argmax(1) == y).sum())
        counts[-1] += int(y.numel())
    counts = sum_over_ranks(accelerator, counts)
    total = max(int(counts[-1]), 1)
    return {name: 100.0 * int(counts[i]) / total for i, name in enumerate(names)}


CHUNK_SEED_STRIDE = 1_000_003  # (seed, chunk) -> seed + chunk * stride: distinct for seeds below the stride


class GenDDLogits:
    """(x, chunk) -> {'acc_probe': student.fc(f_S), 'acc_sample': teacher_fc(mean of n_s generated features)}
    and, when the schedule has at least 3 steps, 'acc_sample_skip': the same sampler started below the clipped
    last timestep (``skip_clipped_step``; GenDD as coded is 'acc_sample'). The sampling noise of a chunk comes
    from a generator seeded by (seed, chunk)."""

    def __init__(self, model: nn.Module, teacher_fc: nn.Linear, num_steps: int = 100, cfg_scale: float = 2.0,
                 num_samples: int = 5, seed: int = 0, sample: bool = True):
        self.model, self.teacher_fc, self.sample = model, teacher_fc, sample
        self.num_steps, self.cfg_scale, self.num_samples, self.seed = num_steps, cfg_scale, num_samples, seed
        self.device = next(model.parameters()).device
        where = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.generator = torch.Generator(device=where)
        self.variants = {"acc_sample": False}
        if len(model.gendd.head.sampling_schedule(num_steps).betas) >= 3:
            self.variants["acc_sample_skip"] = True

    @property
    def names(self):
        return ["acc_probe"] + (list(self.variants) if self.sample else [])

    def __call__(self, x: torch.Tensor, chunk: int = 0) -> Dict[str, torch.Tensor]:
        student = self.model.student
        f_s = models.features(student, x)
        out = {"acc_probe": models.classifier(student)(f_s)}
        if self.sample:
            gendd = self.model.gendd
            self.generator.manual_seed(self.seed + chunk * CHUNK_SEED_STRIDE)
            for name, skip in self.variants.items():
                generated = gendd.sample(f_s.float(), num_samples=self.num_samples, cfg_scale=self.cfg_scale,
                                         num_steps=self.num_steps, generator=self.generator, skip_clipped_step=skip)
                out[name] = self.teacher_fc(generated.to(self.teacher_fc.weight.dtype))
        return out


class ClassifierLogits:
    """(x, chunk) -> {name: model(x)}."""

    def __init__(self, model: nn.Module, name: str = "acc"):
        self.model, self.name = model, name
        self.device = next(model.parameters()).device

    @property
    def names(self):
        return [self.name]

    def __call__(self, x: torch.Tensor, chunk: int = 0) -> Dict[str, torch.Tensor]:
        return {self.name: self.model(x)}


def evaluate_gendd(model: nn.Module, teacher_fc: nn.Linear, dataset, *, num_steps: int, cfg_scale: float,
                   num_samples: int, batch_size: int, seed: int = 0, sample: bool = True, accelerator=None,
                   max_batches: Optional[int] = None, num_workers: int = 0,
                   desc: Optional[str] = None) -> Dict[str, float]:
    """Sampling (``acc_sample``, ``acc_sample_skip``) and linear-probe (``acc_probe``) top-1 of an unwrapped
    ``GenDDModel``; ``teacher_fc`` classifies the generated teacher features."""
    was_training = model.training
    model.eval()
    fn = GenDDLogits(model, teacher_fc, num_steps, cfg_scale, num_samples, seed, sample)
    try:
        return accuracies(fn, fn.names, dataset, batch_size, fn.device, accelerator, max_batches, num_workers, desc)
    finally:
        model.train(was_training)


def evaluate_classifier(model: nn.Module, dataset, batch_size: int, name: str = "acc", accelerator=None,
                        max_batches: Optional[int] = None, num_workers: int = 0,
                        desc: Optional[str] = None) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    fn = ClassifierLogits(model, name)
    try:
        return accuracies(fn, fn.names, dataset, batch_size, fn.device, accelerator, max_batches, num_workers, desc)
    finally:
        model.train(was_training)
