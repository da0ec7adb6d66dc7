"""The frozen Stable Diffusion teacher of DDG and its domain-debiasing guidance (docs/methods/ddg.md §2.2).

``StableDiffusionTeacher`` is deliberately *not* an nn.Module: a student, a SWAD average or a checkpoint that
holds a reference to it never copies or saves the ~4 GB of VAE + UNet + text encoder. Every component is frozen
(``requires_grad=False``, eval mode); gradients reach only the conditioning tensor handed to it.

Per training step (Diffusion-TTA / DIVA mechanics): z0 = scale * VAE.enc(x_sd).mean (no grad), t ~ U{0..T-1} and
a fresh eps per sample, z_t = add_noise(z0, eps, t), then the debiased prediction

    eps_hat = eps_n + w * (eps_c - eps_n),  eps_c = UNet(z_t, t, c(x)),  eps_n = UNet(z_t, t, c_neg) (no grad)

through the fused ``ddg_ops.cfg_combine`` (optional guidance rescale). w = 1 skips the negative branch.
The UNet is a ``GuidedTeacher``, the text stack a ``PromptEncoder`` and the VAE a ``VAECodec`` (docs/teacher.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .guided_teacher import GuidedTeacher
from .prompt_encoder import PromptEncoder
from .vae_codec import VAECodec
COMPONENTS = ("vae", "unet", "scheduler", "text_encoder", "tokenizer")


def images_to_sd(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], resolution: Optional[int] = None,
                 channels: int = 3) -> torch.Tensor:
    """A normalised classifier batch [B, C, H, W] as SD input: un-normalise, map [0, 1] -> [-1, 1]
    (Diffusion-TTA's VQVAEUnNormalize), resize to ``resolution`` and repeat a grey channel to ``channels``."""
    if x.dim() != 4 or len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"images_to_sd: 'x' must be [B, C, H, W] with C = len(mean) = len(std), got "
                         f"{tuple(x.shape)}, {len(mean)} means, {len(std)} stds")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = 2 * (x * s + m) - 1
    if resolution is not None and x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise ValueError(f"images_to_sd: {x.shape[1]} image channels cannot feed a {channels}-channel VAE")
        x = x.expand(-1, channels, -1, -1)
    return x


