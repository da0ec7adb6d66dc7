"""The guided denoising loss: a frozen text-to-image teacher denoises the image through the student's context.

Named for what it computes rather than for DDG, whose Stage II it is (docs/methods/ddg.md §2.2): the teacher
denoises the image's latent conditioned on the student's context c(x) instead of a prompt;
L = mean ||eps_hat - target||^2 with the (domain-debiasing) CFG prediction eps_hat = eps_n + w (eps_c - eps_n).
Gradients reach only c(x), so the loss trains whatever produced the context.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class GuidedDenoisingLoss(nn.Module):
    """mean ||guided teacher prediction - target||^2 through a frozen ``StableDiffusionTeacher`` (DDG Stage II).

    Args:
        guidance_scale: w of the domain-debiasing guidance (1 = no CFG, the negative branch is skipped).
        guidance_rescale: phi of guidance rescale (0 disables), applied by the fused CFG op.
        timesteps_per_image: K noisy copies (timestep, noise) per image (Diffusion-TTA's ``input.batch_size``).
    """

    def __init__(self, guidance_scale: float = 1.0, guidance_rescale: float = 0.0, timesteps_per_image: int = 1):
        super().__init__()
        if not guidance_scale >= 0:
            raise ValueError(f"GuidedDenoisingLoss: 'guidance_scale' must be >= 0, got {guidance_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"GuidedDenoisingLoss: 'guidance_rescale' must be in [0, 1], got {guidance_rescale}")
        if not isinstance(timesteps_per_image, int) or timesteps_per_image < 1:
            raise ValueError("GuidedDenoisingLoss: 'timesteps_per_image' must be a positive int, got "
                             f"{timesteps_per_image!r}")
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.timesteps_per_image = timesteps_per_image

    def forward(self, teacher, x_sd: torch.Tensor, context: torch.Tensor,
                negative_context: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_sd: images [B, C, H, W] in [-1, 1]; context: c(x) [B, L, D]; negative_context: [B or 1, L, D]."""
        if x_sd.shape[0] != context.shape[0]:
            raise ValueError(f"GuidedDenoisingLoss: {x_sd.shape[0]} images but {context.shape[0]} contexts")
        z0 = teacher.encode_images(x_sd)
        k = self.timesteps_per_image
        if k > 1:
            z0, context = z0.repeat_interleave(k, 0), context.repeat_interleave(k, 0)
            if negative_context is not None and negative_context.shape[0] > 1:
                negative_context = negative_context.repeat_interleave(k, 0)
        z_t, t, _, target = teacher.sample_training_inputs(z0, generator)
        pred = teacher.guided_noise_prediction(z_t, t, context, negative_context, self.guidance_scale,
                                               self.guidance_rescale)
        return F.mse_loss(pred.float(), target.float())

    def extra_repr(self) -> str:
        return (f"guidance_scale={self.guidance_scale}, guidance_rescale={self.guidance_rescale}, "
                f"timesteps_per_image={self.timesteps_per_image}")
