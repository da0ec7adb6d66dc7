"""Per-epoch checkpoints that resume a stage exactly: model (the whole trainable module: student, and in
stage 2 cond_norm + diffusion head), optimizer, LR scheduler, the beta2 step, the fp16 loss scaler, the
torch / CUDA / numpy / python RNG states (one file per process), epoch, global step and the log rows so far.

Files of a stage: ``<dir>/<stage>.pt`` (written atomically after every epoch) and
``<dir>/<stage>.rng<rank>.pt``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..common.rng import atomic_save, rng_state, set_rng_state


@dataclass
class TrainState:
    epoch: int = 0              # epochs completed (the next one to run)
    step: int = 0               # optimizer steps done in this stage (drives the beta2 ramp)
    rows: List[Dict[str, Any]] = field(default_factory=list)
    done: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)


def paths(directory: Path, stage: str, rank: int = 0):
    directory = Path(directory)
    return directory / f"{stage}.pt", directory / f"{stage}.rng{rank}.pt"


def save(directory: Path, stage: str, *, model: nn.Module, optimizer, scheduler, state: TrainState,
         accelerator=None, beta2: Optional[float] = None) -> Path:
    """Write the stage checkpoint (main process) and this process' RNG states."""
    rank = accelerator.process_index if accelerator is not None else 0
    main = accelerator.is_main_process if accelerator is not None else True
    ckpt, rng = paths(directory, stage, rank)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    scaler = getattr(accelerator, "scaler", None)
    if main:
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "epoch": state.epoch, "step": state.step,
                      "beta2_step": state.step, "beta2": beta2, "rows": state.rows, "done": state.done,
                      "extra": state.extra, "scaler": scaler.state_dict() if scaler is not None else None}, ckpt)
    atomic_save(rng_state(), rng)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return ckpt


def exists(directory: Path, stage: str) -> bool:
    return paths(directory, stage)[0].is_file()


def load(directory: Path, stage: str, *, model: nn.Module, optimizer=None, scheduler=None, accelerator=None,
         restore_rng: bool = True) -> TrainState:
    """Restore a stage checkpoint into ``model`` (unwrapped), ``optimizer``, ``scheduler`` and the RNGs."""
    rank = accelerator.process_index if accelerator is not None else 0
    ckpt_path, rng_path = paths(directory, stage, rank)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and ckpt.get("scaler") is not None:  # fp16 loss scaling
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng:
        if not rng_path.is_file():
            raise FileNotFoundError(f"{rng_path} is missing: cannot resume {stage} exactly on process {rank}")
        set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
    return TrainState(ckpt["epoch"], ckpt["step"], list(ckpt["rows"]), bool(ckpt["done"]), dict(ckpt["extra"]))


def load_model_state(directory: Path, stage: str) -> Dict[str, torch.Tensor]:
    """Only the model weights of a stage checkpoint (e.g. stage 1's, for stage 2)."""
    return torch.load(paths(directory, stage)[0], map_location="cpu", weights_only=False)["model"]
