"""Image embeddings from a local CLIP or DINOv2 vision model, for sample-diversity metrics.

As DP-DMD's evaluation (docs/methods/dpdmd.md §4): for a CLIP vision tower the CLS token of
``last_hidden_state`` (before the projection); for DINOv2 (or any other AutoModel) ``pooler_output``,
or the token mean when the model has none. Embeddings are fp32 and L2-normalised.
"""
from __future__ import annotations

from pathlib import Path

import torch


class VisionEmbedder:
    def __init__(self, path: Path, device="cpu"):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"VisionEmbedder: no model at {path} (expected a local CLIP vision or DINOv2 "
                                    "folder with config.json and preprocessor_config.json)")
        config = AutoConfig.from_pretrained(path)
        self.is_clip = config.model_type in ("clip", "clip_vision_model")
        model_cls = CLIPVisionModel if self.is_clip else AutoModel
        self.model = model_cls.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] images in [0, 1] -> [N, D] L2-normalised fp32 embeddings."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"VisionEmbedder: 'images' must be [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        pixels = self.processor(images=images.float().clamp(0, 1).cpu(), return_tensors="pt",
                                do_rescale=False)["pixel_values"].to(self.device)
        out = self.model(pixel_values=pixels)
        if self.is_clip:
            emb = out.last_hidden_state[:, 0]
        else:
            pooled = getattr(out, "pooler_output", None)
            emb = pooled if pooled is not None else out.last_hidden_state.mean(dim=1)
        return torch.nn.functional.normalize(emb.float(), dim=-1)
