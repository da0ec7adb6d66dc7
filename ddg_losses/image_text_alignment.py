"""The image-text alignment loss: pull a feature towards an image embedding and its class text embedding.

Named for what it computes rather than for DDG, whose Stage I it is (VL2V's ``DFC_STAGE1``,
docs/methods/ddg.md §2.1): L = lmd * (-cos(z, v)) + (1 - lmd) * (-cos(z, t_y)), batch mean, with z the student's
projected feature, v the frozen CLIP image embedding and t_y the CLIP text embedding of the label's class prompt.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class ImageTextAlignmentLoss(nn.Module):
    """lmd-weighted negative cosine to the CLIP image embedding and to the class text embedding (fp32).

    Args:
        lmd: weight of the image term in [0, 1] (DDG/VL2V ``--lmd 0.5``); 1 - lmd weights the text term.
    """

    def __init__(self, lmd: float = 0.5):
        super().__init__()
        if not 0.0 <= lmd <= 1.0:
            raise ValueError(f"ImageTextAlignmentLoss: 'lmd' must be in [0, 1], got {lmd}")
        self.lmd = lmd

    def forward(self, z: torch.Tensor, image_embeddings: Optional[torch.Tensor],
                text_embeddings: torch.Tensor) -> torch.Tensor:
        """z, image_embeddings, text_embeddings: [B, D] (normalised here); image_embeddings may be None
        only when lmd = 0."""
        if z.dim() != 2:
            raise ValueError(f"ImageTextAlignmentLoss: 'z' must be [B, D], got {tuple(z.shape)}")
        if text_embeddings.shape != z.shape:
            raise ValueError(f"ImageTextAlignmentLoss: 'text_embeddings' must be {tuple(z.shape)} like 'z', "
                             f"got {tuple(text_embeddings.shape)}")
        z = F.normalize(z.float(), dim=-1)
        text_term = -(z * F.normalize(text_embeddings.float(), dim=-1)).sum(-1).mean()
        if self.lmd == 0.0:
            return text_term
        if image_embeddings is None or image_embeddings.shape != z.shape:
            raise ValueError(f"ImageTextAlignmentLoss: 'image_embeddings' must be {tuple(z.shape)} when lmd > 0, got "
                             f"{None if image_embeddings is None else tuple(image_embeddings.shape)}")
        image_term = -(z * F.normalize(image_embeddings.float(), dim=-1)).sum(-1).mean()
        return self.lmd * image_term + (1.0 - self.lmd) * text_term

    def extra_repr(self) -> str:
        return f"lmd={self.lmd}"
