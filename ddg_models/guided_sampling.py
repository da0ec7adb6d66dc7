"""One classifier-free-guided scheduler step with diffusers schedulers on ddg's fused guidance ops.

``FusedGuidanceStep`` turns (uncond, cond) model outputs into the scheduler's next sample.
For DDIMScheduler (eta=0, no clipping/thresholding, epsilon or v-prediction) and
FlowMatchEulerDiscreteScheduler (deterministic), CFG, guidance rescale and the scheduler
update run as one fused op; any other scheduler gets the fused CFG combine followed by its
own ``step``, so every diffusers scheduler works. The sampling loop around it is
``GuidedTeacher.sample`` (guided_teacher.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ddg_ops import cfg_combine, cfg_step

try:  # diffusers is a dependency of ddg_models, imported lazily by users of ddg_ops only
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError("ddg_models.guided_sampling needs diffusers (pip install 'ddg[models]')") from exc


def _fused_update(scheduler) -> Optional[str]:
    """The fused update that reproduces ``scheduler.step`` exactly, or None."""
    cfg = scheduler.config
    if isinstance(scheduler, DDIMScheduler):
        if cfg.clip_sample or cfg.thresholding or cfg.prediction_type not in ("epsilon", "v_prediction"):
            return None
        return f"ddim_{cfg.prediction_type}"
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return None if getattr(cfg, "stochastic_sampling", False) else "euler"
    return None


class FusedGuidanceStep:
    """CFG (+ guidance rescale) and one scheduler update.

    Args:
        scheduler: a diffusers scheduler with ``set_timesteps`` already called.
        guidance_scale: CFG scale s in ``uncond + s * (cond - uncond)``.
        guidance_rescale: phi of Lin et al. 2023 (diffusers' ``guidance_rescale``), 0 disables.
    """

    def __init__(self, scheduler, guidance_scale: float, guidance_rescale: float = 0.0):
        self.scheduler = scheduler
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.update = _fused_update(scheduler)

    @property
    def fused(self) -> bool:
        """True when CFG and the scheduler update run as one op."""
        return self.update is not None

    def __call__(self, uncond: torch.Tensor, cond: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        if self.update is None:
            guided = cfg_combine(uncond, cond, self.guidance_scale, self.guidance_rescale)
            return self.scheduler.step(guided, timestep, sample, return_dict=False)[0]
        coef_t, coef_next = (self._ddim_coefs(timestep) if self.update.startswith("ddim")
                             else self._euler_coefs(timestep))
        out = cfg_step(sample, uncond, cond, self.guidance_scale, update=self.update, coef_t=coef_t,
                       coef_next=coef_next, rescale=self.guidance_rescale)
        if self.update == "euler":
            self.scheduler._step_index += 1  # keep the scheduler's state as its own step() would
        return out

    def _ddim_coefs(self, timestep):
        # DDIMScheduler.step: prev_t = t - T // num_inference_steps; alpha_bar(prev_t < 0) = final_alpha_cumprod.
        s = self.scheduler
        t = int(timestep)
        prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
        alpha_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        return float(s.alphas_cumprod[t]), float(alpha_prev)

    def _euler_coefs(self, timestep):
        s = self.scheduler
        if s.step_index is None:
            s._init_step_index(timestep)
        return float(s.sigmas[s.step_index]), float(s.sigmas[s.step_index + 1])

