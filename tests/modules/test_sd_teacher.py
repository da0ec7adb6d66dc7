"""The frozen SD teacher: the domain-debiasing CFG prediction against hand-combined UNet calls (both negative
branches), gradients only into the conditioning, posterior-mean latents, loading from a local folder."""
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ddg_models import (DDGStudent, ProbabilityWeightedPromptAdapter, StableDiffusionTeacher,  # noqa: E402
                        StudentConditioning, ZeroShotHead, images_to_sd)
from ddg_models.vision_backbones import CLIPVisionBackbone  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["a", "photo", "of", "cat", "dog", "sketch", "painting"]


def tiny_teacher(tmp_path, words=WORDS) -> StableDiffusionTeacher:
    """A 3-channel 16x16 SD stack (VAE 16 -> 8x8 latents, UNet, DDPM, 16-wide CLIP text encoder)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from examples.common.tiny_text import build_word_tokenizer, tiny_text_encoder

    torch.manual_seed(0)
    tok = build_word_tokenizer(words, tmp_path / "tok", max_length=8)
    text = tiny_text_encoder(tok, hidden_size=16, layers=1, projection_dim=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16, mid_block_add_attention=False)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type=None,
                                cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    return StableDiffusionTeacher(vae, unet, scheduler, text, tok)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("sd"))


def inputs(teacher, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    context = teacher.encode_prompts(["a photo of a cat"] * b) + 0.1 * torch.randn(b, 8, 16, generator=g)
    return z_t, t, context


def unet(teacher, z, t, c):
    return teacher.unet(z, t, encoder_hidden_states=c).sample


def test_teacher_is_frozen_and_outside_module_trees(teacher):
    assert not isinstance(teacher, nn.Module)
    for m in (teacher.vae, teacher.unet, teacher.text_encoder):
        assert not m.training and not any(q.requires_grad for q in m.parameters())
    assert teacher.context_shape == (8, 16)


@pytest.mark.parametrize("negative", ["empty", "domain"])
@pytest.mark.parametrize("scale", [1.0, 1.5, 3.0])
def test_guided_prediction_is_negative_plus_w_times_difference(teacher, negative, scale):
    z_t, t, context = inputs(teacher)
    if negative == "empty":
        neg = teacher.encode_prompts([""])                                   # [1, L, D], shared
        neg_full = neg.expand(3, -1, -1)
    else:
        table = teacher.encode_prompts(["a sketch", "a painting"])          # one prompt per source domain
        neg = neg_full = table[torch.tensor([0, 1, 0])]
    out = teacher.guided_noise_prediction(z_t, t, context, neg, scale)
    with torch.no_grad():
        eps_c, eps_n = unet(teacher, z_t, t, context), unet(teacher, z_t, t, neg_full)
    torch.testing.assert_close(out, eps_n + scale * (eps_c - eps_n), atol=1e-5, rtol=1e-5)


def test_negative_branch_changes_prediction_and_gets_no_gradient(teacher):
    z_t, t, context = inputs(teacher)
    context.requires_grad_(True)
    empty = teacher.encode_prompts([""])
    domain = teacher.encode_prompts(["a sketch"]).requires_grad_(True)
    a = teacher.guided_noise_prediction(z_t, t, context, empty, 2.0)
    b = teacher.guided_noise_prediction(z_t, t, context, domain, 2.0)
    assert (a - b).abs().max() > 1e-4
    b.sum().backward()
    assert domain.grad is None and context.grad.abs().sum() > 0  # the negative branch runs under no_grad
    # w = 1: the plain conditional prediction, no negative needed
    torch.testing.assert_close(teacher.guided_noise_prediction(z_t, t, context, None, 1.0).detach(),
                               unet(teacher, z_t, t, context).detach())
    with pytest.raises(ValueError, match="negative_context' is required"):
        teacher.guided_noise_prediction(z_t, t, context, None, 2.0)
    with pytest.raises(ValueError, match="negative_context' must be"):
        teacher.guided_noise_prediction(z_t, t, context, empty[:, :4], 2.0)


def test_gradient_flows_into_the_student_only(teacher):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=16, patch_size=4,
                                                            num_channels=3, projection_dim=8))
    student = DDGStudent(CLIPVisionBackbone(vision), ZeroShotHead(torch.randn(2, 8)))
    cond = StudentConditioning("prompts", prompts=ProbabilityWeightedPromptAdapter(
        teacher.encode_prompts(["a photo of a cat", "a photo of a dog"])))
    x = torch.randn(2, 3, 16, 16)
    logits, _, tokens = student.encode(x)
    z0 = teacher.encode_images(images_to_sd(x, [0.5] * 3, [0.5] * 3))
    z_t, t, _, target = teacher.sample_training_inputs(z0, torch.Generator().manual_seed(0))
    pred = teacher.guided_noise_prediction(z_t, t, cond(logits, tokens), teacher.encode_prompts([""]), 2.0)
    (pred - target).square().mean().backward()
    grads = [q.grad for q in student.backbone.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    for m in (teacher.vae, teacher.unet, teacher.text_encoder):
        assert all(q.grad is None for q in m.parameters())


def test_encode_images_is_scaled_posterior_mean_and_noising_matches_scheduler(teacher):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z0 = teacher.encode_images(x)
    expected = teacher.vae.encode(x).latent_dist.mean * teacher.vae.config.scaling_factor
    torch.testing.assert_close(z0, expected)
    noise, t = torch.randn_like(z0), torch.tensor([0, 999])
    z_t, _, _, target = teacher.noised(z0, noise, t)
    abar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(z_t, abar.sqrt() * z0 + (1 - abar).sqrt() * noise)
    torch.testing.assert_close(target, noise)
    with pytest.raises(ValueError, match="encode_images: 'x_sd'"):
        teacher.encode_images(torch.rand(2, 1, 16, 16))


def test_images_to_sd_unnormalises_resizes_and_repeats_grey():
    x = torch.full((1, 1, 4, 4), 0.5)           # (0.5 * 0.5 + 0.5) = 0.75 -> 2 * 0.75 - 1 = 0.5
    out = images_to_sd(x, [0.5], [0.5], resolution=8, channels=3)
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out, torch.full_like(out, 0.5))
    with pytest.raises(ValueError, match="images_to_sd"):
        images_to_sd(torch.rand(1, 2, 4, 4), [0.5, 0.5], [0.5, 0.5], channels=3)


def test_save_and_load_roundtrip(teacher, tmp_path):
    teacher.save_pretrained(tmp_path / "sd")
    loaded = StableDiffusionTeacher.from_pretrained(tmp_path / "sd")
    z_t, t, context = inputs(teacher)
    neg = teacher.encode_prompts([""])
    torch.testing.assert_close(loaded.guided_noise_prediction(z_t, t, context, neg, 2.0),
                               teacher.guided_noise_prediction(z_t, t, context, neg, 2.0))
    torch.testing.assert_close(loaded.encode_prompts(["a dog"]), teacher.encode_prompts(["a dog"]))
    with pytest.raises(FileNotFoundError, match="from_pretrained.*lacks"):
        StableDiffusionTeacher.from_pretrained(tmp_path)


def test_gradient_checkpointing_recomputes_in_eval_mode(tmp_path):
    """The frozen UNet stays in eval() while its context needs a gradient: checkpointing must still recompute the
    blocks in backward (diffusers before 0.32 checkpointed only in train mode, a silent no-op here), and give the
    same context gradient as the plain backward."""
    teacher = tiny_teacher(tmp_path)
    z_t, t, context = inputs(teacher)
    resnet = teacher.unet.up_blocks[0].resnets[0]  # after the first cross-attention: its input depends on c
    calls, forward = [], resnet.forward

    def counting_forward(*args, **kwargs):  # the recomputation calls forward again (module hooks do not fire)
        calls.append(1)
        return forward(*args, **kwargs)

    resnet.forward = counting_forward
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            teacher.enable_gradient_checkpointing()
        assert not teacher.unet.training
        calls.clear()
        c = context.clone().requires_grad_()
        unet(teacher, z_t, t, c).square().mean().backward()
        grads.append(c.grad)
        assert len(calls) == (2 if checkpointing else 1), f"checkpointing={checkpointing}: {len(calls)} calls"
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
