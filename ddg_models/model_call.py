"""One calling convention for the denoisers of the distillation modules.

``model_prediction(model, x, timestep, cond)`` calls ``model(x, timestep=timestep, **cond)`` and returns the
prediction tensor. That one call fits diffusers' SD3Transformer2DModel (``hidden_states`` first;
cond = {encoder_hidden_states, pooled_projections}), UNet2DConditionModel (``sample`` first;
cond = {encoder_hidden_states}) and any plain module ``forward(x, timestep, **cond)``, also when
they are wrapped by DDP/FSDP (no isinstance test on the model class).
"""
from __future__ import annotations

from typing import Mapping

import torch

Conditioning = Mapping[str, torch.Tensor]


def model_prediction(model, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The model's prediction at (x, timestep) under conditioning ``cond`` (a dict of [B, ...] tensors)."""
    if not isinstance(cond, Mapping):
        raise TypeError(f"model_prediction: 'cond' must be a mapping of keyword tensors (e.g. "
                        f"encoder_hidden_states), got {type(cond).__name__}")
    out = model(x, timestep=timestep, **cond)
    if hasattr(out, "sample"):  # diffusers output dataclasses (return_dict=True)
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise ValueError(f"model_prediction: the model must return a tensor shaped like its input "
                         f"{tuple(x.shape)}, got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    return out


def concat_conditions(first: Conditioning, second: Conditioning) -> dict:
    """Batch-concatenate two conditionings key by key ([uncond; cond] for one CFG call)."""
    if set(first) != set(second):
        raise ValueError(f"concat_conditions: both conditionings need the same keys, got {sorted(first)} and "
                         f"{sorted(second)}")
    return {k: torch.cat([first[k], second[k]]) for k in first}


def batch_timestep(value, x: torch.Tensor) -> torch.Tensor:
    """A number or a [B]/0-D tensor as a float32 [B] timestep tensor on x's device."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"batch_timestep: a timestep must be a number or hold one value per sample "
                         f"({x.shape[0]}), got shape {tuple(t.shape)}")
    return t.expand(x.shape[0])
