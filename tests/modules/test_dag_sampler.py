"""DAGSampler (GuidedTeacher + VAECodec + BNGuidanceLoss) against a hand-written DAG loop (the DDIS code's step:
decode z_t, clamp, nearest resize, unsquared DeepInversion BN loss with its own hooks, z - eta * grad, CFG,
scheduler.step) on a tiny diffusers pipeline; the Tweedie-x0 option; per-image statistics; eta schedules;
gradient routing (no UNet graph during guided steps, the last step's graph reaches the text embeddings);
ClassifierPreprocess; bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel  # noqa: E402

from ddg_losses import BNGuidanceLoss  # noqa: E402
from ddg_models import ClassifierPreprocess, DAGSampler, GuidedTeacher, VAECodec  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread")]
EMBED = 16


def tiny_parts():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=EMBED,
                                attention_head_dim=8, norm_num_groups=8).eval()
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, layers_per_block=1, norm_num_groups=4, scaling_factor=0.5).eval()
    classifier = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                               nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():  # running statistics unlike those of the decoded images, so the loss is far from 0
        for bn in (classifier[1], classifier[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    for part in (unet, vae, classifier):
        part.requires_grad_(False)
    return unet, vae, classifier.eval()


def make_sampler(unet, vae, scheduler, classifier, *, preprocess=None, guidance_scale=10.0, bn_batch="per_image",
                 **kwargs):
    teacher = GuidedTeacher(unet, scheduler.config.prediction_type, guidance_scale)
    loss = BNGuidanceLoss(classifier, preprocess, batch=bn_batch)
    return DAGSampler(teacher, VAECodec(vae), scheduler, loss, **kwargs)


def ctx(embeds):
    return {"encoder_hidden_states": embeds}


def sd_scheduler(kind):
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
               steps_offset=1)
    return PNDMScheduler(skip_prk_steps=True, **cfg) if kind == "pndm" else DDIMScheduler(clip_sample=False, **cfg)


def inputs(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 7, EMBED, generator=g), torch.randn(1, 7, EMBED, generator=g),
            torch.randn(n, 4, 4, 4, generator=g))


def reference_bn_loss(classifier, x):
    """DeepInversion's R = sum_l ||var - rv||_2 + ||mean - rm||_2 over BN inputs, written with plain hooks."""
    terms = []

    def hook(module, args, output):
        a = args[0]
        mean = a.mean((0, 2, 3))
        var = a.permute(1, 0, 2, 3).reshape(a.shape[1], -1).var(1, unbiased=False)
        terms.append(torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2))
    handles = [m.register_forward_hook(hook) for m in classifier if isinstance(m, nn.BatchNorm2d)]
    classifier(x)
    for h in handles:
        h.remove()
    return sum(terms)


