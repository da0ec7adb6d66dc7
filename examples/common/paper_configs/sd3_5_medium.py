"""Stable Diffusion 3.5 Medium (stabilityai/stable-diffusion-3.5-medium), the DP-DMD teacher and student.

Each dict is the ``config.json`` of one folder of the released diffusers pipeline (the keys a constructor takes;
``_class_name`` / ``_diffusers_version`` left out): ``transformer/``, ``vae/``, ``scheduler/``, ``text_encoder/``
(CLIP ViT-L/14 text tower with projection), ``text_encoder_2/`` (OpenCLIP bigG/14 text tower with projection) and
``text_encoder_3/`` (T5 v1.1 XXL encoder). Sources: the model card and the folders' config.json files; the
SD3.5 blog post of diffusers (QK RMS-norm, dual attention in the first 13 blocks: their ``attn2.*`` weights and the
9-wide ``norm1.linear`` of those blocks); SD3's text-encoder setup (CLIP-L 768 + CLIP-G 1280 hidden states of the
penultimate layer, concatenated to 2048 and zero-padded to the 4096 of T5; pooled 768 + 1280 = 2048).

``SMOKE_CUTS`` is what the CPU preset cuts, and why. Everything else (widths, heads, head dims, context and
pooled dims, patch size, latent channels, QK norm, the VAE's scaling/shift factors, the scheduler's shift, the
activation functions) is the released value.
"""
from __future__ import annotations

from typing import Dict

TRANSFORMER: Dict = dict(  # transformer/config.json: 2.5B parameters
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24,              # 24 x 64 = 1536 wide
    joint_attention_dim=4096,                                    # T5-XXL width: CLIP states are zero-padded to it
    caption_projection_dim=1536, pooled_projection_dim=2048,     # pooled = CLIP-L 768 + CLIP-G 1280
    pos_embed_max_size=384, qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),                      # MMDiT-X: blocks 0..12 attend the image twice
)

VAE: Dict = dict(  # vae/config.json (the SD3 autoencoder, 16 latent channels)
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, act_fn="silu",
    scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024, force_upcast=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)

SCHEDULER: Dict = dict(num_train_timesteps=1000, shift=3.0)  # scheduler/scheduler_config.json (FlowMatchEuler)

CLIP_L: Dict = dict(  # text_encoder/config.json (CLIPTextModelWithProjection, openai/clip-vit-large-patch14)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)

CLIP_G: Dict = dict(  # text_encoder_2/config.json (CLIPTextModelWithProjection, laion CLIP-ViT-bigG-14)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    projection_dim=1280, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
)

T5_XXL: Dict = dict(  # text_encoder_3/config.json (T5EncoderModel, google/t5-v1_1-xxl)
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, layer_norm_epsilon=1e-6,
)

MAX_SEQUENCE_LENGTH = 256  # T5 tokens of the DP-DMD launch (the pipeline's default)

SMOKE_CUTS: Dict = {
    # one MMDiT-X block (with its dual attention, as block 0 of the release): ~90M parameters instead of 2.5B
    "transformer.num_layers": 1,
    "transformer.dual_attention_layers": (0,),
    # the sin-cos table is a persistent [1, 384^2, 1536] buffer (0.9 GB per copy, three copies); 16 covers the
    # smoke latents (64 px images: 8 x 8 latents, 4 x 4 patches), the crop a 64 px image takes of any table
    "transformer.pos_embed_max_size": 16,
    "transformer.sample_size": 8,
    "vae.layers_per_block": 1,               # the four resolution levels (and so the x8 factor) are kept
    "vae.sample_size": 64,
    # CLIP: two layers, because SD3 reads the penultimate layer's states; vocabulary of the local word tokenizer
    "clip.num_hidden_layers": 2,
    # T5-XXL is left out: even one layer is 4096 x 32128 embeddings + a 4096 x 10240 gated FFN (~0.5 GB), and
    # the pipeline runs without it exactly as a user's launch without text_encoder_3/ does (zeros for its tokens)
    "text_encoder_3": None,
    "max_sequence_length": 8,                # the zero T5 tokens that remain
}
