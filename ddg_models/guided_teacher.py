"""The frozen denoiser with classifier-free guidance that every method distils from (docs/teacher.md).

``GuidedTeacher`` wraps any denoiser called as ``model(x, timestep=t, **cond)`` (model_call.py: diffusers'
UNet2DConditionModel and SD3Transformer2DModel, or a plain module) and is the one place where CFG of a teacher
is written: the [uncond; cond] pair from one batched call, the guided prediction through the fused
``ddg_ops.cfg_combine``, one sampler step through the fused ``cfg_step`` (``FusedGuidanceStep``), the k-step flow
rollout and the whole sampling loop.

It is a plain object, not an ``nn.Module``: a trained module that keeps a reference to it never registers it as
a submodule, so DDP/FSDP wrapping, ``state_dict`` and ``parameters()`` never see its weights, and a deep copy of
such a module (SWAD's averages) shares the teacher instead of copying it.
Inputs are cast to the teacher's dtype at the call boundary and predictions come back in fp32 (fp64 for an
fp64 teacher), so a bf16 teacher serves fp32 latents and every fused op after it accumulates in fp32.
"""
from __future__ import annotations

from numbers import Real
from typing import Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ddg_ops import cfg_combine, cfg_step

from .few_step_generator import shifted_flow_sigmas
from .model_call import Conditioning, batch_timestep, concat_conditions, model_prediction

PREDICTIONS = ("epsilon", "v_prediction", "velocity")
GRADIENTS = ("none", "cond", "all")
Scale = Union[float, torch.Tensor]


