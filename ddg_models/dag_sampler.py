"""DDIS' Domain Alignment Guidance (DAG): a guidance loss on decoded images inside latent-diffusion sampling.

At each guided step the latent is decoded by the VAE and moved one gradient step against a guidance loss of
the decoded images (DDIS: the BN-statistics loss of a pretrained classifier, ``ddg_losses.BNGuidanceLoss``);
the CFG step then runs on the moved latent. The gradient goes through the VAE decoder and the loss only: the
teacher runs under ``no_grad`` (no UNet graph is ever kept), except optionally at the last step, which is the
one path by which the Class Alignment Token is trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .guided_teacher import GuidedTeacher
from .vae_codec import VAECodec

GUIDE_TARGETS = ("z_t", "x0")

Eta = Union[float, Sequence[float], Callable[[int, int], float]]
GuidanceLoss = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DAGOutput:
    """``latents`` z_0; ``images`` the decoded batch in [0, 1] (None with ``decode=False``); ``guidance_losses``
    the guidance loss measured at every guided step (before its update), as floats, for logging."""
    latents: torch.Tensor
    images: Optional[torch.Tensor]
    guidance_losses: List[float] = field(default_factory=list)


class DAGSampler:
    r"""Text-conditioned latent-diffusion sampling with DAG (DDIS).

    Per guided step i at timestep t, with z = z_t detached:

    1. x = D(z) (``guide_target='z_t'``, the DDIS code), or D(x̂_0) with the Tweedie estimate x̂_0(z) from the
       teacher's CFG prediction at z (``'x0'``; the prediction is a constant: the gradient reaches z through the
       estimate's linear dependence on z, not through the UNet); D is the VAE codec's decode;
    2. L = ``guidance_loss(x)`` (a scalar; DDIS: ``ddg_losses.BNGuidanceLoss``);
    3. z̃ = z - eta_i * dL/dz (DDIS: eta = 50 * 0.01 * 0.001 = 5e-4, constant);
    4. under ``no_grad``: the teacher's CFG step on z̃ (:meth:`GuidedTeacher.step`: one fused op for DDIM /
       flow Euler, ``cfg_combine`` + ``scheduler.step`` for any other scheduler, e.g. PNDM).

    Guided steps are step indices; the default is ``i < num_inference_steps - 1``, as the DDIS code counts
    (every step but the last; with PNDM, whose PLMS schedule has one timestep more, the last two). With
    ``grad_steps=k`` the steps from index ``num_inference_steps - k`` on (DDIS: k = 1, its unguided tail) and
    the final decode run with autograd enabled, so a loss on the returned images trains whatever made ``cond``
    (the Class Alignment Token); every earlier step stays graph-free. A guided step inside that window keeps
    the graph through z (its DAG gradient is a constant).

    Args:
        teacher: the ``GuidedTeacher`` of the UNet (its ``guidance_scale`` is the CFG scale; DDIS: 10).
        codec: the ``VAECodec`` of the VAE the latents belong to.
        scheduler: any diffusers scheduler; x0 guidance needs ``alphas_cumprod`` and epsilon / v prediction.
        guidance_loss: ``loss(decoded_images in [-1, 1]) -> scalar`` that DAG descends.
        prompt_encoder: the teacher's ``PromptEncoder``, kept for callers (the sampler itself takes conditionings).
        eta: step size: a float, a sequence with one value per inference step, or ``eta(i, t) -> float``.
        guide_target: 'z_t' (code) or 'x0' (Tweedie).
        x0_unet_grad: with 'x0', backpropagate the loss through the UNet's prediction too (DiffDFKD; the
            x̂_0 variant). Default False: decoder and loss only, no UNet graph kept.
    """

    def __init__(self, teacher: GuidedTeacher, codec: VAECodec, scheduler, guidance_loss: GuidanceLoss, *,
                 prompt_encoder=None, eta: Eta = 5e-4, guide_target: str = "z_t", x0_unet_grad: bool = False):
        name = "DAGSampler"
        if not isinstance(teacher, GuidedTeacher):
            raise TypeError(f"{name}: 'teacher' must be a GuidedTeacher, got {type(teacher).__name__}")
        if not isinstance(codec, VAECodec):
            raise TypeError(f"{name}: 'codec' must be a VAECodec, got {type(codec).__name__}")
        if not callable(guidance_loss):
            raise TypeError(f"{name}: 'guidance_loss' must be a callable loss(decoded_images) -> scalar, got "
                            f"{type(guidance_loss).__name__}")
        if guide_target not in GUIDE_TARGETS:
            raise ValueError(f"{name}: 'guide_target' must be one of {GUIDE_TARGETS}, got {guide_target!r}")
        if not _finite_number(teacher.guidance_scale):
            raise ValueError(f"{name}: the teacher's 'guidance_scale' must be a finite number, got "
                             f"{teacher.guidance_scale!r}")
        if not isinstance(x0_unet_grad, bool) or (x0_unet_grad and guide_target != "x0"):
            raise ValueError(f"{name}: 'x0_unet_grad' is a bool that only applies to guide_target='x0', got "
                             f"{x0_unet_grad!r} with guide_target={guide_target!r}")
        if guide_target == "x0" and not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"{name}: guide_target='x0' needs a scheduler with 'alphas_cumprod' (DDPM-family), "
                             f"got {type(scheduler).__name__}")
        if guide_target == "x0" and teacher.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"{name}: guide_target='x0' needs an 'epsilon' or 'v_prediction' teacher, got "
                             f"{teacher.prediction!r}")
        _check_eta(eta)
        self.teacher, self.codec, self.scheduler = teacher, codec, scheduler
        self.guidance_loss = guidance_loss
        self.prompt_encoder = prompt_encoder
        self.eta = eta
        self.guide_target, self.x0_unet_grad = guide_target, x0_unet_grad

    # -- pieces --------------------------------------------------------------------------------
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

    def _tweedie(self, latents, t, cond, uncond):
        """x̂_0(z): the CFG prediction at z is a constant, or with ``x0_unet_grad`` part of the graph (the
        gradient then also flows through the UNet's Jacobian, at the memory of a UNet backward)."""
        scale_input = getattr(self.scheduler, "scale_model_input", None)
        model_in = scale_input(latents, t) if scale_input is not None else latents
        pred = self.teacher.guided(model_in, t, cond, uncond, grad="all" if self.x0_unet_grad else "none")
        dtype = torch.float64 if latents.dtype == torch.float64 else torch.float32
        a = self.scheduler.alphas_cumprod[int(t)].to(latents.device, dtype)
        if self.teacher.prediction == "epsilon":
            return (latents - (1 - a).sqrt() * pred) / a.sqrt()
        return a.sqrt() * latents - (1 - a).sqrt() * pred

    def guide(self, latents: torch.Tensor, t, eta: float, cond: Mapping[str, torch.Tensor],
              uncond: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, float]:
        """One DAG update z̃ = z - eta * dL/dz; returns (z̃, L)."""
        z = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            target = z if self.guide_target == "z_t" else self._tweedie(z, t, cond, uncond)
            loss = self.guidance_loss(self.codec.decode(target))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"DAGSampler: 'guidance_loss' must return a scalar tensor, got "
                                 f"{type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))}")
            (grad,) = torch.autograd.grad(loss.reshape(()), z)
        # grad is a constant; latents keep whatever graph they carry (none outside the grad_steps window).
        return latents - eta * grad, float(loss.detach())

    # -- the loop ------------------------------------------------------------------------------
    def __call__(self, cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor], *,
                 latents: torch.Tensor, num_inference_steps: int = 30, guided_steps: Optional[Sequence[int]] = None,
                 grad_steps: int = 0, decode: bool = True, progress: Optional[Callable] = None) -> DAGOutput:
        """Sample from noise ``latents`` [N, C, h, w] under the conditioning dicts ``cond`` (N rows, e.g.
        ``{"encoder_hidden_states": [N, L, D]}``) and ``uncond`` (1 or N rows). ``guided_steps``: step indices
        with DAG (default: ``range(num_inference_steps - 1)``; ``[]`` is plain CFG sampling). ``progress``:
        e.g. tqdm."""
        _check_call(cond, uncond, latents, num_inference_steps)
        if isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or not (
                0 <= grad_steps <= num_inference_steps):
            raise ValueError(f"DAGSampler.__call__: 'grad_steps' must be an int in [0, num_inference_steps="
                             f"{num_inference_steps}], got {grad_steps!r}")
        guided = set(range(num_inference_steps - 1)) if guided_steps is None else set(int(i) for i in guided_steps)
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        stepper = self.teacher.stepper(self.scheduler)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        const_cond, const_uncond = _detached(cond), _detached(uncond)
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
                latents, loss = self.guide(latents, t, self.eta_at(i, t), const_cond, const_uncond)
                losses.append(loss)
            with torch.set_grad_enabled(tail):
                latents = self.teacher.step(latents, t, cond if tail else const_cond, const_uncond, stepper,
                                            grad=tail)
        images = None
        if decode:
            with torch.set_grad_enabled(grad_steps > 0):
                images = self.codec.to_images(latents)
        return DAGOutput(latents=latents, images=images, guidance_losses=losses)


