"""DINOv2 ViT-B/14 (facebook/dinov2-base): one of the image embedders of DP-DMD's diversity protocol
(docs/methods/dpdmd.md §4: 1 - mean pairwise cosine of the embeddings of one prompt's images).

``MODEL`` is the released ``config.json`` (Dinov2Model), ``PROCESSOR`` its ``preprocessor_config.json``
(BitImageProcessor: resize the short side to 256, centre-crop 224, ImageNet mean/std).
"""
from __future__ import annotations

from typing import Dict

MODEL: Dict = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14,
                   image_size=518, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True)

PROCESSOR: Dict = dict(do_resize=True, size={"shortest_edge": 256}, do_center_crop=True,
                       crop_size={"height": 224, "width": 224}, do_normalize=True,
                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])

SMOKE_CUTS: Dict = {"num_hidden_layers": 1}  # width, heads and patch size kept; one block is enough to embed
