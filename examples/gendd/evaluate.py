"""Evaluation: GenDD's sampling-based accuracy and the student's linear-probe accuracy ("Acc_new").

Sampling accuracy (docs/methods/gendd.md §2, Inference): z = LN(f_S) conditions the head's CFG sampler (``num_samples``
draws averaged, ``cfg_scale``, ``num_steps`` respaced steps); the generated teacher feature goes through
the teacher classifier (weight and bias) and its top-1 is reported. The probe accuracy is the top-1 of
``student.fc(f_S)``. Sampling noise comes from a generator seeded per evaluation, so evaluating does
not move the training RNG and two evaluations of the same weights agree.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from . import models

LogitsFn = Callable[[torch.Tensor], Dict[str, torch.Tensor]]


@torch.no_grad()
def accuracies(logits_fn: LogitsFn, loader, accelerator=None, max_batches: Optional[int] = None) -> Dict[str, float]:
    """Top-1 (percent) of every logits tensor ``logits_fn(x)`` returns, over ``loader`` (gathered across
    processes without the padding duplicates when ``accelerator`` is given)."""
    correct: Dict[str, int] = {}
    total = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if accelerator is None:  # a prepared loader places the batches itself
            device = getattr(logits_fn, "device", torch.device("cpu"))
            x, y = x.to(device), y.to(device)
        hits = {name: logits.argmax(1) == y for name, logits in logits_fn(x).items()}
        if accelerator is not None:
            hits = {name: accelerator.gather_for_metrics(h) for name, h in hits.items()}
        for name, h in hits.items():
            correct[name] = correct.get(name, 0) + int(h.sum())
        total += int(next(iter(hits.values())).numel())
    return {name: 100.0 * c / max(total, 1) for name, c in correct.items()}


class GenDDLogits:
    """x -> {'acc_probe': student.fc(f_S), 'acc_sample': teacher_fc(mean of n_s generated features)} and, when
    the schedule has at least 3 steps, 'acc_sample_skip': the same sampler started below the clipped last
    timestep (``skip_clipped_step``; GenDD as coded is 'acc_sample')."""

    def __init__(self, model: nn.Module, teacher_fc: nn.Linear, num_steps: int = 100, cfg_scale: float = 2.0,
                 num_samples: int = 5, seed: int = 0, sample: bool = True):
        self.model, self.teacher_fc, self.sample = model, teacher_fc, sample
        self.num_steps, self.cfg_scale, self.num_samples = num_steps, cfg_scale, num_samples
        self.device = next(model.parameters()).device
        where = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.generator = torch.Generator(device=where).manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        student = self.model.student
        f_s = models.features(student, x)
        out = {"acc_probe": models.classifier(student)(f_s)}
        if self.sample:
            gendd = self.model.gendd
            variants = {"acc_sample": False}
            if len(gendd.head.sampling_schedule(self.num_steps).betas) >= 3:
                variants["acc_sample_skip"] = True
            for name, skip in variants.items():
                generated = gendd.sample(f_s.float(), num_samples=self.num_samples, cfg_scale=self.cfg_scale,
                                         num_steps=self.num_steps, generator=self.generator, skip_clipped_step=skip)
                out[name] = self.teacher_fc(generated.to(self.teacher_fc.weight.dtype))
        return out


class ClassifierLogits:
    """x -> {name: model(x)}."""

    def __init__(self, model: nn.Module, name: str = "acc"):
        self.model, self.name = model, name
        self.device = next(model.parameters()).device

    def __call__(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {self.name: self.model(x)}


def evaluate_gendd(model: nn.Module, teacher: nn.Module, loader, *, num_steps: int, cfg_scale: float,
                   num_samples: int, seed: int = 0, sample: bool = True, accelerator=None,
                   max_batches: Optional[int] = None) -> Dict[str, float]:
    """Sampling (``acc_sample``) and linear-probe (``acc_probe``) top-1 of an unwrapped ``GenDDModel``."""
    was_training = model.training
    model.eval()
    rank = accelerator.process_index if accelerator is not None else 0
    fn = GenDDLogits(model, models.classifier(teacher), num_steps, cfg_scale, num_samples, seed + rank, sample)
    try:
        return accuracies(fn, loader, accelerator, max_batches)
    finally:
        model.train(was_training)


def evaluate_classifier(model: nn.Module, loader, name: str = "acc", accelerator=None,
                        max_batches: Optional[int] = None) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        return accuracies(ClassifierLogits(model, name), loader, accelerator, max_batches)
    finally:
        model.train(was_training)