def reference_sample(unet, vae, classifier, scheduler, cond, uncond, latents, steps, eta, scale, size, target="z_t",
                     unet_grad=False):
    scheduler.set_timesteps(steps)
    z = latents * scheduler.init_noise_sigma
    embeds = torch.cat([uncond.expand(len(cond), -1, -1), cond])
    losses = []

    def cfg(zz, t, grad=False):
        with torch.set_grad_enabled(grad):
            u, c = unet(torch.cat([zz, zz]), t, encoder_hidden_states=embeds).sample.chunk(2)
        return u + scale * (c - u)

    for i, t in enumerate(scheduler.timesteps):
        if i < steps - 1:  # the DDIS code's `i < grad_update_step` (PNDM runs steps + 1 timesteps)
            zg = z.detach().requires_grad_(True)
            if target == "x0":
                a = scheduler.alphas_cumprod[int(t)]
                dec_in = (zg - (1 - a).sqrt() * cfg(zg, t, unet_grad)) / a.sqrt()
            else:
                dec_in = zg
            x = (vae.decode(dec_in / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
            loss = reference_bn_loss(classifier, F.interpolate(x, size=size))
            g, = torch.autograd.grad(loss, zg)
            losses.append(float(loss.detach()))
            z = (z - eta * g).detach()
        z = scheduler.step(cfg(z, t), t, z).prev_sample
    return z, losses


@pytest.mark.parametrize("kind, target", [("pndm", "z_t"), ("ddim", "z_t"), ("ddim", "x0")])
def test_matches_hand_written_loop(kind, target):
    # fp64 models and latents; what remains is the schedulers' fp32 alpha tables (~1e-7).
    unet, vae, classifier = (m.double() for m in tiny_parts())
    cond, uncond, latents = (x.double() for x in inputs())
    sampler = make_sampler(unet, vae, sd_scheduler(kind), classifier, preprocess=ClassifierPreprocess.ddis_code(12),
                         eta=0.05, guidance_scale=4.0, guide_target=target, bn_batch="batch")
    out = sampler(ctx(cond), ctx(uncond), latents=latents.clone(), num_inference_steps=4)
    ref, ref_losses = reference_sample(unet, vae, classifier, sd_scheduler(kind), cond, uncond, latents, 4, 0.05,
                                       4.0, 12, target)
    torch.testing.assert_close(out.latents, ref, atol=1e-6, rtol=1e-6)
    assert out.guidance_losses == pytest.approx(ref_losses, rel=1e-6)
    plain = sampler(ctx(cond), ctx(uncond), latents=latents.clone(), num_inference_steps=4, guided_steps=[])
    assert not torch.allclose(plain.latents, out.latents, atol=1e-4)  # the guidance did something
    torch.testing.assert_close(out.images, (vae.decode(ref / 0.5).sample / 2 + 0.5).clamp(0, 1), atol=1e-6,
                               rtol=1e-6)


def test_x0_guidance_through_the_unet_matches_full_autograd():
    unet, vae, classifier = (m.double() for m in tiny_parts())
    cond, uncond, latents = (x.double() for x in inputs())
    kw = dict(preprocess=ClassifierPreprocess.ddis_code(12), eta=0.05, guidance_scale=4.0, guide_target="x0",
              bn_batch="batch")
    through = make_sampler(unet, vae, sd_scheduler("ddim"), classifier, x0_unet_grad=True, **kw)
    out = through(ctx(cond), ctx(uncond), latents=latents.clone(), num_inference_steps=4)
    ref, _ = reference_sample(unet, vae, classifier, sd_scheduler("ddim"), cond, uncond, latents, 4, 0.05, 4.0, 12,
                              "x0", unet_grad=True)
    torch.testing.assert_close(out.latents, ref, atol=1e-6, rtol=1e-6)
    constant = make_sampler(unet, vae, sd_scheduler("ddim"), classifier, **kw)
    plain_x0 = constant(ctx(cond), ctx(uncond), latents=latents.clone(), num_inference_steps=4).latents
    assert not torch.allclose(plain_x0, ref, atol=1e-6)  # the UNet Jacobian term changes the update
    assert all(p.grad is None for p in unet.parameters())  # autograd.grad w.r.t. z only
    with pytest.raises(ValueError, match="x0_unet_grad"):
        make_sampler(unet, vae, sd_scheduler("ddim"), classifier, x0_unet_grad=True)


def test_guidance_lowers_the_bn_loss():
    unet, vae, classifier = tiny_parts()
    cond, uncond, latents = inputs(n=4)
    sampler = make_sampler(unet, vae, sd_scheduler("ddim"), classifier, preprocess=ClassifierPreprocess(),
                         eta=2.0, guidance_scale=2.0, bn_batch="batch")
    before = float(sampler.guidance_loss(sampler.codec.decode(latents)))
    z = latents
    for _ in range(5):
        z, _ = sampler.guide(z, torch.tensor(500), 2.0, None, None)
    assert float(sampler.guidance_loss(sampler.codec.decode(z))) < before


def test_per_image_loss_is_sum_of_single_image_losses():
    unet, vae, classifier = tiny_parts()
    _, _, latents = inputs(n=3)
    sampler = make_sampler(unet, vae, sd_scheduler("ddim"), classifier, preprocess=ClassifierPreprocess(),
                         bn_batch="per_image")
    with torch.no_grad():
        decoded = sampler.codec.decode(latents)
        expected = sum(reference_bn_loss(classifier, (d[None] / 2 + 0.5).clamp(0, 1)) for d in decoded)
        torch.testing.assert_close(sampler.guidance_loss(decoded), expected, rtol=1e-5, atol=1e-6)


def test_eta_schedule_and_no_unet_graph_while_guiding():
    unet, vae, classifier = tiny_parts()
    cond, uncond, latents = inputs()
    grad_modes = []
    unet.register_forward_hook(lambda m, a, o: grad_modes.append(torch.is_grad_enabled()))
    common = dict(preprocess=ClassifierPreprocess(), guidance_scale=3.0, bn_batch="batch")
    seen = []
    scheduled = make_sampler(unet, vae, sd_scheduler("ddim"), classifier,
                           eta=lambda i, t: seen.append((i, t)) or (0.0 if i == 1 else 0.1), **common)
    listed = make_sampler(unet, vae, sd_scheduler("ddim"), classifier, eta=[0.1, 0.0, 0.1, 0.1], **common)
    a = scheduled(ctx(cond), ctx(uncond), latents=latents.clone(), num_inference_steps=4)
    b = listed(ctx(cond), ctx(uncond), latents=latents.clone(), num_inference_steps=4)
    torch.testing.assert_close(a.latents, b.latents)
    assert [i for i, _ in seen] == [0, 1, 2] and isinstance(seen[0][1], int)
    assert not any(grad_modes)  # the UNet never ran with autograd on


@pytest.mark.parametrize("kind, modes", [("ddim", [False, False, True]), ("pndm", [False, False, True, True])])
def test_last_step_carries_the_gradient_to_the_embeddings(kind, modes):
    unet, vae, classifier = tiny_parts()
    cond, uncond, latents = inputs()
    cond.requires_grad_(True)
    sampler = make_sampler(unet, vae, sd_scheduler(kind), classifier, preprocess=ClassifierPreprocess(),
                         eta=0.1, guidance_scale=3.0)
    seen = []
    unet.register_forward_hook(lambda m, a, o: seen.append(torch.is_grad_enabled()))
    out = sampler(ctx(cond), ctx(uncond), latents=latents, num_inference_steps=3, grad_steps=1)
    assert seen == modes  # a graph for the unguided tail only (PNDM: its two tail timesteps, as DDIS)
    grad, = torch.autograd.grad(out.images.sum(), cond)
    assert grad.abs().sum() > 0
    assert not sampler(ctx(cond), ctx(uncond), latents=latents, num_inference_steps=3).images.requires_grad


def test_classifier_preprocess_variants():
    x = torch.rand(2, 3, 10, 10) * 2.4 - 1.2
    unit = (x / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(ClassifierPreprocess.ddis_code(7)(x), F.interpolate(unit, size=7))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = (F.interpolate(unit, size=(7, 7), mode="bilinear", antialias=True, align_corners=False) - mean) / std
    torch.testing.assert_close(ClassifierPreprocess.imagenet(7)(x), expected)
    torch.testing.assert_close(ClassifierPreprocess()(x), unit)


def test_bad_inputs():
    unet, vae, classifier = tiny_parts()
    sched = sd_scheduler("ddim")
    with pytest.raises(ValueError, match="BNGuidanceLoss.*eval mode"):
        make_sampler(unet, vae, sched, classifier.train())
    classifier.eval()
    with pytest.raises(ValueError, match="guide_target"):
        make_sampler(unet, vae, sched, classifier, guide_target="x_t")
    with pytest.raises(ValueError, match="BNGuidanceLoss: 'batch'"):
        make_sampler(unet, vae, sched, classifier, bn_batch="all")
    with pytest.raises(TypeError, match="DAGSampler.*eta"):
        make_sampler(unet, vae, sched, classifier, eta="big")
    with pytest.raises(ValueError, match="antialias"):
        ClassifierPreprocess(size=8, mode="nearest", antialias=True)
    with pytest.raises(ValueError, match="mean.*std"):
        ClassifierPreprocess(mean=(0.5,))
    sampler = make_sampler(unet, vae, sched, classifier, preprocess=ClassifierPreprocess(), eta=[0.1])
    cond, uncond, latents = inputs()
    with pytest.raises(ValueError, match=r"'cond\['encoder_hidden_states'\]' must be a floating tensor with 2 rows"):
        sampler(ctx(cond[:1]), ctx(uncond), latents=latents)
    with pytest.raises(TypeError, match="'cond' must be a non-empty conditioning dict"):
        sampler(cond, ctx(uncond), latents=latents)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler(ctx(cond), ctx(uncond), latents=latents, num_inference_steps=0)
    with pytest.raises(ValueError, match="'eta' has 1 values"):
        sampler(ctx(cond), ctx(uncond), latents=latents, num_inference_steps=3)
    with pytest.raises(TypeError, match="DAGSampler: 'teacher' must be a GuidedTeacher"):
        DAGSampler(unet, VAECodec(vae), sched, sampler.guidance_loss)
    with pytest.raises(TypeError, match="DAGSampler: 'guidance_loss' must be a callable"):
        DAGSampler(sampler.teacher, VAECodec(vae), sched, None)
    with pytest.raises(ValueError, match="DAGSampler: 'guidance_loss' must return a scalar"):
        DAGSampler(sampler.teacher, VAECodec(vae), sched, lambda x: x.sum((1, 2, 3)))(
            ctx(cond), ctx(uncond), latents=latents, num_inference_steps=2)


@pytest.mark.parametrize("kind, steps", [("ddim", [3]), ("ddim", [-1]), ("pndm", [0, 4])])
def test_guided_steps_outside_the_schedule_are_rejected(kind, steps):
    # They used to be ignored: the call returned plain CFG samples as if DAG had run.
    unet, vae, classifier = tiny_parts()
    sampler = make_sampler(unet, vae, sd_scheduler(kind), classifier.eval(), preprocess=ClassifierPreprocess())
    cond, uncond, latents = inputs()
    with pytest.raises(ValueError, match=r"DAGSampler.__call__: 'guided_steps' must be step indices in \[0, "):
        sampler(ctx(cond), ctx(uncond), latents=latents, num_inference_steps=3, guided_steps=steps)
