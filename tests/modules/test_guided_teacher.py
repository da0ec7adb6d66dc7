"""GuidedTeacher against plain-PyTorch references: the [uncond; cond] pair from one batched call, the guided
prediction (fused CFG + rescale), one sampler step and the sampling loop (= the scheduler's own loop), the flow
rollout (= diffusers' CFG Euler sampling); a bf16 UNet2DConditionModel / SD3Transformer2DModel served fp32
latents (fp32 out, bf16 tolerances); gradient routing (the conditional context only, none, or through x);
the teacher stays out of a trained module's parameters, state_dict and deep copies; bad inputs."""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler,  # noqa: E402
                       SD3Transformer2DModel, UNet2DConditionModel)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402

from ddg_models import GuidedTeacher, model_prediction, shifted_flow_sigmas  # noqa: E402
from ddg_ops.testing import TOLERANCES, magnitude  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoHeads(nn.Module):
    """v = a(x) for the null label 0, b(x) otherwise: CFG must mix exactly these."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x, timestep, label):
        s = (timestep / 1000)[:, None]
        return torch.where(label[:, None] > 0, self.b(x) * (1 + s), self.a(x) * (1 - s))


def tiny_unet(dtype=torch.float32):
    """SD1.x's layout cut down (cross-attention width 32 instead of 768, two levels)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16).to(dtype)


def tiny_sd3(dtype=torch.float32):
    """SD3.5-Medium's ratios cut down: 16 latent channels, caption_projection_dim = heads * head_dim (24),
    joint_attention_dim / caption_projection_dim = 4096 / 1536, pooled 2048 / 1536; one layer."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                 attention_head_dim=8, num_attention_heads=3, joint_attention_dim=64,
                                 caption_projection_dim=24, pooled_projection_dim=32, pos_embed_max_size=8).to(dtype)


def conditioning(kind, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "unet":
        return ({"encoder_hidden_states": torch.randn(n, 5, 32, generator=g)},
                {"encoder_hidden_states": torch.randn(1, 5, 32, generator=g)})
    return ({"encoder_hidden_states": torch.randn(n, 6, 64, generator=g), "pooled_projections": torch.randn(n, 32)},
            {"encoder_hidden_states": torch.randn(1, 6, 64, generator=g), "pooled_projections": torch.zeros(1, 32)})


def latents(kind, n, seed=2):
    x = torch.randn(n, 4 if kind == "unet" else 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last)  # a non-contiguous layout at the boundary


def plain(model, x, t, cond, dtype):
    """The model at the teacher's dtype boundary, written out: cast in, call, fp32 out."""
    n = x.shape[0]
    cond = {k: v.expand(n, *v.shape[1:]).to(dtype) for k, v in cond.items()}
    out = model(x.to(dtype), timestep=torch.as_tensor(t, dtype=torch.float32).expand(n), return_dict=False, **cond)
    return out[0].float()


def check(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=atol * magnitude(expected), rtol=rtol)


# ------------------------------------------------------------------------------------ conventions
def test_teacher_is_frozen_and_guides_with_one_batched_call():
    net = TwoHeads().train()
    calls = []
    net.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    teacher = GuidedTeacher(net, "velocity", 3.5)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x, t = torch.randn(5, 2), torch.full((5,), 600.0)
    cond, uncond = {"label": torch.ones(5)}, {"label": torch.zeros(5)}
    u, c = teacher.pair(x, t, cond, uncond)
    assert calls == [10]
    torch.testing.assert_close(u, net(x, t, uncond["label"]))
    torch.testing.assert_close(c, net(x, t, cond["label"]))
    torch.testing.assert_close(teacher.guided(x, t, cond, uncond), u + 3.5 * (c - u))
    assert not teacher.guided(x, t, cond, uncond).requires_grad


def test_teacher_stays_out_of_a_trained_modules_tree():
    class Student(nn.Module):
        def __init__(self, teacher):
            super().__init__()
            self.head = nn.Linear(2, 2)
            self.teacher = teacher

    teacher = GuidedTeacher(TwoHeads(), "velocity", 2.0)
    student = Student(teacher)
    assert set(student.state_dict()) == {"head.weight", "head.bias"}
    assert len(list(student.parameters())) == 2
    assert not any(m is teacher.model for m in student.modules())
    assert copy.deepcopy(student).teacher is teacher  # SWAD's averages share it
    student.train()
    assert not teacher.model.training


def test_callable_without_parameters_is_passed_through():
    teacher = GuidedTeacher(lambda x, timestep, label: x * label[:, None] + timestep[:, None], "velocity", 2.0)
    assert teacher.dtype is None and teacher.device is None
    x = torch.randn(3, 2, dtype=torch.float64)
    u, c = teacher.pair(x, 5.0, {"label": torch.ones(3, dtype=torch.float64)},
                        {"label": torch.zeros(1, dtype=torch.float64)})
    assert u.dtype == torch.float64
    torch.testing.assert_close(c, x + 5.0)
    torch.testing.assert_close(u, torch.full_like(x, 5.0))


