"""ddg demo: guided sampling of a tiny diffusers pipeline with ddg's fused guidance step.

For each scheduler family it samples the same latents twice, with diffusers' own CFG
(StableDiffusionPipeline for DDIM; the pipeline-style loop for flow-matching Euler) and
with ddg's GuidedTeacher.sample (CFG + guidance rescale + scheduler update in one fused op), prints
how closely they agree and the time of the guidance+update part per step, and saves the
decoded samples as a PNG grid. Weights are random (nothing is downloaded), so the
pictures are noise: the point is the agreement and the timings.

    python examples/demo.py --preset tiny
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torchvision.utils import save_image

import ddg_ops
from ddg_models import FusedGuidanceStep, GuidedTeacher, VAECodec

PRESETS = {
    # CPU, seconds: a 2-level UNet on 16x16 latents.
    "tiny": dict(latent=16, channels=(32, 64), steps=20, batch=2, timing_latent=(2, 4, 64, 64)),
    # GPU: SD1.5-sized latents and UNet widths (random weights), for timing on real shapes.
    "sd15-shapes": dict(latent=64, channels=(320, 640, 1280, 1280), steps=50, batch=2, timing_latent=(2, 4, 64, 64)),
}


def build_components(preset: dict, device: torch.device):
    torch.manual_seed(0)
    levels = len(preset["channels"])
    unet = UNet2DConditionModel(
        sample_size=preset["latent"], in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=preset["channels"], cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=16 if preset["channels"][0] < 128 else 32,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)).to(device).eval()
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16).to(device).eval()
    return unet, vae


def ddim():
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def flow_euler():
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


@torch.no_grad()
def diffusers_flow_loop(unet, scheduler, latents, cond, uncond, steps, scale, rescale):
    """The loop diffusers' flow-matching pipelines run (CFG, rescale, scheduler.step)."""
    scheduler.set_timesteps(steps, device=latents.device)
    embeds = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        pred = unet(torch.cat([latents, latents]), t, encoder_hidden_states=embeds).sample
        u, c = pred.chunk(2)
        guided = rescale_noise_cfg(u + scale * (c - u), c, guidance_rescale=rescale)
        latents = scheduler.step(guided, t, latents).prev_sample
    return latents


def ctx(embeds: torch.Tensor) -> dict:
    """A UNet2DConditionModel conditioning."""
    return {"encoder_hidden_states": embeds}


def time_per_step(fn, repeats=50):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def guidance_step_timings(shape, device, scale, rescale):
    """Median ms of CFG+rescale+update alone (no model), diffusers vs fused, on SD-sized latents."""
    rows = {}
    for name, make in (("ddim", ddim), ("flow_euler", flow_euler)):
        s_ref, s_ddg = make(), make()
        for s in (s_ref, s_ddg):
            s.set_timesteps(50, device=device)
        t = s_ref.timesteps[10]
        x, u, c = (torch.randn(shape, device=device) for _ in range(3))

        def diffusers_step():
            guided = rescale_noise_cfg(u + scale * (c - u), c, guidance_rescale=rescale)
            s_ref._step_index = 10 if name == "flow_euler" else None
            return s_ref.step(guided, t, x).prev_sample

        fused = FusedGuidanceStep(s_ddg, scale, rescale)

        def ddg_step():
            s_ddg._step_index = 10 if name == "flow_euler" else None
            return fused(u, c, t, x)

        rows[name] = (time_per_step(diffusers_step), time_per_step(ddg_step))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--guidance-rescale", type=float, default=0.7)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the preset's)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    steps = args.steps or preset["steps"]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"ddg_ops kernels: {sorted(ddg_ops.EXTENSION.device_types) or 'none'} ({ddg_ops.EXTENSION.reason}); "
          f"device {device}; preset {args.preset}; {steps} steps; scale {args.guidance_scale}, "
          f"rescale {args.guidance_rescale}")

    unet, vae = build_components(preset, device)
    g = torch.Generator().manual_seed(1)
    b, size = preset["batch"], preset["latent"]
    latents = torch.randn(b, 4, size, size, generator=g).to(device)
    cond, uncond = (torch.randn(b, 7, 32, generator=g).to(device) for _ in range(2))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=ddim(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    results, samples = {}, []
    runs = {
        "ddim (StableDiffusionPipeline)": (
            lambda: pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents.clone(),
                         num_inference_steps=steps, guidance_scale=args.guidance_scale,
                         guidance_rescale=args.guidance_rescale, output_type="latent",
                         height=size * 8, width=size * 8).images,
            lambda: GuidedTeacher(unet, "epsilon").sample(latents, ctx(cond), ctx(uncond), ddim(), steps,
                                                          scale=args.guidance_scale, rescale=args.guidance_rescale)),
        "flow-matching euler": (
            lambda: diffusers_flow_loop(unet, flow_euler(), latents.clone(), cond, uncond, steps,
                                        args.guidance_scale, args.guidance_rescale),
            lambda: GuidedTeacher(unet, "velocity").sample(latents, ctx(cond), ctx(uncond), flow_euler(), steps,
                                                           scale=args.guidance_scale, rescale=args.guidance_rescale)),
    }
    for name, (theirs, ours) in runs.items():
        t0 = time.perf_counter()
        expected = theirs()
        t1 = time.perf_counter()
        got = ours()
        t2 = time.perf_counter()
        err = float((got - expected).abs().max())
        rel = err / float(expected.abs().max())
        results[name] = dict(max_abs_diff=err, max_rel_diff=rel, diffusers_s=t1 - t0, ddg_s=t2 - t1)
        print(f"{name:<32} agreement: max|diff| {err:.2e} (relative {rel:.1e})   "
              f"sampling: diffusers {t1 - t0:.2f}s, ddg {t2 - t1:.2f}s")
        samples += [expected, got]

    print(f"\nguidance + rescale + scheduler update alone, latents {preset['timing_latent']} (median ms per step):")
    for name, (ref_ms, ddg_ms) in guidance_step_timings(preset["timing_latent"], device, args.guidance_scale,
                                                        args.guidance_rescale).items():
        print(f"  {name:<12} diffusers {ref_ms:7.3f}   ddg fused {ddg_ms:7.3f}   speedup {ref_ms / ddg_ms:5.2f}x")
        results[f"step_ms_{name}"] = dict(diffusers=ref_ms, ddg=ddg_ms)

    with torch.no_grad():
        images = torch.cat([VAECodec(vae).to_images(s) for s in samples])
    grid = args.out / "samples.png"
    save_image(images, grid, nrow=b)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nrows: diffusers/ddg per scheduler; saved {grid} and {args.out / 'results.json'}")
    worst = max(r["max_rel_diff"] for k, r in results.items() if "max_rel_diff" in r)
    if worst > 1e-4:
        raise SystemExit(f"ddg and diffusers disagree (relative difference {worst:.1e})")


if __name__ == "__main__":
    main()