class GuidedTeacher:
    """A frozen denoiser + CFG.

    Args:
        model: the teacher network (an ``nn.Module`` is frozen here: requires_grad False, eval mode) or any
            callable ``model(x, timestep=t, **cond)``.
        prediction: what the model predicts: 'epsilon', 'v_prediction' (DDPM family) or 'velocity' (flow
            matching, dx/dsigma).
        guidance_scale: the default CFG scale s of ``u + s (c - u)``; every method takes ``scale`` to override.
        guidance_rescale: the default guidance rescale phi (Lin et al. 2023; 0 disables).
        timestep_scale: the timestep fed at sigma = 1 in flow rollouts (diffusers' num_train_timesteps).
    """

    def __init__(self, model, prediction: str, guidance_scale: Scale = 1.0, guidance_rescale: float = 0.0,
                 timestep_scale: float = 1000.0):
        name = "GuidedTeacher"
        if not callable(model):
            raise TypeError(f"{name}: 'model' must be an nn.Module or a callable model(x, timestep=t, **cond), got "
                            f"{type(model).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"{name}: 'prediction' must be one of {PREDICTIONS}, got {prediction!r}")
        _check_scale(name, "guidance_scale", guidance_scale)
        if not isinstance(guidance_rescale, Real) or not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"{name}: 'guidance_rescale' must be a number in [0, 1], got {guidance_rescale!r}")
        if not isinstance(timestep_scale, Real) or not timestep_scale > 0:
            raise ValueError(f"{name}: 'timestep_scale' must be a positive number, got {timestep_scale!r}")
        if isinstance(model, nn.Module):
            model.requires_grad_(False).eval()
        self.model = model
        self.prediction = prediction
        self.guidance_scale = guidance_scale
        self.guidance_rescale = float(guidance_rescale)
        self.timestep_scale = float(timestep_scale)

    # ------------------------------------------------------------------------------------ placement
    def _first_parameter(self) -> Optional[torch.Tensor]:
        if not isinstance(self.model, nn.Module):
            return None
        return next((p for p in self.model.parameters() if p.is_floating_point()), None)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The weights' dtype (None for a callable without parameters: inputs are then passed as they are)."""
        p = self._first_parameter()
        return None if p is None else p.dtype

    @property
    def device(self) -> Optional[torch.device]:
        p = self._first_parameter()
        return None if p is None else p.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "GuidedTeacher":
        if isinstance(self.model, nn.Module):
            self.model.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (frozen weights, but a conditioning may need a gradient)."""
        self.model.enable_gradient_checkpointing()

    def output_dtype(self, x: torch.Tensor) -> torch.dtype:
        """fp32 for a half-precision or fp32 teacher, fp64 for an fp64 one."""
        return torch.promote_types(self.dtype or x.dtype, torch.float32)

    # ------------------------------------------------------------------------------------ predictions
    def predict(self, x: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
        """The model's prediction at (x, timestep) under ``cond``, autograd as the caller. x and every floating
        conditioning tensor are cast to the teacher's dtype; the result is in :meth:`output_dtype`."""
        _check_latents("GuidedTeacher.predict", x)
        if not isinstance(cond, Mapping):
            raise TypeError(f"GuidedTeacher.predict: 'cond' must be a mapping of keyword tensors (e.g. "
                            f"encoder_hidden_states), got {type(cond).__name__}")
        t = batch_timestep(timestep, x)
        dtype = self.dtype
        if dtype is not None:
            x = x.to(dtype)
            cond = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    for k, v in cond.items()}
        out = model_prediction(self.model, x, t, cond)
        return out.to(torch.promote_types(dtype or out.dtype, torch.float32))

    def pair(self, x: torch.Tensor, timestep, cond: Conditioning, uncond: Conditioning,
             grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(uncond, cond) predictions at x from one model call on the doubled batch. Conditioning tensors hold
        one row per sample or one row for all. ``grad=False`` runs under no_grad; True: autograd as the caller."""
        op = "GuidedTeacher.pair"
        _check_latents(op, x)
        n = x.shape[0]
        both = concat_conditions(_rows(op, "uncond", uncond, n), _rows(op, "cond", cond, n))
        t = batch_timestep(timestep, x)
        with torch.set_grad_enabled(bool(grad) and torch.is_grad_enabled()):
            out = self.predict(torch.cat([x, x]), torch.cat([t, t]), both)
        return out.chunk(2)

    def guided(self, x: torch.Tensor, timestep, cond: Conditioning, uncond: Optional[Conditioning] = None, *,
               scale: Optional[Scale] = None, rescale: Optional[float] = None, grad: str = "none") -> torch.Tensor:
        """The guided prediction ``u + s (c - u)`` (guidance-rescaled) through the fused ``cfg_combine``.

        grad='none': one batched call under no_grad (a constant). grad='cond': the conditional branch with
        autograd as the caller and the unconditional one under no_grad (DDG: the student's context gets the
        gradient, the negative is a fixed reference); at a scale of exactly 1 the unconditional call is skipped
        and ``uncond`` may be None. grad='all': one batched call with autograd as the caller (a gradient through
        the model's Jacobian w.r.t. x, as DAG's x0 guidance through the UNet needs).
        """
        op = "GuidedTeacher.guided"
        if grad not in GRADIENTS:
            raise ValueError(f"{op}: 'grad' must be one of {GRADIENTS}, got {grad!r}")
        s = self.guidance_scale if scale is None else scale
        r = self.guidance_rescale if rescale is None else rescale
        _check_scale(op, "scale", s)
        if grad == "cond":
            c = self.predict(x, timestep, cond)
            if isinstance(s, Real) and s == 1.0 and r == 0.0:
                return c
            if uncond is None:
                raise ValueError(f"{op}: 'uncond' is required when the guidance scale is not 1 (got {s})")
            with torch.no_grad():
                u = self.predict(x, timestep, _rows(op, "uncond", uncond, x.shape[0]))
            return cfg_combine(u, c, s, r)
        if uncond is None:
            raise ValueError(f"{op}: 'uncond' is required with grad={grad!r}")
        u, c = self.pair(x, timestep, cond, uncond, grad=grad == "all")
        return cfg_combine(u, c, s, r)

    # ------------------------------------------------------------------------------------ sampling
    def stepper(self, scheduler, scale: Optional[Scale] = None, rescale: Optional[float] = None):
        """A ``FusedGuidanceStep`` on ``scheduler`` (``set_timesteps`` already called) with this teacher's scales.
        Checks that the scheduler expects what the model predicts."""
        from .guided_sampling import FusedGuidanceStep

        _check_scheduler(self.prediction, scheduler)
        return FusedGuidanceStep(scheduler, self.guidance_scale if scale is None else scale,
                                 self.guidance_rescale if rescale is None else rescale)

    def step(self, latents: torch.Tensor, timestep, cond: Conditioning, uncond: Conditioning, stepper,
             grad: bool = False) -> torch.Tensor:
        """One sampler step: the scheduler's model-input scaling, the pair at ``timestep`` and the fused CFG +
        scheduler update of ``stepper`` (:meth:`stepper`). Latents come back in :meth:`output_dtype`."""
        scale_input = getattr(stepper.scheduler, "scale_model_input", None)
        model_in = scale_input(latents, timestep) if scale_input is not None else latents
        u, c = self.pair(model_in, timestep, cond, uncond, grad=grad)
        return stepper(u, c, timestep, latents.to(u.dtype))

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, cond: Conditioning, uncond: Conditioning, scheduler,
               num_inference_steps: int, *, scale: Optional[Scale] = None,
               rescale: Optional[float] = None) -> torch.Tensor:
        """The guided sampling loop a diffusers pipeline runs, from noise ``latents`` (scaled here by the
        scheduler's ``init_noise_sigma``), one batched [uncond; cond] call and one fused step per timestep."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError(f"GuidedTeacher.sample: 'num_inference_steps' must be a positive int, got "
                             f"{num_inference_steps!r}")
        _check_latents("GuidedTeacher.sample", latents)
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        stepper = self.stepper(scheduler, scale, rescale)
        # Flow-matching schedulers scale neither the initial noise nor the model input.
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            latents = self.step(latents, t, cond, uncond, stepper)
        return latents

    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, cond: Conditioning, uncond: Conditioning, num_inference_steps: int,
                steps: int, shift: float = 3.0, *, scale: Optional[Scale] = None) -> Tuple[torch.Tensor, float]:
        """``steps`` CFG Euler steps from ``noise`` (sigma = 1) on the ``num_inference_steps`` grid of ``shift``
        (fused CFG + Euler). Returns (z_k, sigma_k), z_k in :meth:`output_dtype`; steps = num_inference_steps
        samples the teacher to sigma = 0."""
        op = "GuidedTeacher.rollout"
        if self.prediction != "velocity":
            raise ValueError(f"{op}: the Euler rollout needs a flow-matching (prediction='velocity') teacher, "
                             f"this one is {self.prediction!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError(f"{op}: 'num_inference_steps' must be a positive int, got {num_inference_steps!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= num_inference_steps:
            raise ValueError(f"{op}: 'steps' must be an int in [0, num_inference_steps={num_inference_steps}], "
                             f"got {steps!r}")
        _check_latents(op, noise)
        s = self.guidance_scale if scale is None else scale
        sigmas = shifted_flow_sigmas(num_inference_steps, shift, int(self.timestep_scale)).tolist()
        x = noise.to(self.output_dtype(noise))
        for i in range(steps):
            u, c = self.pair(x, self.timestep_scale * sigmas[i], cond, uncond)
            x = cfg_step(x, u, c, s, update="euler", coef_t=sigmas[i], coef_next=sigmas[i + 1])
        return x, sigmas[steps]

    def __deepcopy__(self, memo) -> "GuidedTeacher":
        return self  # frozen: copies of a module that holds the teacher share it

    def __repr__(self) -> str:
        return (f"GuidedTeacher({type(self.model).__name__}, prediction={self.prediction!r}, "
                f"guidance_scale={self.guidance_scale}, guidance_rescale={self.guidance_rescale}, dtype={self.dtype})")


def _check_latents(op: str, x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"{op}: 'x' must be a floating [B, ...] tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")


def _check_scale(op: str, name: str, scale) -> None:
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point() or scale.ndim > 1:
            raise ValueError(f"{op}: '{name}' must be a number or a floating [B] tensor, got {scale.dtype} of "
                             f"shape {tuple(scale.shape)}")
    elif isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"{op}: '{name}' must be a number or a floating [B] tensor, got {type(scale).__name__}")


def _rows(op: str, what: str, cond, n: int) -> dict:
    """``cond`` with every tensor at n rows: one row per sample, or one row broadcast to all."""
    if not isinstance(cond, Mapping) or not cond:
        raise TypeError(f"{op}: '{what}' must be a non-empty mapping of keyword tensors, got "
                        f"{type(cond).__name__ if not isinstance(cond, Mapping) else 'an empty mapping'}")
    out = {}
    for k, v in cond.items():
        if not isinstance(v, torch.Tensor) or v.dim() < 1 or v.shape[0] not in (1, n):
            raise ValueError(f"{op}: '{what}[{k!r}]' must be a tensor with {n} rows (one per sample) or 1, got "
                             f"{type(v).__name__} of shape {tuple(getattr(v, 'shape', ()))}")
        out[k] = v.expand(n, *v.shape[1:]) if v.shape[0] != n else v
    return out


def _check_scheduler(prediction: str, scheduler) -> None:
    flow = "FlowMatch" in type(scheduler).__name__
    if flow and prediction != "velocity":
        raise ValueError(f"GuidedTeacher.stepper: {type(scheduler).__name__} integrates a velocity, the teacher "
                         f"predicts {prediction!r}")
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if not flow and kind is not None and kind != prediction:
        raise ValueError(f"GuidedTeacher.stepper: the scheduler expects prediction_type {kind!r}, the teacher "
                         f"predicts {prediction!r}")