# ------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_pair_and_guided_match_plain_calls_for_fp32_latents(kind, dtype):
    model = tiny_unet(dtype) if kind == "unet" else tiny_sd3(dtype)
    teacher = GuidedTeacher(model, "epsilon" if kind == "unet" else "velocity", 4.5, 0.3)
    x = latents(kind, 3)
    cond, uncond = conditioning(kind, 3)
    t = torch.tensor([10.0, 500.0, 981.0])
    u, c = teacher.pair(x, t, cond, uncond)
    ref_u, ref_c = plain(model, x, t, uncond, dtype), plain(model, x, t, cond, dtype)
    check(u, ref_u, dtype)
    check(c, ref_c, dtype)
    guided = teacher.guided(x, t, cond, uncond)
    check(guided, rescale_noise_cfg(ref_u + 4.5 * (ref_c - ref_u), ref_c, guidance_rescale=0.3), dtype)
    # the plain-call convention of the distillation modules agrees with the teacher's boundary
    check(teacher.predict(x, t, cond), model_prediction(model, x.to(dtype), t, {k: v.to(dtype) for k, v in
                                                                                   cond.items()}).float(), dtype)


SCHEDULERS = {
    "ddim": (lambda: DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1), "epsilon"),
    "pndm_unfused": (lambda: PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           skip_prk_steps=True, steps_offset=1), "epsilon"),
    "flow_euler": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), "velocity"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_step_and_sample_match_the_schedulers_loop(name, dtype):
    make, prediction = SCHEDULERS[name]
    model = tiny_unet(dtype)
    teacher = GuidedTeacher(model, prediction, 5.0)
    cond, uncond = conditioning("unet", 3)
    noise = latents("unet", 3)
    ours = teacher.sample(noise, cond, uncond, make(), 5)
    scheduler = make()
    scheduler.set_timesteps(5)
    z = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        u, c = plain(model, z, t, uncond, dtype), plain(model, z, t, cond, dtype)
        z = scheduler.step(u + 5.0 * (c - u), t, z).prev_sample
    check(ours, z, dtype)
    # one step on its own, with a per-sample scale
    scheduler = make()
    scheduler.set_timesteps(5)
    scale = torch.tensor([1.0, 3.0, 7.5])
    t = scheduler.timesteps[1]
    if name == "flow_euler":
        scheduler._step_index = 1
    stepped = teacher.step(noise, t, cond, uncond, teacher.stepper(scheduler, scale=scale))
    assert teacher.stepper(make(), scale=scale).fused == (name != "pndm_unfused")
    reference = make()
    reference.set_timesteps(5)
    if name == "flow_euler":
        reference._step_index = 1
    u, c = plain(model, noise, t, uncond, dtype), plain(model, noise, t, cond, dtype)
    expected = reference.step(u + scale.view(-1, 1, 1, 1) * (c - u), t, noise.float()).prev_sample
    check(stepped, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_matches_a_plain_cfg_euler_loop(dtype):
    model = tiny_sd3(dtype)
    teacher = GuidedTeacher(model, "velocity", 3.5)
    cond, uncond = conditioning("sd3", 2)
    noise = latents("sd3", 2)
    z, sigma = teacher.rollout(noise, cond, uncond, num_inference_steps=6, steps=4)
    sigmas = shifted_flow_sigmas(6, 3.0).tolist()
    x = noise.float()
    for i in range(4):
        u, c = plain(model, x, 1000 * sigmas[i], uncond, dtype), plain(model, x, 1000 * sigmas[i], cond, dtype)
        x = x + (sigmas[i + 1] - sigmas[i]) * (u + 3.5 * (c - u))
    assert sigma == sigmas[4]
    check(z, x, dtype)


def test_rollout_equals_diffusers_cfg_euler_sampling():
    teacher = GuidedTeacher(TwoHeads(), "velocity", 3.5)
    x1 = torch.randn(4, 2)
    cond, uncond = {"label": torch.ones(4)}, {"label": torch.zeros(4)}
    z, sigma = teacher.rollout(x1, cond, uncond, num_inference_steps=30, steps=30)
    ref = teacher.sample(x1, cond, uncond, FlowMatchEulerDiscreteScheduler(shift=3.0), 30)
    assert sigma == 0.0
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    z10, sigma10 = teacher.rollout(x1, cond, uncond, 30, 10)
    assert abs(sigma10 - 0.8513) < 1e-3


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_reaches_the_conditional_context_only(dtype):
    model = tiny_unet(dtype)
    teacher = GuidedTeacher(model, "epsilon")
    x = latents("unet", 3)
    t = torch.tensor([20.0, 400.0, 900.0])
    cond, uncond = conditioning("unet", 3)
    context = cond["encoder_hidden_states"].clone().requires_grad_(True)
    negative = uncond["encoder_hidden_states"].clone().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    out = teacher.guided(x, t, {"encoder_hidden_states": context}, {"encoder_hidden_states": negative}, scale=2.5,
                         rescale=0.2, grad="cond")
    (g,) = torch.autograd.grad((out * w).sum(), context)
    assert negative.grad is None and all(p.grad is None for p in model.parameters())
    ctx = context.detach().clone().requires_grad_(True)
    with torch.no_grad():
        u = plain(model, x, t, uncond, dtype)
    c = plain(model, x, t, {"encoder_hidden_states": ctx}, dtype)
    ref = rescale_noise_cfg(u + 2.5 * (c - u), c, guidance_rescale=0.2)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), ctx)
    check(g, g_ref, dtype)
    assert g.abs().sum() > 0
    # scale 1 without rescale: the conditional prediction alone, no negative needed
    only = teacher.guided(x, t, {"encoder_hidden_states": context}, None, scale=1.0, grad="cond")
    assert only.requires_grad
    check(only.detach(), c.detach(), dtype)
    assert not teacher.guided(x, t, {"encoder_hidden_states": context}, {"encoder_hidden_states": negative},
                              grad="none").requires_grad


