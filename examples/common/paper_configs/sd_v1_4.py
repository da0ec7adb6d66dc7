"""Stable Diffusion v1.4 (CompVis/stable-diffusion-v1-4, the diffusers folder layout): the configs of its UNet, VAE,
noise scheduler and CLIP ViT-L/14 text encoder, and the depth cuts the CPU smoke presets take.

Sources: the ``config.json`` files of the model card's diffusers folder (``unet/``, ``vae/``, ``scheduler/``,
``text_encoder/``), which are the configs of the CompVis ``v1-inference.yaml`` (model_channels 320, channel_mult
1,2,4,4, num_heads 8, context_dim 768, first-stage ch 128, ch_mult 1,2,4,4, z_channels 4, scale_factor 0.18215,
linear_start 0.00085, linear_end 0.012). What the cut keeps: every width, head count, the cross-attention width,
the latent channels and scaling, the prediction type and the noise schedule; what it drops: depth (UNet and VAE
levels, layers per block, text-encoder layers) and the sample size.
"""
from __future__ import annotations

from typing import Dict

# unet/config.json
UNET: Dict = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=8,  # diffusers' name for 8 heads per layer
    cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
)
# vae/config.json
VAE: Dict = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
# scheduler/scheduler_config.json (a PNDMScheduler config; DDPM training uses the same betas)
SCHEDULER: Dict = dict(
    _class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True,
    steps_offset=1, clip_sample=False, trained_betas=None,
)
# text_encoder/config.json: CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14)
TEXT_ENCODER: Dict = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
TOKENIZER_MAX_LENGTH = 77  # tokenizer/tokenizer_config.json model_max_length


def smoke_unet() -> Dict:
    """The UNet cut to its first two levels (320 and 640 channels, both cross-attention levels of SD's first
    half; SD's third level is cross-attention too, the fourth plain), one layer per block; mid block, heads,
    cross-attention width and everything else as SD v1.4."""
    return {**UNET, "block_out_channels": (320, 640), "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "sample_size": 8}


def smoke_vae() -> Dict:
    """The first two levels (128 and 256 channels: the latent is 1/2 of the image instead of SD's 1/8), one
    layer per block; the 512-channel levels alone would be 55 of the cut VAE's 59M parameters, and DDG only
    encodes (the decoder is never run). Latent channels and scaling as SD v1.4."""
    return {**VAE, "block_out_channels": (128, 256), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "sample_size": 16}


def smoke_text_encoder(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> Dict:
    """One of the twelve layers; the vocabulary is the smoke tokenizer's (CLIP's 49408 BPE entries are not
    needed for generated prompts)."""
    return {**TEXT_ENCODER, "num_hidden_layers": 1, "vocab_size": vocab_size, "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
