"""A tiny SD3.5-style pipeline folder for the CPU smoke run and the tests (nothing downloaded).

``build_tiny_sd3(directory)`` writes what ``StableDiffusion3Pipeline.from_pretrained`` reads from an
SD3.5-Medium download, with real diffusers / transformers classes at toy sizes: an SD3Transformer2DModel
(dual attention in its first block, as SD3.5), a 16-channel AutoencoderKL with SD3's shift/scaling,
FlowMatchEulerDiscreteScheduler(shift=3), two CLIP tokenizers + CLIPTextModelWithProjection. The T5
encoder is left out (``text_encoder_3 = None``: the pipeline then feeds zeros for its tokens, which
diffusers supports). Also a tiny CLIP vision model (the diversity metric) and a prompt file.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..common.tiny_text import build_word_tokenizer

WORDS = ("a", "photo", "of", "red", "blue", "green", "cat", "dog", "bird", "house", "tree", "car", "on", "the",
         "beach", "street", "painting", "small", "large")
PROMPTS = ("a photo of a red cat", "a painting of a blue house", "a green tree on the beach",
           "a small dog on the street", "a large bird", "a photo of a car")


def _clip_text(tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, projection_dim=projection,
                            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config)


def build_tiny_sd3(directory: Path, resolution: int = 32, seed: int = 0) -> Path:
    """Write the tiny pipeline to ``directory`` (plus ``clip_vision/`` and ``prompts.txt``); returns it."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    directory = Path(directory)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocab:  # the pipeline's save_pretrained keeps its own copy
        tokenizer = build_word_tokenizer(WORDS, Path(vocab), max_length=16)
    text, text_2 = _clip_text(tokenizer, 16, 16), _clip_text(tokenizer, 16, 16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=resolution,
                        scaling_factor=1.5305, shift_factor=0.0609)
    latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    transformer = SD3Transformer2DModel(sample_size=latent, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                                        pos_embed_max_size=latent, dual_attention_layers=(0,), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text, tokenizer=tokenizer, text_encoder_2=text_2,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(directory)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    vision.save_pretrained(directory / "clip_vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory / "clip_vision")
    (directory / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return directory
