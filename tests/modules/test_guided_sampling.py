"""The fused guidance step equals diffusers' own CFG + scheduler.step, and GuidedTeacher's sampling
loop equals StableDiffusionPipeline on a tiny real UNet2DConditionModel."""
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ddg_models import FusedGuidanceStep, GuidedTeacher
from ddg_ops import reference

pytestmark = pytest.mark.requires_ext


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16).eval()


def sd_ddim(**overrides):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    config.update(overrides)
    return DDIMScheduler(**config)


def diffusers_cfg(uncond, cond, scale, rescale):
    """What diffusers' pipelines do between the model call and scheduler.step."""
    guided = uncond + scale * (cond - uncond)
    return rescale_noise_cfg(guided, cond, guidance_rescale=rescale) if rescale else guided


SCHEDULERS = {
    "ddim_eps": lambda: sd_ddim(),
    "ddim_eps_alpha_one": lambda: sd_ddim(set_alpha_to_one=True),
    "ddim_v": lambda: sd_ddim(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    "flow_euler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "euler_discrete_unfused": lambda: EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                             beta_end=0.012),
}


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_step_matches_diffusers_scheduler(name, rescale):
    ours, theirs = SCHEDULERS[name](), SCHEDULERS[name]()
    for s in (ours, theirs):
        s.set_timesteps(12)
    step = FusedGuidanceStep(ours, 7.5, rescale)
    assert step.fused == (name != "euler_discrete_unfused")
    x = torch.randn(2, 4, 16, 16) * getattr(theirs, "init_noise_sigma", 1.0)
    ref = x.clone()
    for t in theirs.timesteps:
        uncond, cond = torch.randn(2, 2, 4, 16, 16).unbind(0)
        x = step(uncond, cond, t, x)
        ref = theirs.step(diffusers_cfg(uncond, cond, 7.5, rescale), t, ref).prev_sample
        torch.testing.assert_close(x, ref, atol=2e-5 * max(1.0, float(ref.abs().max())), rtol=1e-5)


def test_rescale_matches_diffusers_rescale_noise_cfg():
    uncond, cond = torch.randn(2, 3, 4, 16, 16, dtype=torch.float64).unbind(0)
    guided = uncond + 5.0 * (cond - uncond)
    torch.testing.assert_close(reference.rescale_guided(guided, cond, 0.7),
                               rescale_noise_cfg(guided, cond, guidance_rescale=0.7))


@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_sampler_matches_stable_diffusion_pipeline(rescale):
    unet = tiny_unet()
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sd_ddim(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = torch.randn(2, 2, 7, 32).unbind(0)
    latents = torch.randn(2, 4, 16, 16)
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents.clone(), num_inference_steps=8,
                    guidance_scale=7.5, guidance_rescale=rescale, output_type="latent", height=128, width=128).images
    ours = GuidedTeacher(unet, "epsilon", 7.5, rescale).sample(latents, {"encoder_hidden_states": cond},
                                                               {"encoder_hidden_states": uncond}, sd_ddim(), 8)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)
