"""The epoch loop shared by every stage: accelerate (devices, DDP, mixed precision), AdamW/SGD with the
per-epoch LR schedule and the per-iteration beta2 ramp, tqdm, one log row per epoch, a checkpoint
after every epoch and exact resume."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .checkpoint import TrainState
from .optim import beta2_at, build_optimizer, build_scheduler, set_beta2
from .presets import StageConfig

LossFn = Callable[[nn.Module, object], tuple]                 # (prepared module, batch) -> (loss, metrics)
EvalFn = Callable[[nn.Module, int, bool], Dict[str, float]]   # (unwrapped module, epoch, final) -> metrics


@dataclass
class Stage:
    name: str
    model: nn.Module              # the trainable module (unwrapped); the frozen teacher stays outside
    cfg: StageConfig
    loss_fn: LossFn
    eval_fn: Optional[EvalFn] = None
    train_loader: object = None


@dataclass
class RunOptions:
    ckpt_dir: Path
    resume: bool = False
    max_steps: Optional[int] = None          # cap on this stage's optimizer steps (smoke runs / CI)
    steps_per_epoch: Optional[int] = None    # cap on the batches of an epoch
    quiet: bool = False                      # no progress bars
    stop_after_epochs: Optional[int] = None  # return (not done) after this many epochs in this call, as if killed
    on_epoch: Optional[Callable[[Dict], None]] = None  # called with each new log row (main process)
    row_extra: Dict[str, object] = field(default_factory=dict)


def run_stage(stage: Stage, accelerator, opts: RunOptions) -> TrainState:
    """Train ``stage`` for its epochs (or what is left of them after a resume) and return its state;
    ``stage.model`` holds the trained weights afterwards."""
    cfg, name = stage.cfg, stage.name
    optimizer = build_optimizer(stage.model, cfg)
    scheduler = build_scheduler(optimizer, cfg)  # per epoch: not handed to accelerate (it steps per iteration)
    model, optimizer, loader = accelerator.prepare(stage.model, optimizer, stage.train_loader)
    unwrapped = accelerator.unwrap_model(model)

    state = TrainState()
    if opts.resume and checkpoint.exists(opts.ckpt_dir, name):
        state = checkpoint.load(opts.ckpt_dir, name, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                                accelerator=accelerator)
        accelerator.print(f"[{name}] resumed from {checkpoint.paths(opts.ckpt_dir, name)[0]}: epoch {state.epoch}, "
                          f"step {state.step}{' (done)' if state.done else ''}")
        for row in state.rows:
            if opts.on_epoch and accelerator.is_main_process:
                opts.on_epoch(row, replay=True)
    if state.done:
        return state

    per_epoch = len(loader) if opts.steps_per_epoch is None else min(len(loader), opts.steps_per_epoch)
    total_steps = max(cfg.epochs * per_epoch, 1)
    beta2 = cfg.beta2
    first = state.epoch
    for epoch in range(state.epoch, cfg.epochs):
        if opts.stop_after_epochs is not None and epoch - first >= opts.stop_after_epochs:
            break
        loader.set_epoch(epoch)  # the sampler's permutation depends on the epoch only
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        sums: Dict[str, torch.Tensor] = {}
        count, start = 0, time.perf_counter()
        bar = tqdm(total=per_epoch, desc=f"{name} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=opts.quiet or not accelerator.is_local_main_process)
        for i, batch in enumerate(loader):
            if i >= per_epoch:
                break
            if cfg.beta2_min is not None:  # rescheduled every iteration (docs/methods/gendd.md §2.10)
                beta2 = beta2_at(state.step, total_steps - 1, cfg.beta2_min, cfg.beta2)
                set_beta2(optimizer, beta2)
            with accelerator.autocast():
                loss, metrics = stage.loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            state.step += 1
            count += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            bar.update(1)
            if i % 20 == 0:
                current = float(loss.detach())
                if not math.isfinite(current):
                    raise FloatingPointError(f"[{name}] non-finite loss {current} at epoch {epoch + 1}, "
                                             f"step {state.step}")
                bar.set_postfix(loss=f"{current:.4f}")
            if opts.max_steps is not None and state.step >= opts.max_steps:
                break
        bar.close()
        scheduler.step()
        state.epoch = epoch + 1
        stopped = opts.max_steps is not None and state.step >= opts.max_steps
        final = state.epoch == cfg.epochs or stopped
        row = {"stage": name, "epoch": state.epoch, "step": state.step, **opts.row_extra}
        for k, v in sums.items():
            row[k] = float(accelerator.reduce(v / max(count, 1), "mean"))
        if not all(math.isfinite(row[k]) for k in sums):
            raise FloatingPointError(f"[{name}] non-finite training metrics at epoch {state.epoch}: {row}")
        row.update(lr=lr, beta2=beta2, epoch_s=time.perf_counter() - start)
        if stage.eval_fn is not None:
            row.update(stage.eval_fn(unwrapped, state.epoch, final))
        state.rows.append(row)
        state.done = final
        checkpoint.save(opts.ckpt_dir, name, model=unwrapped, optimizer=optimizer, scheduler=scheduler, state=state,
                        accelerator=accelerator, beta2=beta2)
        if opts.on_epoch and accelerator.is_main_process:
            opts.on_epoch(row, replay=False)
        if final:
            break
    return state


def summary(row: Dict) -> str:
    keys = ("loss", "diff", "ce", "kd", "train_acc", "acc", "acc_probe", "acc_sample", "acc_sample_skip", "lr",
            "beta2")
    parts = [f"{k} {row[k]:.4g}" for k in keys if isinstance(row.get(k), float)]
    return f"[{row['stage']}] epoch {row['epoch']} step {row['step']}: " + ", ".join(parts)


__all__ = ["Stage", "RunOptions", "run_stage", "summary"]
