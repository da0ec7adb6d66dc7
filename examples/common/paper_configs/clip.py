"""OpenAI CLIP configs (transformers' CLIPModel folders): ViT-L/14 (openai/clip-vit-large-patch14; DDG's teacher,
and the text tower of Stable Diffusion v1.x) and ViT-B/16 (openai/clip-vit-base-patch16; DDG's student backbone),
with the depth cuts of the CPU smoke presets.

Sources: the model cards' ``config.json`` (text_config / vision_config / projection_dim), which match the OpenAI
release's ``embed_dim``, ``vision_width``, ``vision_layers``, ``vision_patch_size``, ``transformer_width``,
``transformer_heads``, ``transformer_layers`` (heads of a vision tower = width / 64). The cut keeps widths, heads,
patch sizes and projection widths; it drops layers (one per tower) and, where asked, the image size.
"""
from __future__ import annotations

from typing import Dict

VIT_L_14: Dict = dict(
    projection_dim=768,
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, image_size=224, hidden_act="quick_gelu", projection_dim=768),
)
VIT_B_16: Dict = dict(
    projection_dim=512,
    text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=512),
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                patch_size=16, image_size=224, hidden_act="quick_gelu", projection_dim=512),
)
CLIP_MODELS = {"ViT-L/14": VIT_L_14, "ViT-B/16": VIT_B_16}


def smoke_clip_config(name: str, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                      image_size: int = 224, layers: int = 1):
    """A transformers CLIPConfig of ``name`` ('ViT-L/14' or 'ViT-B/16') with ``layers`` layers per tower, the
    given image size and the smoke tokenizer's vocabulary."""
    from transformers import CLIPConfig

    if name not in CLIP_MODELS:
        raise ValueError(f"smoke_clip_config: 'name' must be one of {sorted(CLIP_MODELS)}, got {name!r}")
    spec = CLIP_MODELS[name]
    patch = spec["vision"]["patch_size"]
    if not isinstance(image_size, int) or image_size < patch or image_size % patch:
        raise ValueError(f"smoke_clip_config: 'image_size' must be a multiple of the patch size {patch}, "
                         f"got {image_size!r}")
    text = {**spec["text"], "num_hidden_layers": layers, "vocab_size": vocab_size, "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    vision = {**spec["vision"], "num_hidden_layers": layers, "image_size": image_size}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"])
