"""A CLIP zero-shot classification head: cosine logits against one text embedding per class.

VL2V's ``ClassificationHead(normalize=True)`` built from CLIP's zero-shot weights (``encode_class_prompts``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ZeroShotHead(nn.Module):
    """W: logits = logit_scale * normalize(z) @ normalize(T)^T, T = one CLIP text embedding per class.

    The class embeddings and the scale are buffers: they are saved with the student but no optimizer sees them
    (VL2V's ``ClassificationHead(normalize=True)`` from CLIP's zero-shot weights).
    """

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float = 100.0):
        super().__init__()
        if not isinstance(class_embeddings, torch.Tensor) or class_embeddings.dim() != 2:
            raise ValueError("ZeroShotHead: 'class_embeddings' must be a [num_classes, dim] tensor, got "
                             f"{getattr(class_embeddings, 'shape', type(class_embeddings).__name__)}")
        if not logit_scale > 0:
            raise ValueError(f"ZeroShotHead: 'logit_scale' must be > 0, got {logit_scale}")
        self.register_buffer("weight", F.normalize(class_embeddings.detach().float(), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"ZeroShotHead: input width {z.shape[-1]} != class embedding width {self.weight.shape[1]}")
        return self.logit_scale * F.normalize(z.float(), dim=-1) @ self.weight.t()


@torch.no_grad()
def encode_class_prompts(text_model, tokenizer, class_names: Sequence[str],
                         template: str = "a photo of a {}") -> torch.Tensor:
    """L2-normalised CLIP text embeddings [C, D] of ``template`` per class ('_' in a name reads as a space).

    ``text_model``: a transformers CLIPModel or CLIPTextModelWithProjection (its ``get_text_features`` /
    ``text_embeds`` is CLIP's joint-space text embedding).
    """
    if not class_names:
        raise ValueError("encode_class_prompts: 'class_names' is empty")
    if "{}" not in template:
        raise ValueError(f"encode_class_prompts: 'template' must contain '{{}}', got {template!r}")
    prompts = [template.format(c.replace("_", " ")) for c in class_names]
    device = next(text_model.parameters()).device
    tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").to(device)
    if hasattr(text_model, "get_text_features"):
        emb = text_model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        emb = getattr(emb, "pooler_output", emb)  # transformers 5 may return an output object
    else:
        emb = text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds
    return F.normalize(emb.float(), dim=-1)
