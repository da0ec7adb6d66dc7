"""PromptEncoder against diffusers' own encode_prompt (StableDiffusionPipeline with a CLIP text encoder;
StableDiffusion3Pipeline with CLIP-L/G and with or without T5) on tiny random-weight encoders built from configs;
autograd as the caller. VAECodec: scaling and shift factors, posterior mean or draw, the decode / encode round trip,
images in [0, 1], a bf16 VAE served fp32 input; bad inputs."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import AutoencoderKL  # noqa: E402

from ddg_models import PromptEncoder, VAECodec  # noqa: E402
from ddg_ops.testing import TOLERANCES, magnitude  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["a", "photo", "of", "cat", "dog", "sketch", "painting", "very", "long"]
PROMPTS = ["a photo of a cat", "a sketch of a dog", "", "a very very very long long long photo of a cat dog"]


def tokenizer(tmp_path, name, max_length=16):
    from examples.common.tiny_text import build_word_tokenizer

    return build_word_tokenizer(WORDS, tmp_path / name, max_length=max_length)


def clip_with_projection(tok, hidden, seed):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                            num_attention_heads=2, projection_dim=hidden, max_position_embeddings=tok.model_max_length,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return CLIPTextModelWithProjection(config).eval()


def test_clip_layout_matches_stable_diffusion_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from examples.common.tiny_text import tiny_text_encoder

    tok = tokenizer(tmp_path, "tok", max_length=8)  # the long prompt is truncated
    torch.manual_seed(0)
    text = tiny_text_encoder(tok, hidden_size=16, layers=2, projection_dim=16).eval()
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=tok, unet=None, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    encoder = PromptEncoder.clip(tok, text)
    with torch.no_grad():
        ours = encoder(PROMPTS)
        pe, npe = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        negative = encoder([""] * len(PROMPTS))
    assert set(ours) == {"encoder_hidden_states"}
    torch.testing.assert_close(ours["encoder_hidden_states"], pe, rtol=0, atol=0)
    torch.testing.assert_close(negative["encoder_hidden_states"], npe, rtol=0, atol=0)
    ids = encoder.token_ids(PROMPTS)
    assert ids.shape == (4, 8)
    torch.testing.assert_close(encoder.encode_ids(ids[1:3])["encoder_hidden_states"], pe[1:3], rtol=0, atol=0)
    # autograd as the caller: a trainable text encoder gets a gradient
    text.requires_grad_(True)
    encoder(["a cat"])["encoder_hidden_states"].sum().backward()
    assert text.get_input_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("with_t5", [False, True])
def test_sd3_layout_matches_stable_diffusion3_pipeline(tmp_path, with_t5):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    tok_l, tok_g = tokenizer(tmp_path, "l", 10), tokenizer(tmp_path, "g", 10)
    clip_l, clip_g = clip_with_projection(tok_l, 16, 1), clip_with_projection(tok_g, 24, 2)
    tok_t5 = t5 = None
    if with_t5:
        tok_t5 = tokenizer(tmp_path, "t5", 10)
        torch.manual_seed(3)
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok_t5), d_model=64, d_kv=8, d_ff=64, num_layers=1,
                                     num_heads=2)).eval()
    torch.manual_seed(4)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=3, joint_attention_dim=64,
                                        caption_projection_dim=24, pooled_projection_dim=40, pos_embed_max_size=8)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g,
                                    text_encoder_3=t5, tokenizer_3=tok_t5)
    encoder = PromptEncoder.from_pipeline(pipe, max_sequence_length=12)
    assert encoder.layout == "sd3"
    with torch.no_grad():
        ours, negative = encoder(PROMPTS), encoder([""] * len(PROMPTS))
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt=[""] * 4,
                                                      max_sequence_length=12)
    assert ours["encoder_hidden_states"].shape == (4, 10 + 12, 64) and ours["pooled_projections"].shape == (4, 40)
    for got, expected in ((ours["encoder_hidden_states"], pe), (ours["pooled_projections"], pooled),
                          (negative["encoder_hidden_states"], npe), (negative["pooled_projections"], npooled)):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert bool((ours["encoder_hidden_states"][:, 10:] == 0).all()) == (not with_t5)
    # the conditioning drives the transformer it was built for
    out = transformer(torch.randn(4, 16, 8, 8), timestep=torch.full((4,), 500.0), return_dict=False, **ours)[0]
    assert out.shape == (4, 16, 8, 8)


def test_prompt_encoder_bad_inputs(tmp_path):
    from examples.common.tiny_text import tiny_text_encoder

    tok = tokenizer(tmp_path, "tok")
    encoder = PromptEncoder.clip(tok, tiny_text_encoder(tok, hidden_size=16, layers=1, projection_dim=16))
    with pytest.raises(TypeError, match="PromptEncoder: 'prompts' must be a non-empty list of str"):
        encoder("a cat")
    with pytest.raises(TypeError, match="PromptEncoder: 'prompts' must be a non-empty list of str"):
        encoder([])
    with pytest.raises(ValueError, match="PromptEncoder.encode_ids: 'ids' must be integer token ids"):
        encoder.encode_ids(torch.zeros(2, 16))
    with pytest.raises(ValueError, match="PromptEncoder: 'layout' must be one of"):
        PromptEncoder("t5", [tok], [None])
    with pytest.raises(ValueError, match="PromptEncoder.sd3: 'joint_attention_dim'"):
        PromptEncoder.sd3(tok, encoder.text_encoder, tok, encoder.text_encoder, joint_attention_dim=0)
    with pytest.raises(ValueError, match="PromptEncoder.sd3: give both T5's tokenizer and encoder"):
        PromptEncoder.sd3(tok, encoder.text_encoder, tok, encoder.text_encoder, tok, None, joint_attention_dim=8)
    sd3 = PromptEncoder.sd3(tok, encoder.text_encoder, tok, encoder.text_encoder, joint_attention_dim=8)
    with pytest.raises(ValueError, match="PromptEncoder.token_ids: only the 'clip' layout"):
        sd3.token_ids(["a"])


# ------------------------------------------------------------------------------------ VAE codec
def tiny_vae(dtype=torch.float32, shift=0.1):
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.7,
                         shift_factor=shift).eval().to(dtype)


@pytest.mark.parametrize("shift", [None, 0.1])
def test_codec_scaling_shift_and_round_trip(shift):
    vae = tiny_vae(shift=shift)
    codec = VAECodec(vae)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z = codec.encode(x)
        torch.testing.assert_close(z, (posterior.mean - (shift or 0.0)) * 0.7, rtol=0, atol=0)
        drawn = codec.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(drawn, (posterior.sample(generator=torch.Generator().manual_seed(5)) -
                                           (shift or 0.0)) * 0.7)
        latents = torch.randn(3, 4, 8, 8)
        torch.testing.assert_close(codec.decode(latents), vae.decode(latents / 0.7 + (shift or 0.0)).sample)
        # decode inverts encode's scaling: decode(encode(x)) = D(posterior mean)
        torch.testing.assert_close(codec.decode(z), vae.decode(posterior.mean).sample, rtol=1e-5, atol=1e-5)
        images = codec.to_images(latents)
        assert images.min() >= 0 and images.max() <= 1
        torch.testing.assert_close(images, (codec.decode(latents) / 2 + 0.5).clamp(0, 1))
    recon, post = codec.reconstruct(x, generator=torch.Generator().manual_seed(6))
    assert recon.shape == x.shape and recon.requires_grad and post.mean.shape == (3, 4, 8, 8)


def test_bf16_codec_takes_fp32_and_returns_fp32():
    vae = tiny_vae(torch.bfloat16)
    codec = VAECodec(vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.no_grad():
        z = codec.encode(x)
        z_ref = (vae.encode(x.bfloat16()).latent_dist.mean.float() - 0.1) * 0.7
    atol, rtol = TOLERANCES[torch.bfloat16]
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, z_ref, atol=atol * magnitude(z_ref), rtol=rtol)
    images = codec.decode(latents)
    assert images.dtype == torch.float32
    (g,) = torch.autograd.grad(images.sum(), latents)  # autograd as the caller, through the bf16 decoder
    assert g.dtype == torch.float32 and g.abs().sum() > 0


def test_codec_bad_inputs():
    codec = VAECodec(tiny_vae())
    with pytest.raises(TypeError, match="VAECodec: 'vae' must be an autoencoder"):
        VAECodec(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"VAECodec.encode: 'images' must be a floating \[B, 3, H, W\]"):
        codec.encode(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="VAECodec.decode: 'latents' must be a floating"):
        codec.decode(torch.zeros(2, 4, 8, dtype=torch.float32))
