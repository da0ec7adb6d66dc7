"""Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base, 512x512, epsilon prediction): the configs of
its diffusers folder, and depth-cut copies for the CPU smoke presets.

Sources (the model's files on the Hugging Face Hub, as diffusers/transformers write them):

* ``unet/config.json``: UNet2DConditionModel, block_out_channels 320/640/1280/1280, attention_head_dim
  [5, 10, 20, 20] (per-level head counts: diffusers' legacy name for the number of heads, 64 channels each),
  cross_attention_dim 1024, use_linear_projection true, upcast_attention false, layers_per_block 2,
  norm_num_groups 32, norm_eps 1e-5, three CrossAttnDownBlock2D + DownBlock2D (mirrored up), sample_size 64.
* ``vae/config.json``: AutoencoderKL as Stable Diffusion v1's (CompVis/stable-diffusion-v1-4 ``vae``):
  block_out_channels 128/256/512/512, layers_per_block 2, latent_channels 4, norm_num_groups 32,
  scaling_factor 0.18215.
* ``text_encoder/config.json``: the OpenCLIP ViT-H/14 text tower as a transformers CLIPTextModel: hidden_size
  1024, intermediate_size 4096, 16 heads, 23 layers (OpenCLIP's 24 minus the last: SD 2 conditions on the
  penultimate layer), gelu, max_position_embeddings 77, vocab_size 49408, projection_dim 512, bos/eos/pad 0/2/1.
* ``scheduler/scheduler_config.json``: PNDMScheduler, scaled_linear betas 0.00085 .. 0.012 over 1000 steps,
  skip_prk_steps true, steps_offset 1, set_alpha_to_one false, clip_sample false, prediction_type epsilon.

The smoke configs keep every width, head count, context dim, prediction type and scheduler setting and cut
depth: ``levels`` of the UNet (the first ones, cross-attention levels) and of the VAE, one resnet/transformer
layer per block, ``text_layers`` text-encoder layers, a small latent grid.
"""
from __future__ import annotations

from typing import Dict

UNET: Dict = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20), dual_cross_attention=False, use_linear_projection=True,
    upcast_attention=False, num_class_embeds=None, resnet_time_scale_shift="default")

VAE: Dict = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215)

TEXT_ENCODER: Dict = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
    initializer_range=0.02, initializer_factor=1.0, projection_dim=512, bos_token_id=0, eos_token_id=2,
    pad_token_id=1)

SCHEDULER: Dict = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", trained_betas=None,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")


def smoke_unet(levels: int = 2, sample_size: int = 8) -> Dict:
    """The UNet's first ``levels`` levels (all cross-attention, as SD 2's first three), one layer per block."""
    if not 1 <= levels <= 3:
        raise ValueError(f"smoke_unet: 'levels' must be in [1, 3] (the cross-attention levels), got {levels}")
    return dict(UNET, sample_size=sample_size, layers_per_block=1,
                block_out_channels=UNET["block_out_channels"][:levels],
                attention_head_dim=UNET["attention_head_dim"][:levels],
                down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels)


def smoke_vae(levels: int = 2, sample_size: int = 16) -> Dict:
    """The VAE's first ``levels`` levels (each level past the first halves the image: 2 levels -> x2)."""
    if not 1 <= levels <= 4:
        raise ValueError(f"smoke_vae: 'levels' must be in [1, 4], got {levels}")
    return dict(VAE, block_out_channels=VAE["block_out_channels"][:levels], layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                sample_size=sample_size)


def smoke_text_encoder(vocab_size: int, text_layers: int = 1) -> Dict:
    """The text tower with ``text_layers`` layers and the vocabulary of a locally built tokenizer."""
    if text_layers < 1:
        raise ValueError(f"smoke_text_encoder: 'text_layers' must be >= 1, got {text_layers}")
    return dict(TEXT_ENCODER, vocab_size=vocab_size, num_hidden_layers=text_layers)
