"""Data-free knowledge distillation on the synthetic set: the student matches the teacher's temperature-
softened outputs on synthetic images (Hinton KL, ``ddg_losses.KLDistillationLoss``; the synthetic labels are
not used, as DDIS' images are not filtered by the teacher), evaluated on a real test set when one is given.
DDIS' own KD protocol is unpublished (docs/methods/ddis.md §3): SGD + cosine and T = 4 are the defaults.

Checkpoints after every epoch (``kd.pt`` + ``kd.rng.pt``) make ``--resume`` continue exactly; ``kd.csv``
logs loss and accuracies per epoch.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ddg_losses import KLDistillationLoss

from ..common.rng import atomic_save, rng_state, set_rng_state


def build_optimizer(preset, params):
    if preset.kd_optimizer == "sgd":
        return torch.optim.SGD(params, lr=preset.kd_lr, momentum=0.9, weight_decay=preset.kd_weight_decay,
                               nesterov=True)
    if preset.kd_optimizer == "adamw":
        return torch.optim.AdamW(params, lr=preset.kd_lr, weight_decay=preset.kd_weight_decay)
    raise ValueError(f"kd_optimizer must be 'sgd' or 'adamw', got {preset.kd_optimizer!r}")


@torch.no_grad()
def top1(model: nn.Module, loader, accelerator=None) -> float:
    """Top-1 accuracy in % over a loader of (image, label)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x).argmax(1)
        if accelerator is not None:
            pred, y = accelerator.gather_for_metrics((pred, y))
        correct += int((pred == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


def distill(teacher: nn.Module, student: nn.Module, train_loader: DataLoader, preset, out: Path, *,
            test_loader: Optional[DataLoader] = None, accelerator=None, augment: Optional[Callable] = None,
            resume: bool = False, quiet: bool = False, log: Callable[[str], None] = print) -> List[Dict]:
    """Train ``student`` from ``teacher`` for ``preset.kd_epochs``; returns the per-epoch rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, rng = out / "kd.pt", out / "kd.rng.pt"
    criterion = KLDistillationLoss(temperature=preset.kd_temperature)
    optimizer = build_optimizer(preset, student.parameters())
    steps = preset.kd_epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    start, rows = 0, []
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, rows = state["epoch"], state["rows"]
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    teacher.eval()
    if accelerator is not None:
        student, optimizer, train_loader = accelerator.prepare(student, optimizer, train_loader)
        if test_loader is not None:
            test_loader = accelerator.prepare(test_loader)
    main = accelerator is None or accelerator.is_main_process
    for epoch in tqdm(range(start, preset.kd_epochs), desc=f"KD {out.name}", disable=quiet or not main):
        student.train()
        total, batches = 0.0, 0
        for x, _ in train_loader:
            if augment is not None:
                x = augment(x)
            with torch.no_grad():
                t_logits = teacher(x)
            loss = criterion(student(x), t_logits)
            optimizer.zero_grad(set_to_none=True)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            scheduler.step()
            total, batches = total + loss.item(), batches + 1
        row = {"epoch": epoch + 1, "kd_loss": total / max(batches, 1)}
        if test_loader is not None:
            row["student_test_acc"] = top1(student, test_loader, accelerator)
        rows.append(row)
        if main:
            unwrapped = accelerator.unwrap_model(student) if accelerator is not None else student
            atomic_save({"student": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "rows": rows}, ckpt)
            atomic_save(rng_state(), rng)
            _write_csv(out / "kd.csv", rows)
    if rows and main:
        log(f"KD {out.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items()))
    return rows


def _write_csv(path: Path, rows: List[Dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
