"""DDIS' Domain Alignment Guidance (DAG): BN-statistics guidance inside latent-diffusion sampling.

At each guided step the latent is decoded by the VAE, preprocessed for a pretrained BN classifier, and
moved one gradient step against DeepInversion's BN-statistics loss of that classifier; the CFG step then
runs on the moved latent (specs/ddis.md §2). The gradient goes through the VAE decoder and the classifier
only: the UNet runs under ``no_grad`` (no UNet graph is ever kept), except optionally at the last step,
which is the one path by which the Class Alignment Token is trained (§3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ddg_losses import BNStatAlignmentLoss

from .guided_sampling import FusedGuidanceStep

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESIZE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
GUIDE_TARGETS = ("z_t", "x0")
BN_BATCHES = ("per_image", "batch")

Eta = Union[float, Sequence[float], Callable[[int, int], float]]


class ClassifierPreprocess(nn.Module):
    """VAE output in [-1, 1] -> classifier input: ``clamp((x + 1) / 2, 0, 1)``, resize, normalise.

    ``ClassifierPreprocess.ddis_code()`` is what the released DDIS code does before the classifier in DAG
    (nearest resize to 224, no normalisation); ``ClassifierPreprocess.imagenet()`` is the principled variant
    (antialiased bilinear resize to 224 and ImageNet mean/std), which the project also uses for the CAT
    cross-entropy instead of the reference's CIFAR branch (its bug 2).

    Args:
        size: output side (int) or (H, W); None keeps the decoded size.
        mode: ``F.interpolate`` mode; ``antialias`` only with 'bilinear' / 'bicubic'.
        mean, std: per-channel normalisation applied after resizing; None for none.
        clamp: clamp to [0, 1] (zeroes the gradient on saturated pixels, specs/ddis.md §4 pitfall 4).
    """

    def __init__(self, size: Optional[Union[int, Tuple[int, int]]] = None, mode: str = "nearest",
                 antialias: bool = False, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, clamp: bool = True):
        super().__init__()
        name = "ClassifierPreprocess"
        if size is not None:
            sizes = (size, size) if isinstance(size, int) else tuple(size)
            if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
                raise ValueError(f"{name}: 'size' must be a positive int or (H, W), got {size!r}")
            size = sizes
        if mode not in _RESIZE_MODES:
            raise ValueError(f"{name}: 'mode' must be one of {_RESIZE_MODES}, got {mode!r}")
        if antialias and mode not in ("bilinear", "bicubic"):
            raise ValueError(f"{name}: 'antialias' needs mode 'bilinear' or 'bicubic', got mode {mode!r}")
        if (mean is None) != (std is None):
            raise ValueError(f"{name}: give both 'mean' and 'std' or neither, got mean={mean!r}, std={std!r}")
        if mean is not None:
            if len(mean) != len(std) or not all(s > 0 for s in std):
                raise ValueError(f"{name}: 'mean' and 'std' must have one value per channel and std > 0, got "
                                 f"mean={tuple(mean)}, std={tuple(std)}")
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        else:
            self.mean = self.std = None
        self.size, self.mode, self.antialias, self.clamp = size, mode, bool(antialias), bool(clamp)

    @classmethod
    def ddis_code(cls, size: int = 224) -> "ClassifierPreprocess":
        return cls(size=size, mode="nearest")

    @classmethod
    def imagenet(cls, size: int = 224) -> "ClassifierPreprocess":
        return cls(size=size, mode="bilinear", antialias=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def forward(self, decoded: torch.Tensor) -> torch.Tensor:
        if not isinstance(decoded, torch.Tensor) or decoded.dim() != 4 or not decoded.is_floating_point():
            raise ValueError(f"ClassifierPreprocess: input must be a floating [N, C, H, W] image batch in [-1, 1], "
                             f"got {getattr(decoded, 'dtype', type(decoded).__name__)} of shape "
                             f"{tuple(getattr(decoded, 'shape', ()))}")
        x = decoded / 2 + 0.5
        if self.clamp:
            x = x.clamp(0, 1)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            kwargs = {"antialias": True} if self.antialias else {}
            if self.mode in ("bilinear", "bicubic"):
                kwargs["align_corners"] = False
            x = F.interpolate(x, size=self.size, mode=self.mode, **kwargs)
        if self.mean is not None:
            if x.shape[1] != self.mean.shape[1]:
                raise ValueError(f"ClassifierPreprocess: input has {x.shape[1]} channels, 'mean'/'std' have "
                                 f"{self.mean.shape[1]}")
            x = (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)
        return x

    def extra_repr(self) -> str:
        norm = "none" if self.mean is None else f"mean={tuple(self.mean.flatten().tolist())}"
        return f"size={self.size}, mode={self.mode!r}, antialias={self.antialias}, clamp={self.clamp}, norm={norm}"


@dataclass
class DAGOutput:
    """``latents`` z_0; ``images`` the decoded batch in [0, 1] (None with ``decode=False``); ``bn_losses`` the
    BN loss measured at every guided step (before its update), as floats, for logging."""
    latents: torch.Tensor
    images: Optional[torch.Tensor]
    bn_losses: List[float] = field(default_factory=list)


class DAGSampler:
    r"""Text-conditioned latent-diffusion sampling with DAG (DDIS, specs/ddis.md §2).

    Per guided step i at timestep t, with z = z_t detached:

    1. x = D(z / s) (``guide_target='z_t'``, the DDIS code), or D(x̂_0 / s) with the Tweedie estimate
       x̂_0(z) from the CFG prediction at z (``'x0'``; the prediction is a constant: the gradient reaches z
       through the estimate's linear dependence on z, not through the UNet);
    2. L = BN loss of ``classifier(preprocess(x))`` (:class:`ddg_losses.BNStatAlignmentLoss`; unsquared by
       default); with ``bn_batch='per_image'`` each image is scored on its own spatial statistics, as the
       code's batch of 1 does, and L is the sum over images;
    3. z̃ = z - eta_i * dL/dz (DDIS: eta = 50 * 0.01 * 0.001 = 5e-4, constant);
    4. under ``no_grad``: CFG UNet on z̃ and the scheduler update (:class:`FusedGuidanceStep`: one fused op for
       DDIM / flow Euler, ``cfg_combine`` + ``scheduler.step`` for any other scheduler, e.g. PNDM).

    Guided steps are step indices; the default is ``i < num_inference_steps - 1``, as the DDIS code counts
    (every step but the last; with PNDM, whose PLMS schedule has one timestep more, the last two). With
    ``grad_steps=k`` the steps from index ``num_inference_steps - k`` on (DDIS: k = 1, its unguided tail) and
    the final decode run with autograd enabled, so a loss on the returned images trains whatever made
    ``cond_embeds`` (the Class Alignment Token); every earlier step stays graph-free. A guided step inside
    that window keeps the graph through z (its DAG gradient is a constant).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or anything with its call signature).
        vae: a diffusers ``AutoencoderKL``; latents are ``vae.config.scaling_factor`` (and ``shift_factor``) scaled.
        scheduler: any diffusers scheduler; x0 guidance needs ``alphas_cumprod`` and epsilon / v prediction.
        text_encoder, tokenizer: CLIP text stack used by :meth:`encode_prompt` (optional if you pass embeddings).
        classifier: pretrained classifier with BatchNorm layers, in eval mode (DAG reads its running stats).
        preprocess: decoded image -> classifier input; default :meth:`ClassifierPreprocess.ddis_code`.
        eta: step size: a float, a sequence with one value per inference step, or ``eta(i, t) -> float``.
        guidance_scale: CFG scale (DDIS: 10).
        bn_form, bn_layers, first_bn_multiplier: passed to :class:`BNStatAlignmentLoss`.
        guide_target: 'z_t' (code) or 'x0' (Tweedie).
        x0_unet_grad: with 'x0', backpropagate the BN loss through the UNet's prediction too (DiffDFKD; the
            spec's x̂_0 variant). Default False: decoder and classifier only, no UNet graph kept.
        bn_batch: 'per_image' (one classifier forward per image) or 'batch' (statistics over the batch).
    """

    def __init__(self, unet, vae, scheduler, classifier: nn.Module, *, text_encoder=None, tokenizer=None,
                 preprocess: Optional[nn.Module] = None, eta: Eta = 5e-4, guidance_scale: float = 10.0,
                 bn_form: str = "unsquared", bn_layers: Optional[Sequence[str]] = None,
                 first_bn_multiplier: float = 1.0, guide_target: str = "z_t", bn_batch: str = "per_image",
                 x0_unet_grad: bool = False):
        name = "DAGSampler"
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"{name}: 'classifier' must be an nn.Module, got {type(classifier).__name__}")
        if classifier.training:
            raise ValueError(f"{name}: 'classifier' must be in eval mode (DAG aligns to its running statistics and "
                             f"a train-mode forward would overwrite them); call classifier.eval()")
        if guide_target not in GUIDE_TARGETS:
            raise ValueError(f"{name}: 'guide_target' must be one of {GUIDE_TARGETS}, got {guide_target!r}")
        if bn_batch not in BN_BATCHES:
            raise ValueError(f"{name}: 'bn_batch' must be one of {BN_BATCHES}, got {bn_batch!r}")
        if not _finite_number(guidance_scale):
            raise ValueError(f"{name}: 'guidance_scale' must be a finite number, got {guidance_scale!r}")
        if not isinstance(x0_unet_grad, bool) or (x0_unet_grad and guide_target != "x0"):
            raise ValueError(f"{name}: 'x0_unet_grad' is a bool that only applies to guide_target='x0', got "
                             f"{x0_unet_grad!r} with guide_target={guide_target!r}")
        if guide_target == "x0" and not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"{name}: guide_target='x0' needs a scheduler with 'alphas_cumprod' (DDPM-family), "
                             f"got {type(scheduler).__name__}")
        _check_eta(eta)
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.classifier = classifier
        self.preprocess = preprocess if preprocess is not None else ClassifierPreprocess.ddis_code()
        self.eta = eta
        self.guidance_scale = float(guidance_scale)
        self.guide_target, self.bn_batch, self.x0_unet_grad = guide_target, bn_batch, x0_unet_grad
        self.bn_loss = BNStatAlignmentLoss(classifier, layers=bn_layers, form=bn_form,
                                           first_bn_multiplier=first_bn_multiplier)
        self.bn_loss.enabled = False  # on only inside the guidance step: plain classifier calls add nothing

    # -- pieces --------------------------------------------------------------------------------
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden states of ``prompts`` padded to the tokenizer's max length (autograd as the caller)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("DAGSampler.encode_prompt: the sampler was built without 'text_encoder'/'tokenizer'; "
                             "pass them, or pass embeddings to the call")
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"DAGSampler.encode_prompt: 'prompts' must be a list of str, got {prompts!r}")
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode of SD-scaled latents, output in the VAE's [-1, 1] range (autograd as the caller)."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        shift = getattr(cfg, "shift_factor", None)
        if shift:
            z = z + shift
        return self.vae.decode(z, return_dict=False)[0]

    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoded images in [0, 1]."""
        return (self.decode(latents) / 2 + 0.5).clamp(0, 1)

    def eta_at(self, i: int, t) -> float:
        eta = self.eta
        if callable(eta):
            value = eta(i, int(t))
        elif isinstance(eta, Real):
            value = eta
        else:
            if i >= len(eta):
                raise ValueError(f"DAGSampler: 'eta' has {len(eta)} values, step {i} needs one")
            value = eta[i]
        if not _finite_number(value):
            raise ValueError(f"DAGSampler: eta at step {i} must be a finite number, got {value!r}")
        return float(value)

    def bn_loss_of(self, decoded: torch.Tensor) -> torch.Tensor:
        """BN loss of decoded images (the quantity DAG descends); per image or over the batch."""
        x = self.preprocess(decoded)
        self.bn_loss.reset()
        self.bn_loss.enabled = True
        try:
            for chunk in (x.split(1) if self.bn_batch == "per_image" else (x,)):
                self.classifier(chunk)
            return self.bn_loss()
        finally:
            self.bn_loss.enabled = False

    def _model_output(self, latents, t, embeds):
        scale_input = getattr(self.scheduler, "scale_model_input", lambda sample, t: sample)
        model_in = scale_input(torch.cat([latents, latents]), t)
        uncond, cond = self.unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0].chunk(2)
        return uncond, cond

    def _tweedie(self, latents, t, embeds):
        """x̂_0(z): the CFG prediction at z is a constant, or with ``x0_unet_grad`` part of the graph (the
        gradient then also flows through the UNet's Jacobian, at the memory of a UNet backward)."""
        with torch.set_grad_enabled(self.x0_unet_grad):
            uncond, cond = self._model_output(latents, t, embeds)
            pred = uncond + self.guidance_scale * (cond - uncond)
        dtype = torch.float64 if latents.dtype == torch.float64 else torch.float32
        a = self.scheduler.alphas_cumprod[int(t)].to(latents.device, dtype)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (latents - (1 - a).sqrt() * pred) / a.sqrt()
        if kind == "v_prediction":
            return a.sqrt() * latents - (1 - a).sqrt() * pred
        raise ValueError(f"DAGSampler: guide_target='x0' needs prediction_type 'epsilon' or 'v_prediction', "
                         f"got {kind!r}")

    def guide(self, latents: torch.Tensor, t, eta: float, embeds: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """One DAG update z̃ = z - eta * dL/dz; returns (z̃, L)."""
        z = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            target = z if self.guide_target == "z_t" else self._tweedie(z, t, embeds)
            loss = self.bn_loss_of(self.decode(target))
            (grad,) = torch.autograd.grad(loss, z)
        # grad is a constant; latents keep whatever graph they carry (none outside the grad_steps window).
        return latents - eta * grad, float(loss.detach())

    # -- the loop ------------------------------------------------------------------------------
    def __call__(self, cond_embeds: torch.Tensor, uncond_embeds: torch.Tensor, *, latents: torch.Tensor,
                 num_inference_steps: int = 30, guided_steps: Optional[Sequence[int]] = None,
                 grad_steps: int = 0, decode: bool = True,
                 progress: Optional[Callable] = None) -> DAGOutput:
        """Sample from noise ``latents`` [N, C, h, w] with per-sample text embeddings ``cond_embeds`` [N, L, D]
        and the unconditional ones (``[1, L, D]`` or ``[N, L, D]``). ``guided_steps``: step indices with DAG
        (default: ``range(num_inference_steps - 1)``; ``[]`` is plain CFG sampling). ``progress``: e.g. tqdm."""
        _check_call(cond_embeds, uncond_embeds, latents, num_inference_steps)
        if isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or not (
                0 <= grad_steps <= num_inference_steps):
            raise ValueError(f"DAGSampler.__call__: 'grad_steps' must be an int in [0, num_inference_steps="
                             f"{num_inference_steps}], got {grad_steps!r}")
        n = latents.shape[0]
        guided = set(range(num_inference_steps - 1)) if guided_steps is None else set(int(i) for i in guided_steps)
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        step = FusedGuidanceStep(self.scheduler, self.guidance_scale)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        embeds = torch.cat([uncond_embeds.expand(n, -1, -1), cond_embeds])
        losses = []
        timesteps = list(self.scheduler.timesteps)
        # An index past the schedule (or a negative one meaning "from the end") would silently guide nothing.
        outside = sorted(i for i in guided if not 0 <= i < len(timesteps))
        if outside:
            raise ValueError(f"DAGSampler.__call__: 'guided_steps' must be step indices in [0, {len(timesteps)}) "
                             f"({type(self.scheduler).__name__} has {len(timesteps)} timesteps for "
                             f"{num_inference_steps} inference steps), got {outside}")
        for i, t in enumerate(progress(timesteps) if progress is not None else timesteps):
            # The tail: index num_inference_steps - 1 on. One step for DDIM; PNDM's PLMS has one timestep more
            # than inference steps, and the DDIS code runs both of its tail steps with autograd on.
            tail = grad_steps > 0 and i >= num_inference_steps - grad_steps
            if i in guided:
                latents, loss = self.guide(latents, t, self.eta_at(i, t), embeds.detach())
                losses.append(loss)
            with torch.set_grad_enabled(tail):
                step_embeds = embeds if tail else embeds.detach()
                uncond, cond = self._model_output(latents, t, step_embeds)
                latents = step(uncond, cond, t, latents)
        images = None
        if decode:
            with torch.set_grad_enabled(grad_steps > 0):
                images = self.to_images(latents)
        return DAGOutput(latents=latents, images=images, bn_losses=losses)


def _finite_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_eta(eta) -> None:
    if callable(eta) or _finite_number(eta):
        return
    if isinstance(eta, Real) and not isinstance(eta, bool):
        raise ValueError(f"DAGSampler: 'eta' must be finite, got {eta}")
    if isinstance(eta, Sequence) and not isinstance(eta, str) and all(_finite_number(e) for e in eta):
        return
    raise TypeError(f"DAGSampler: 'eta' must be a finite number, a sequence of numbers (one per step) or a callable "
                    f"eta(i, t), got {eta!r}")


def _check_call(cond, uncond, latents, steps) -> None:
    name = "DAGSampler.__call__"
    for what, x, dim in (("cond_embeds", cond, 3), ("uncond_embeds", uncond, 3), ("latents", latents, 4)):
        if not isinstance(x, torch.Tensor) or x.dim() != dim or not x.is_floating_point():
            raise ValueError(f"{name}: '{what}' must be a floating {dim}-d tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if cond.shape[0] != latents.shape[0]:
        raise ValueError(f"{name}: 'cond_embeds' must have one row per latent ({latents.shape[0]}), got "
                         f"{cond.shape[0]}")
    if uncond.shape[0] not in (1, latents.shape[0]) or uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(f"{name}: 'uncond_embeds' must be [1 or {latents.shape[0]}, {cond.shape[1]}, "
                         f"{cond.shape[2]}], got {tuple(uncond.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}: 'num_inference_steps' must be a positive int, got {steps!r}")
