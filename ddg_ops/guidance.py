"""Guidance ops (csrc/*/guidance.*): classifier-free guidance, CFG fused with one sampler step, and
the distribution-matching gradient of DMD.

Each function validates its arguments, then runs the compiled kernel for CPU/CUDA tensors when
the extension is loaded, and the pure-PyTorch reference otherwise. Results are in the input
dtype with fp32 accumulation (fp64 for fp64 inputs). All functions support autograd
(coefficients are constants) and torch.compile(fullgraph=True).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import reference
from ._ext import use_kernel
from ._types import opmath_dtype
from ._validate import check_choice, check_in_range, check_operands, check_per_sample
from .reference import DMDGradOutput

Scalar = Union[float, torch.Tensor]

CFG_STEP_UPDATES = ("ddim_epsilon", "ddim_v_prediction", "euler")
DMD_PREDICTIONS = ("velocity", "epsilon")

__all__ = ["cfg_combine", "cfg_step", "ddim_cfg_step", "euler_cfg_step", "dmd_grad", "DMDGradOutput",
           "CFG_STEP_UPDATES", "DMD_PREDICTIONS"]


def _as_op_scalar(value: Scalar, batch: int) -> Tuple[float, Optional[torch.Tensor]]:
    """(float, None) for a number; (0.0, [B] tensor) for a per-sample tensor."""
    if isinstance(value, torch.Tensor):
        return 0.0, value.expand(batch)
    return float(value), None


def _per_sample_tensor(value: Scalar, ref: torch.Tensor) -> torch.Tensor:
    """A number or [B]/0-D tensor as a [B] tensor in the accumulation dtype, on ref's device."""
    return torch.as_tensor(value, dtype=opmath_dtype(ref.dtype), device=ref.device).expand(ref.shape[0])


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: Scalar, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` on [B, ...] predictions.

    Args:
        uncond, cond: unconditional and conditional model outputs, same shape/dtype/device.
        scale: guidance scale, a number or one value per sample ([B] tensor).
        rescale: guidance rescale phi in [0, 1] (Lin et al. 2023, diffusers' ``guidance_rescale``):
            the result's per-sample std is pulled toward the std of ``cond``.
    """
    op = "cfg_combine"
    ref = check_operands(op, uncond=uncond, cond=cond)
    check_per_sample(op, "scale", scale, ref)
    check_in_range(op, "rescale", rescale, 0.0, 1.0)
    if not use_kernel(ref):
        return reference.cfg_combine(uncond, cond, scale, rescale)
    s, s_ps = _as_op_scalar(scale, ref.shape[0])
    return torch.ops.ddg.cfg_combine(uncond, cond, s, s_ps, float(rescale))[0]


def cfg_step(sample: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor, scale: Scalar, *, update: str,
             coef_t: Scalar, coef_next: Scalar, rescale: float = 0.0) -> torch.Tensor:
    """CFG fused with one sampler update, in one pass over the latents.

    update='ddim_epsilon' | 'ddim_v_prediction': diffusers' DDIMScheduler.step with eta=0
        (no clipping/thresholding); coef_t = alpha_bar(t), coef_next = alpha_bar(t_prev)
        (use the scheduler's final_alpha_cumprod for the last step).
    update='euler': FlowMatchEulerDiscreteScheduler.step, x + (sigma_next - sigma) * v;
        coef_t = sigma, coef_next = sigma_next.
    Coefficients and scale are numbers or [B] tensors (per-sample timesteps).
    """
    op = "cfg_step"
    ref = check_operands(op, sample=sample, uncond=uncond, cond=cond)
    check_choice(op, "update", update, CFG_STEP_UPDATES)
    check_per_sample(op, "scale", scale, ref)
    check_per_sample(op, "coef_t", coef_t, ref)
    check_per_sample(op, "coef_next", coef_next, ref)
    check_in_range(op, "rescale", rescale, 0.0, 1.0)
    if update != "euler":
        # v-prediction is defined at alpha_bar = 0 (zero terminal SNR); epsilon divides by sqrt(alpha_bar).
        check_in_range(op, "coef_t", coef_t, 0.0, 1.0, low_open=update == "ddim_epsilon")
        check_in_range(op, "coef_next", coef_next, 0.0, 1.0)
    if not use_kernel(ref):
        return reference.cfg_step(sample, uncond, cond, scale, update=update, coef_t=coef_t,
                                  coef_next=coef_next, rescale=rescale)
    batch = ref.shape[0]
    s, s_ps = _as_op_scalar(scale, batch)
    coef_ps = None
    if isinstance(coef_t, torch.Tensor) or isinstance(coef_next, torch.Tensor):
        coef_ps = torch.stack([_per_sample_tensor(coef_t, ref), _per_sample_tensor(coef_next, ref)], dim=1)
        coef_t = coef_next = 0.0
    return torch.ops.ddg.cfg_step(sample, uncond, cond, s, s_ps, float(rescale), update, float(coef_t),
                                  float(coef_next), coef_ps)[0]


def ddim_cfg_step(sample: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor, scale: Scalar,
                  alpha_bar_t: Scalar, alpha_bar_prev: Scalar, *, prediction_type: str = "epsilon",
                  rescale: float = 0.0) -> torch.Tensor:
    """CFG + DDIMScheduler.step (eta=0) for 'epsilon' or 'v_prediction' models."""
    check_choice("ddim_cfg_step", "prediction_type", prediction_type, ("epsilon", "v_prediction"))
    return cfg_step(sample, uncond, cond, scale, update=f"ddim_{prediction_type}", coef_t=alpha_bar_t,
                    coef_next=alpha_bar_prev, rescale=rescale)


def euler_cfg_step(sample: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor, scale: Scalar,
                   sigma: Scalar, sigma_next: Scalar, *, rescale: float = 0.0) -> torch.Tensor:
    """CFG + FlowMatchEulerDiscreteScheduler.step: sample + (sigma_next - sigma) * guided velocity."""
    return cfg_step(sample, uncond, cond, scale, update="euler", coef_t=sigma, coef_next=sigma_next,
                    rescale=rescale)


def dmd_grad(x: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor, fake: torch.Tensor, scale: Scalar, *,
             prediction: str = "velocity", x_t: Optional[torch.Tensor] = None,
             alpha_bar: Optional[Scalar] = None) -> DMDGradOutput:
    """Distribution-matching gradient of DMD / DMD2 / DP-DMD (docs/methods/dpdmd.md; docs/guidance_kernels.md §4, K2).

    The real score is CFG of the teacher's (uncond, cond) predictions with ``scale``; ``fake``
    is the fake-score prediction, all at the same noised point. ``x`` is the generator output
    the gradient is for.

    prediction='velocity' (flow matching, DP-DMD): g = (v_real - v_fake) / mean|v_real| per sample.
    prediction='epsilon' (DDPM, DMD2): needs ``x_t`` and ``alpha_bar`` (number or [B]);
        g = (x0_fake - x0_real) / mean|x - x0_real| with x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab).
    g is computed in fp32 (fp64 for fp64 inputs) and NaN/inf-scrubbed like torch.nan_to_num.

    Returns (grad, denom, loss): ``loss`` = 0.5 * mean(g^2) and backpropagates g / numel into
    ``x`` only (the stop-gradient MSE trick: 0.5 * mse(x, sg(x - g))); grad and denom are constants.
    """
    op = "dmd_grad"
    check_choice(op, "prediction", prediction, DMD_PREDICTIONS)
    if prediction == "velocity":
        if x_t is not None or alpha_bar is not None:
            raise ValueError("ddg.dmd_grad: 'x_t' and 'alpha_bar' are only used with prediction='epsilon'")
        ref = check_operands(op, x=x, uncond=uncond, cond=cond, fake=fake)
    else:
        if x_t is None or alpha_bar is None:
            raise ValueError("ddg.dmd_grad: prediction='epsilon' needs 'x_t' (the noised input) and "
                             "'alpha_bar' (a number or one value per sample)")
        ref = check_operands(op, x=x, uncond=uncond, cond=cond, fake=fake, x_t=x_t)
        check_per_sample(op, "alpha_bar", alpha_bar, ref)
        check_in_range(op, "alpha_bar", alpha_bar, 0.0, 1.0, low_open=True)
    check_per_sample(op, "scale", scale, ref)
    if not use_kernel(ref):
        return reference.dmd_grad(x, uncond, cond, fake, scale, prediction=prediction, x_t=x_t, alpha_bar=alpha_bar)
    batch = ref.shape[0]
    s, s_ps = _as_op_scalar(scale, batch)
    ab = None if alpha_bar is None else _per_sample_tensor(alpha_bar, ref)
    return DMDGradOutput(*torch.ops.ddg.dmd_grad(x, uncond, cond, fake, s, s_ps, prediction, x_t, ab))
