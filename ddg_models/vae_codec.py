"""Images <-> the latents a latent-diffusion teacher works in (docs/teacher.md, "VAE codec").

Latents are ``(z - shift_factor) * scaling_factor`` of the autoencoder's posterior (SD 1.x/2.x: scale 0.18215,
no shift; SD3: 1.5305 and 0.0609), the convention of diffusers' pipelines; decoding inverts it. Images are in
the autoencoder's [-1, 1] range; :meth:`VAECodec.to_images` maps to [0, 1]. Inputs are cast to the VAE's dtype
and outputs come back in fp32 (fp64 for an fp64 VAE). Autograd is the caller's: DAG backpropagates through the
decoder, a VAE being trained through :meth:`VAECodec.reconstruct`.
"""
from __future__ import annotations

from typing import Optional

import torch


class VAECodec:
    """A diffusers ``AutoencoderKL`` (or anything with its ``encode(x).latent_dist`` / ``decode(z).sample``)
    with the latent scaling of its config. Not an nn.Module and does not freeze the VAE (the tiny presets train
    theirs through :meth:`reconstruct`); the teachers that hold one freeze it."""

    def __init__(self, vae):
        config = getattr(vae, "config", None)
        if config is None or not hasattr(vae, "encode") or not hasattr(vae, "decode"):
            raise TypeError(f"VAECodec: 'vae' must be an autoencoder with encode/decode and a config (diffusers "
                            f"AutoencoderKL), got {type(vae).__name__}")
        self.vae = vae

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.promote_types(x.dtype, torch.float32))

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents of images [B, C, H, W] in [-1, 1]: the posterior mean, or a draw with ``sample``."""
        channels = getattr(self.vae.config, "in_channels", None)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point() \
                or (channels is not None and images.shape[1] != channels):
            raise ValueError(f"VAECodec.encode: 'images' must be a floating [B, {channels}, H, W] batch in [-1, 1], "
                             f"got {getattr(images, 'dtype', type(images).__name__)} of shape "
                             f"{tuple(getattr(images, 'shape', ()))}")
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mean
        z = self._out(z)
        if self.shift_factor:
            z = z - self.shift_factor
        return z * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (not clamped) of scaled latents."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or not latents.is_floating_point():
            raise ValueError(f"VAECodec.decode: 'latents' must be a floating [B, C, h, w] tensor, got "
                             f"{getattr(latents, 'dtype', type(latents).__name__)} of shape "
                             f"{tuple(getattr(latents, 'shape', ()))}")
        z = latents / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        return self._out(self.vae.decode(z.to(self.dtype), return_dict=False)[0])

    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoded images in [0, 1]."""
        return (self.decode(latents) / 2 + 0.5).clamp(0, 1)

    def reconstruct(self, images: torch.Tensor, generator: Optional[torch.Generator] = None):
        """(reconstruction, posterior) of one autoencoder pass on unscaled latents (a posterior draw): the round
        trip a VAE is trained on."""
        posterior = self.vae.encode(images.to(self.dtype)).latent_dist
        return self.vae.decode(posterior.sample(generator=generator), return_dict=False)[0], posterior

