"""Load a registered classifier's checkpoint: the trainers' wrapper dicts, DataParallel prefixes,
RepDistiller's VGG head name, torchvision files from before BatchNorm counted its batches, and safetensors
files, with an error naming every key that does not fit."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from .registry import build_classifier

# Where trainers nest the weights inside a saved dict (RepDistiller: {'model': ..., 'epoch': ...}).
_WRAPPER_KEYS = ("model", "state_dict", "net")


def _unwrap(checkpoint: object, path: Path) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"load_classifier: {path} holds a {type(checkpoint).__name__}, not a state_dict")
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    raise ValueError(f"load_classifier: {path} is neither a state_dict nor a dict with one under "
                     f"{'/'.join(map(repr, _WRAPPER_KEYS))}; its top-level keys: {sorted(map(str, checkpoint))}")


def _strip_dataparallel(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the 'module.' prefix that (Distributed)DataParallel puts on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _rename_classifier(state: Dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """RepDistiller's VGG calls its final layer 'classifier' where these models say 'fc'."""
    renamed = {}
    for k, v in state.items():
        if k.startswith("classifier.") and k not in expected and "fc." + k[len("classifier."):] in expected:
            k = "fc." + k[len("classifier."):]
        renamed[k] = v
    return renamed


def _fill_batch_counters(state: Dict[str, torch.Tensor],
                         expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Add the ``num_batches_tracked`` counters a file lacks (torchvision's older ResNet files: BatchNorm counts
    batches only since torch 0.4.1). The counter only matters for BatchNorm with ``momentum=None``; torch's own
    strict load fills it in the same way (with the module's current value)."""
    filled = dict(state)
    for k, v in expected.items():
        bn = k[:-len("num_batches_tracked")]
        if k.endswith("num_batches_tracked") and k not in filled and bn + "running_mean" in state:
            filled[k] = v.clone()
    return filled


def _read(path: Path, map_location) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    return torch.load(path, map_location=map_location, weights_only=True)


def _listing(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_classifier(name: str, path: Union[str, Path], num_classes: Optional[int] = None,
                    map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Build classifier ``name`` and load the weights saved at ``path``; returned in eval mode.

    The file (``torch.save`` or ``.safetensors``) may hold a plain state_dict or a dict with it under
    'model', 'state_dict' or 'net' (RepDistiller's ``ckpt_epoch_240.pth``). A uniform 'module.' prefix is
    stripped and RepDistiller's VGG 'classifier.*' keys map to 'fc.*'; BatchNorm counters
    ('num_batches_tracked') absent from older torchvision files are filled in, as torch's strict load does.
    ``num_classes`` defaults to the number of rows of the checkpoint's final layer. Any missing, unexpected or
    mis-shaped key is an error that names them.
    """
    path = Path(path)
    state = _strip_dataparallel(_unwrap(_read(path, map_location), path))
    if num_classes is None:
        head = state.get("fc.weight", state.get("classifier.weight"))
        if head is None:
            raise ValueError(f"load_classifier: cannot infer num_classes from {path} (no fc.weight); pass it")
        num_classes = head.shape[0]
    model = build_classifier(name, num_classes)
    expected = model.state_dict()
    state = _fill_batch_counters(_rename_classifier(state, expected), expected)
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        problems = [f"{label}: {_listing(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshaped))
                    if keys]
        raise ValueError(f"load_classifier: {path} does not fit {name!r} with {num_classes} classes; "
                         + "; ".join(problems))
    model.load_state_dict(state)
    return model.eval()