class StableDiffusionTeacher:
    """Frozen VAE + UNet2DConditionModel + noise scheduler + text encoder/tokenizer (a diffusers SD folder)."""

    def __init__(self, vae, unet, scheduler, text_encoder, tokenizer):
        if getattr(unet.config, "cross_attention_dim", None) != text_encoder.config.hidden_size:
            raise ValueError(f"StableDiffusionTeacher: the UNet's cross_attention_dim "
                             f"{getattr(unet.config, 'cross_attention_dim', None)} != the text encoder's "
                             f"hidden_size {text_encoder.config.hidden_size}")
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"StableDiffusionTeacher: UNet in_channels {unet.config.in_channels} != VAE "
                             f"latent_channels {vae.config.latent_channels}")
        kind = scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"StableDiffusionTeacher: prediction_type {kind!r} is not supported "
                             "(epsilon or v_prediction)")
        self.vae, self.unet, self.text_encoder = vae, unet, text_encoder
        self.scheduler, self.tokenizer = scheduler, tokenizer
        for module in (vae, unet, text_encoder):
            module.requires_grad_(False)
            module.eval()
        self.teacher = GuidedTeacher(unet, kind)
        self.prompt_encoder = PromptEncoder.clip(tokenizer, text_encoder)
        self.codec = VAECodec(vae)

    def __deepcopy__(self, memo) -> "StableDiffusionTeacher":
        return self  # frozen: copies of a module that holds the teacher share it

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], torch_dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None) -> "StableDiffusionTeacher":
        """Load from a local diffusers Stable Diffusion folder (vae/, unet/, scheduler/, text_encoder/,
        tokenizer/). The scheduler is read as a DDPMScheduler (SD's training noise schedule), whatever class
        the folder names (SD v1.4 ships a PNDM config with the same betas)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path = Path(path)
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"StableDiffusionTeacher.from_pretrained: {path} lacks {missing} (expected a "
                                    f"local diffusers Stable Diffusion folder with {', '.join(COMPONENTS)})")
        kw = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        teacher = cls(vae=AutoencoderKL.from_pretrained(path / "vae", **kw),
                      unet=UNet2DConditionModel.from_pretrained(path / "unet", **kw),
                      scheduler=DDPMScheduler.from_pretrained(path / "scheduler"),
                      text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", **kw),
                      tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"))
        return teacher.to(device) if device is not None else teacher

    def save_pretrained(self, path: Union[str, Path]) -> None:
        path = Path(path)
        for name in COMPONENTS:
            getattr(self, name).save_pretrained(path / name)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "StableDiffusionTeacher":
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.vae, self.unet, self.text_encoder):
            module.to(**kwargs)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet activations in backward (the weights are frozen, but the context needs a gradient)."""
        self.unet.enable_gradient_checkpointing()

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def context_shape(self) -> Tuple[int, int]:
        """(L, D) of one cross-attention context: (77, 768) for SD v1.x."""
        return self.tokenizer.model_max_length, self.text_encoder.config.hidden_size

    # --------------------------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Last hidden states [N, L, D] of the prompts padded to L (SD's own prompt encoding), fp32."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"StableDiffusionTeacher.encode_prompts: 'prompts' must be a non-empty list of "
                             f"strings, got {prompts!r}")
        return self.prompt_encoder(list(prompts))["encoder_hidden_states"].float()

    @torch.no_grad()
    def encode_images(self, x_sd: torch.Tensor) -> torch.Tensor:
        """z0 = scaling_factor * VAE posterior mean of images in [-1, 1] (the mean, not a sample)."""
        if x_sd.dim() != 4 or x_sd.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"StableDiffusionTeacher.encode_images: 'x_sd' must be [B, "
                             f"{self.vae.config.in_channels}, H, W] in [-1, 1], got {tuple(x_sd.shape)}")
        return self.codec.encode(x_sd)

    # ------------------------------------------------------------------------------------- the training step
    def sample_training_inputs(self, z0: torch.Tensor, generator: Optional[torch.Generator] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t, t, noise, target): t ~ U{0..T-1} and noise ~ N(0, I) per sample; target is the noise for an
        epsilon-prediction model and the velocity for a v-prediction one."""
        num_steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, num_steps, (z0.shape[0],), generator=generator, device=z0.device)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        return self.noised(z0, noise, t)

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t, t, noise, target) for given noise and timesteps."""
        z_t = self.scheduler.add_noise(z0, noise, t)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(z0, noise, t)
        else:
            raise ValueError(f"StableDiffusionTeacher: prediction_type {kind!r} is not supported "
                             "(epsilon or v_prediction)")
        return z_t, t, noise, target

    def guided_noise_prediction(self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                                negative_context: Optional[torch.Tensor], guidance_scale: float,
                                guidance_rescale: float = 0.0) -> torch.Tensor:
        """The domain-debiasing CFG prediction eps_n + w (eps_c - eps_n), differentiable in ``context`` only.

        ``negative_context``: [B, L, D] or [1, L, D] (the empty prompt or each sample's source-domain prompt);
        may be None only when ``guidance_scale`` is 1 (plain conditional prediction).
        """
        if context.dim() != 3 or context.shape[0] != z_t.shape[0]:
            raise ValueError(f"StableDiffusionTeacher.guided_noise_prediction: 'context' must be [B={z_t.shape[0]},"
                             f" L, D], got {tuple(context.shape)}")
        negative = None
        if guidance_scale != 1.0:
            if negative_context is None:
                raise ValueError("StableDiffusionTeacher.guided_noise_prediction: 'negative_context' is required "
                                 f"when guidance_scale != 1 (got {guidance_scale})")
            if negative_context.dim() != 3 or negative_context.shape[0] not in (1, z_t.shape[0]) \
                    or negative_context.shape[1:] != context.shape[1:]:
                raise ValueError("StableDiffusionTeacher.guided_noise_prediction: 'negative_context' must be [B or "
                                 f"1, {context.shape[1]}, {context.shape[2]}], got {tuple(negative_context.shape)}")
            negative = {"encoder_hidden_states": negative_context}
        # guided(grad='cond') skips the negative branch at w = 1 only without rescale, as before.
        if guidance_scale == 1.0:
            return self.teacher.predict(z_t, t, {"encoder_hidden_states": context})
        return self.teacher.guided(z_t, t, {"encoder_hidden_states": context}, negative, scale=guidance_scale,
                                   rescale=guidance_rescale, grad="cond")