def test_gradient_through_the_model_with_grad_all():
    model = tiny_unet()
    teacher = GuidedTeacher(model, "epsilon", 3.0)
    cond, uncond = conditioning("unet", 2)
    x = latents("unet", 2).requires_grad_(True)
    (g,) = torch.autograd.grad(teacher.guided(x, 300.0, cond, uncond, grad="all").square().sum(), x)
    xr = x.detach().clone().requires_grad_(True)
    u, c = plain(model, xr, 300.0, uncond, torch.float32), plain(model, xr, 300.0, cond, torch.float32)
    (g_ref,) = torch.autograd.grad((u + 3.0 * (c - u)).square().sum(), xr)
    check(g, g_ref, torch.float32)


# ------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    net = TwoHeads()
    with pytest.raises(ValueError, match="GuidedTeacher: 'prediction' must be one of"):
        GuidedTeacher(net, "sample")
    with pytest.raises(TypeError, match="GuidedTeacher: 'model' must be"):
        GuidedTeacher(3, "velocity")
    with pytest.raises(ValueError, match="GuidedTeacher: 'guidance_rescale' must be a number in"):
        GuidedTeacher(net, "velocity", 2.0, 1.5)
    teacher = GuidedTeacher(net, "velocity", 2.0)
    x = torch.randn(4, 2)
    cond, uncond = {"label": torch.ones(4)}, {"label": torch.zeros(4)}
    with pytest.raises(ValueError, match="GuidedTeacher.guided: 'grad' must be one of"):
        teacher.guided(x, 1.0, cond, uncond, grad="uncond")
    with pytest.raises(ValueError, match=r"GuidedTeacher.pair: 'uncond\['label'\]' must be a tensor with 4 rows"):
        teacher.pair(x, 1.0, cond, {"label": torch.zeros(2)})
    with pytest.raises(ValueError, match="concat_conditions: both conditionings need the same keys"):
        teacher.pair(x, 1.0, cond, {"other": torch.zeros(4)})
    with pytest.raises(TypeError, match="GuidedTeacher.predict: 'cond' must be a mapping"):
        teacher.predict(x, 1.0, torch.ones(4))
    with pytest.raises(TypeError, match="GuidedTeacher.pair: 'x' must be a floating"):
        teacher.pair(torch.zeros(4, 2, dtype=torch.long), 1.0, cond, uncond)
    with pytest.raises(ValueError, match="GuidedTeacher.guided: 'uncond' is required when the guidance scale"):
        teacher.guided(x, 1.0, cond, None, grad="cond")
    with pytest.raises(TypeError, match="GuidedTeacher.guided: 'scale' must be a number"):
        teacher.guided(x, 1.0, cond, uncond, scale="big")
    with pytest.raises(ValueError, match="GuidedTeacher.rollout: 'steps' must be an int"):
        teacher.rollout(x, cond, uncond, 30, 31)
    with pytest.raises(ValueError, match="GuidedTeacher.rollout: the Euler rollout needs a flow-matching"):
        GuidedTeacher(net, "epsilon").rollout(x, cond, uncond, 30, 5)
    with pytest.raises(ValueError, match="GuidedTeacher.stepper: FlowMatchEulerDiscreteScheduler integrates a"):
        GuidedTeacher(net, "epsilon").stepper(FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="GuidedTeacher.stepper: the scheduler expects prediction_type 'v_pred"):
        GuidedTeacher(net, "epsilon").stepper(DDIMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="GuidedTeacher.sample: 'num_inference_steps' must be a positive int"):
        teacher.sample(x, cond, uncond, FlowMatchEulerDiscreteScheduler(), 0)
