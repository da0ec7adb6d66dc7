"""DDG's student: a backbone f, a projection P into the CLIP text space and a frozen zero-shot head W.

logits = W(P(f(x))) (docs/methods/ddg.md §2.0, VL2V's ``DFC_STAGE1``). The backbone (``vision_backbones``) also
returns its token sequence for the visual-token conditioning adapter (``student_conditioning``).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .zero_shot_head import ZeroShotHead


class DDGStudent(nn.Module):
    """f -> P -> W. ``forward(x)`` gives logits; ``encode(x)`` gives (logits, z, tokens) for the DDG losses.

    Args:
        backbone: a module whose forward returns (pooled [B, out_dim], tokens [B, N, token_dim]) and which has
            ``out_dim`` / ``token_dim`` attributes (the classes of ``build_backbone``).
        head: the ZeroShotHead; its embedding width is the projection's output width (d_clip).
    """

    def __init__(self, backbone: nn.Module, head: ZeroShotHead):
        super().__init__()
        for attr in ("out_dim", "token_dim"):
            if not isinstance(getattr(backbone, attr, None), int):
                raise TypeError(f"DDGStudent: 'backbone' must have an int attribute {attr!r} "
                                f"({type(backbone).__name__} has not)")
        if not isinstance(head, ZeroShotHead):
            raise TypeError(f"DDGStudent: 'head' must be a ZeroShotHead, got {type(head).__name__}")
        self.backbone = backbone
        self.projection = nn.Linear(backbone.out_dim, head.weight.shape[1])
        self.head = head

    @property
    def embed_dim(self) -> int:
        return self.head.weight.shape[1]

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, C], z = P(f(x)) [B, d_clip] unnormalised, tokens [B, N, token_dim])."""
        pooled, tokens = self.backbone(x)
        z = self.projection(pooled)
        return self.head(z), z, tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]

    def featurizer_parameters(self):
        """The backbone's trainable parameters (a frozen-BN ResNet leaves its BatchNorm out)."""
        return getattr(self.backbone, "trainable_parameters", self.backbone.parameters)()

    def projection_parameters(self):
        return self.projection.parameters()