def _detached(cond: Mapping[str, torch.Tensor]) -> dict:
    return {k: v.detach() for k, v in cond.items()}


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
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or not latents.is_floating_point():
        raise ValueError(f"{name}: 'latents' must be a floating 4-d tensor, got "
                         f"{getattr(latents, 'dtype', type(latents).__name__)} of shape "
                         f"{tuple(getattr(latents, 'shape', ()))}")
    n = latents.shape[0]
    for what, c, rows in (("cond", cond, (n,)), ("uncond", uncond, (1, n))):
        if not isinstance(c, Mapping) or not c:
            raise TypeError(f"{name}: '{what}' must be a non-empty conditioning dict (e.g. "
                            f"{{'encoder_hidden_states': tensor}}), got {type(c).__name__}")
        for k, v in c.items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() < 2 or v.shape[0] not in rows:
                raise ValueError(f"{name}: '{what}[{k!r}]' must be a floating tensor with "
                                 f"{' or '.join(map(str, rows))} rows, got {getattr(v, 'dtype', type(v).__name__)} "
                                 f"of shape {tuple(getattr(v, 'shape', ()))}")
    if set(cond) != set(uncond):
        raise ValueError(f"{name}: 'cond' and 'uncond' need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}: 'num_inference_steps' must be a positive int, got {steps!r}")
