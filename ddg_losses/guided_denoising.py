"""DDG's two losses (specs/ddg.md §2.1, §2.2).

* ``AlignmentLoss`` (Stage I, VL2V's ``DFC_STAGE1``): L = lmd * (-cos(z, v)) + (1 - lmd) * (-cos(z, t_y)), batch
  mean, with z the student's projected feature, v the frozen CLIP image embedding and t_y the CLIP text
  embedding of the label's class prompt.
* ``DiffusionDistillationLoss`` (Stage II): the frozen SD teacher denoises the image's latent conditioned on the
  student's context c(x); L = mean ||eps_hat - target||^2 with the domain-debiasing CFG prediction
  eps_hat = eps_n + w (eps_c - eps_n). Gradients reach only c(x).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class AlignmentLoss(nn.Module):
    """lmd-weighted negative cosine to the CLIP image embedding and to the class text embedding (fp32).

    Args:
        lmd: weight of the image term in [0, 1] (DDG/VL2V ``--lmd 0.5``); 1 - lmd weights the text term.
    """

    def __init__(self, lmd: float = 0.5):
        super().__init__()
        if not 0.0 <= lmd <= 1.0:
            raise ValueError(f"AlignmentLoss: 'lmd' must be in [0, 1], got {lmd}")
        self.lmd = lmd

    def forward(self, z: torch.Tensor, image_embeddings: Optional[torch.Tensor],
                text_embeddings: torch.Tensor) -> torch.Tensor:
        """z, image_embeddings, text_embeddings: [B, D] (normalised here); image_embeddings may be None
        only when lmd = 0."""
        if z.dim() != 2:
            raise ValueError(f"AlignmentLoss: 'z' must be [B, D], got {tuple(z.shape)}")
        if text_embeddings.shape != z.shape:
            raise ValueError(f"AlignmentLoss: 'text_embeddings' must be {tuple(z.shape)} like 'z', "
                             f"got {tuple(text_embeddings.shape)}")
        z = F.normalize(z.float(), dim=-1)
        text_term = -(z * F.normalize(text_embeddings.float(), dim=-1)).sum(-1).mean()
        if self.lmd == 0.0:
            return text_term
        if image_embeddings is None or image_embeddings.shape != z.shape:
            raise ValueError(f"AlignmentLoss: 'image_embeddings' must be {tuple(z.shape)} when lmd > 0, got "
                             f"{None if image_embeddings is None else tuple(image_embeddings.shape)}")
        image_term = -(z * F.normalize(image_embeddings.float(), dim=-1)).sum(-1).mean()
        return self.lmd * image_term + (1.0 - self.lmd) * text_term

    def extra_repr(self) -> str:
        return f"lmd={self.lmd}"


class DiffusionDistillationLoss(nn.Module):
    """The Stage II denoising loss through a frozen ``StableDiffusionTeacher``.

    Args:
        guidance_scale: w of the domain-debiasing guidance (1 = no CFG, the negative branch is skipped).
        guidance_rescale: phi of guidance rescale (0 disables), applied by the fused CFG op.
        timesteps_per_image: K noisy copies (timestep, noise) per image (Diffusion-TTA's ``input.batch_size``).
    """

    def __init__(self, guidance_scale: float = 1.0, guidance_rescale: float = 0.0, timesteps_per_image: int = 1):
        super().__init__()
        if not guidance_scale >= 0:
            raise ValueError(f"DiffusionDistillationLoss: 'guidance_scale' must be >= 0, got {guidance_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"DiffusionDistillationLoss: 'guidance_rescale' must be in [0, 1], got {guidance_rescale}")
        if not isinstance(timesteps_per_image, int) or timesteps_per_image < 1:
            raise ValueError("DiffusionDistillationLoss: 'timesteps_per_image' must be a positive int, got "
                             f"{timesteps_per_image!r}")
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.timesteps_per_image = timesteps_per_image

    def forward(self, teacher, x_sd: torch.Tensor, context: torch.Tensor,
                negative_context: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_sd: images [B, C, H, W] in [-1, 1]; context: c(x) [B, L, D]; negative_context: [B or 1, L, D]."""
        if x_sd.shape[0] != context.shape[0]:
            raise ValueError(f"DiffusionDistillationLoss: {x_sd.shape[0]} images but {context.shape[0]} contexts")
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
