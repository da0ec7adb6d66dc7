"""Training of the tiny latent-diffusion teachers of the CPU presets: one VAE trainer and one text-conditioned
UNet trainer (diffusers ``AutoencoderKL`` / ``UNet2DConditionModel``), with progress bars.

Both draw every random number (minibatch indices, posterior samples, prompts, noise, timesteps) from the
generator handed in, in a fixed order, so a tiny world is a function of its seed. The UNet trainer takes the
conditioning as a callback ``condition(indices) -> UNet keyword arguments``: precomputed context rows of a frozen
text encoder, or prompts encoded inside the step by a text encoder trained along (its parameters go in
``extra_params``); the callback may draw from the generator (prompt variants, condition dropout), after the
indices and before the noise.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F


def _progress(steps: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=desc, disable=quiet, leave=False)


def _check(fn: str, steps: int, batch_size: int, n: int) -> None:
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{fn}: 'steps' must be a non-negative int, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{fn}: 'batch_size' must be a positive int, got {batch_size!r}")
    if n < 1:
        raise ValueError(f"{fn}: no training data (0 images)")


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, generator: torch.Generator, *,
              lr: float = 2e-3, kl_weight: float = 1e-4, l1_weight: float = 1.0, scale_images: int = 512,
              desc: str = "tiny VAE", quiet: bool = False):
    """Reconstruction (``l1_weight`` * L1 + MSE) + ``kl_weight`` * KL on ``images`` in [-1, 1] (AdamW, no weight
    decay); afterwards ``scaling_factor`` = 1 / std of the posterior means of the first ``scale_images`` images,
    the way Stable Diffusion's 0.18215 was chosen. Returns the VAE in eval mode."""
    from ddg_models import VAECodec

    _check("train_vae", steps, batch_size, len(images))
    if images.dim() != 4 or images.shape[1] != vae.config.in_channels:
        raise ValueError(f"train_vae: 'images' must be [N, {vae.config.in_channels}, H, W] in [-1, 1], "
                         f"got {tuple(images.shape)}")
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    codec = VAECodec(vae)
    vae.train()
    bar = _progress(steps, desc, quiet)
    for _ in bar:
        xb = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        rec, post = codec.reconstruct(xb, generator=generator)
        reconstruction = F.mse_loss(rec, xb)
        if l1_weight:
            reconstruction = l1_weight * F.l1_loss(rec, xb) + reconstruction
        loss = reconstruction + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        std = vae.encode(images[:scale_images]).latent_dist.mean.std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    return vae


def train_text_unet(unet, latents: torch.Tensor, scheduler, steps: int, batch_size: int,
                    generator: torch.Generator, condition: Callable[[torch.Tensor], Dict[str, torch.Tensor]], *,
                    lr: float = 2e-3, weight_decay: float = 0.0, extra_params: Iterable[torch.nn.Parameter] = (),
                    one_cycle_pct_start: Optional[float] = None, clip_grad_norm: Optional[float] = None,
                    desc: str = "tiny UNet", quiet: bool = False):
    """Epsilon-prediction training of ``unet`` on ``latents`` (already scaled) under ``scheduler``'s noise
    schedule: per step indices, ``condition(indices)``, noise, timesteps t ~ U{0..T-1}, MSE(UNet(z_t, t), eps).
    AdamW over the UNet and ``extra_params``; OneCycle LR when ``one_cycle_pct_start`` is set; the UNet's
    gradient norm clipped to ``clip_grad_norm`` when set. Returns the UNet in eval mode (modules trained through
    ``extra_params`` are the caller's to put in eval mode)."""
    _check("train_text_unet", steps, batch_size, len(latents))
    params = list(unet.parameters()) + list(extra_params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=one_cycle_pct_start)
             if one_cycle_pct_start is not None and steps > 0 else None)
    T = scheduler.config.num_train_timesteps
    unet.train()
    bar = _progress(steps, desc, quiet)
    for _ in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
        cond = condition(idx)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, T, (batch_size,), generator=generator)
        pred = unet(scheduler.add_noise(z0, noise, t), t, **cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), clip_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    return unet
