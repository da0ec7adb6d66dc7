"""One DP-DMD iteration (docs/methods/dpdmd.md §2.3-2.5), shared by the 2-D toy and the SD3 pipeline.

A ``Distiller`` holds the three networks (generator = FewStepGenerator over the student, frozen
GuidedTeacher, fake score), their optimizers and losses; ``step(iteration, noise, cond, uncond)`` does
what the TTUR schedule says for that iteration. The generator is a FewStepGenerator
(DP-DMD) or a BackwardSimulationGenerator with epsilon noise schedules and ttur_mode='every_step' (DMD2
without its GAN). The networks are whatever ``accelerator.prepare``
returned (DDP/FSDP wrappers included): they are only ever called through their ``forward``, which
FSDP needs to gather its shards.

Gradient clipping uses ``accelerator.clip_grad_norm_``: under FSDP it calls the FSDP module's own
``clip_grad_norm_``, which all-reduces the squared shard norms so every rank clips with the *global*
norm. ``torch.nn.utils.clip_grad_norm_`` on sharded parameters (what the reference does) sees only the
local shard and clips each rank by a different factor (docs/methods/dpdmd.md §2.5e). Under DDP/single process it is the
plain clip on the (already all-reduced) gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ddg_losses import AnchorLoss, DistributionMatchingLoss, FakeScoreLoss, TwoTimeScaleSchedule
from ddg_models import model_prediction


@dataclass(frozen=True)
class DistillConfig:
    """Method hyperparameters (DP-DMD defaults: docs/methods/dpdmd.md §2.6)."""
    guidance_scale: float = 3.5       # teacher CFG of the real score and of the anchor rollout
    fake_per_generator: int = 5       # TTUR: fake updates per generator update
    ttur_mode: str = "alternate"      # 'alternate' (DP-DMD) | 'every_step' (DMD2)
    anchor_steps: int = 10            # k teacher steps of the anchor; 0 = no anchor loss (plain DMD)
    anchor_weight: float = 0.05       # div_weight
    teacher_steps: int = 30           # the teacher grid the anchor rolls out on ("t30")
    shift: float = 3.0                # flow-matching shift of every grid
    clip_norm: float = 1.0
    detach_first_step: bool = True    # DMD gradient blocked at the student's first step


class Distiller:
    """The generator / fake-score updates of DMD and DP-DMD on prepared modules and optimizers."""

    def __init__(self, config: DistillConfig, accelerator, generator, teacher, fake, generator_opt, fake_opt,
                 dmd_schedule, fake_schedule):
        self.config = config
        self.accelerator = accelerator
        self.generator, self.teacher, self.fake = generator, teacher, fake
        self.generator_opt, self.fake_opt = generator_opt, fake_opt
        self.ttur = TwoTimeScaleSchedule(config.fake_per_generator, config.ttur_mode)
        self.dmd_loss = DistributionMatchingLoss(config.guidance_scale, dmd_schedule.prediction)
        self.dmd_schedule = dmd_schedule
        self.fake_loss = FakeScoreLoss(fake_schedule)
        self.anchor_loss = AnchorLoss(config.anchor_weight)

    def _fake_score(self, cond):
        return lambda x_t, t: model_prediction(self.fake, x_t, t, cond).to(x_t.dtype)

    def _real_score(self, cond, uncond):
        # The teacher answers in fp32 whatever its weights; the fused DMD op takes one dtype, the sample's.
        return lambda x_t, t: tuple(p.to(x_t.dtype) for p in self.teacher.pair(x_t, t, cond, uncond))

    def _update(self, loss: torch.Tensor, module, optimizer) -> float:
        self.accelerator.backward(loss)
        norm = self.accelerator.clip_grad_norm_(module.parameters(), self.config.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def fake_step(self, noise: torch.Tensor, cond, generator: Optional[torch.Generator] = None) -> Dict[str, float]:
        """Fit the fake score to the current generator's samples (flow matching / epsilon MSE)."""
        with torch.no_grad():
            x = self.generator(noise, cond).sample
        out = self.fake_loss(self._fake_score(cond), x, generator=generator)
        norm = self._update(out.loss, self.fake, self.fake_opt)
        return {"fake_loss": float(out.loss.detach()), "fake_grad_norm": norm}

    def generator_step(self, noise: torch.Tensor, cond, uncond,
                       generator: Optional[torch.Generator] = None) -> Dict[str, float]:
        """DMD loss on the rollout's output (+ the anchor loss on its first velocity when anchor_steps > 0)."""
        c = self.config
        out = self.generator(noise, cond)
        dmd = self.dmd_loss.noised(out.sample, self._real_score(cond, uncond), self._fake_score(cond),
                                   self.dmd_schedule, generator=generator)
        loss, logs = dmd.loss, {"dmd_loss": float(dmd.loss.detach()), "dmd_denom": float(dmd.denom.mean())}
        if c.anchor_steps > 0:
            if out.first_velocity is None:
                raise ValueError("Distiller: anchor_steps > 0 needs a generator that returns its first velocity "
                                 "(FewStepGenerator); set anchor_steps=0 for DMD2's backward simulation")
            z_k, sigma_k = self.teacher.rollout(noise, cond, uncond, c.teacher_steps, c.anchor_steps, c.shift)
            anchor = self.anchor_loss(out.first_velocity, noise, z_k, sigma_k)
            loss = loss + anchor
            logs["anchor_loss"] = float(anchor.detach())
        logs["generator_grad_norm"] = self._update(loss, self.generator, self.generator_opt)
        return logs

    def step(self, iteration: int, noise: torch.Tensor, cond, uncond,
             generator: Optional[torch.Generator] = None) -> Dict[str, float]:
        logs: Dict[str, float] = {}
        for phase in self.ttur.phases(iteration):
            if phase == "generator":
                logs.update(self.generator_step(noise, cond, uncond, generator))
            else:
                logs.update(self.fake_step(noise, cond, generator))
        return logs
