"""Decoded images in the VAE's [-1, 1] range -> a classifier's input (the preprocessing of DDIS' DAG guidance
and of its class-token cross-entropy)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESIZE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


class ClassifierPreprocess(nn.Module):
    """VAE output in [-1, 1] -> classifier input: ``clamp((x + 1) / 2, 0, 1)``, resize, normalise.

    ``ClassifierPreprocess.ddis_code()`` is what the released DDIS code does before the classifier in DAG
    (nearest resize to 224, no normalisation); ``ClassifierPreprocess.imagenet()`` is the principled variant
    (antialiased bilinear resize to 224 and ImageNet mean/std), which the project also uses for the CAT
    cross-entropy instead of the reference's CIFAR branch (its bug 2).

    Args:
        size: output side (int) or (H, W); None keeps the decoded size.
        mode: ``F.interpolate`` mode; ``antialias`` only with 'bilinear' / 'bicubic'.
        mean, std: per-channel normalisation applied after resizing; None for none.
        clamp: clamp to [0, 1] (zeroes the gradient on saturated pixels).
    """

    def __init__(self, size: Optional[Union[int, Tuple[int, int]]] = None, mode: str = "nearest",
                 antialias: bool = False, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, clamp: bool = True):
        super().__init__()
        name = "ClassifierPreprocess"
        if size is not None:
            sizes = (size, size) if isinstance(size, int) else tuple(size)
            if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
                raise ValueError(f"{name}: 'size' must be a positive int or (H, W), got {size!r}")
            size = sizes
        if mode not in _RESIZE_MODES:
            raise ValueError(f"{name}: 'mode' must be one of {_RESIZE_MODES}, got {mode!r}")
        if antialias and mode not in ("bilinear", "bicubic"):
            raise ValueError(f"{name}: 'antialias' needs mode 'bilinear' or 'bicubic', got mode {mode!r}")
        if (mean is None) != (std is None):
            raise ValueError(f"{name}: give both 'mean' and 'std' or neither, got mean={mean!r}, std={std!r}")
        if mean is not None:
            if len(mean) != len(std) or not all(s > 0 for s in std):
                raise ValueError(f"{name}: 'mean' and 'std' must have one value per channel and std > 0, got "
                                 f"mean={tuple(mean)}, std={tuple(std)}")
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        else:
            self.mean = self.std = None
        self.size, self.mode, self.antialias, self.clamp = size, mode, bool(antialias), bool(clamp)

    @classmethod
    def ddis_code(cls, size: int = 224) -> "ClassifierPreprocess":
        return cls(size=size, mode="nearest")

    @classmethod
    def imagenet(cls, size: int = 224) -> "ClassifierPreprocess":
        return cls(size=size, mode="bilinear", antialias=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def forward(self, decoded: torch.Tensor) -> torch.Tensor:
        if not isinstance(decoded, torch.Tensor) or decoded.dim() != 4 or not decoded.is_floating_point():
            raise ValueError(f"ClassifierPreprocess: input must be a floating [N, C, H, W] image batch in [-1, 1], "
                             f"got {getattr(decoded, 'dtype', type(decoded).__name__)} of shape "
                             f"{tuple(getattr(decoded, 'shape', ()))}")
        x = decoded / 2 + 0.5
        if self.clamp:
            x = x.clamp(0, 1)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            kwargs = {"antialias": True} if self.antialias else {}
            if self.mode in ("bilinear", "bicubic"):
                kwargs["align_corners"] = False
            x = F.interpolate(x, size=self.size, mode=self.mode, **kwargs)
        if self.mean is not None:
            if x.shape[1] != self.mean.shape[1]:
                raise ValueError(f"ClassifierPreprocess: input has {x.shape[1]} channels, 'mean'/'std' have "
                                 f"{self.mean.shape[1]}")
            x = (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)
        return x

    def extra_repr(self) -> str:
        norm = "none" if self.mean is None else f"mean={tuple(self.mean.flatten().tolist())}"
        return f"size={self.size}, mode={self.mode!r}, antialias={self.antialias}, clamp={self.clamp}, norm={norm}"
