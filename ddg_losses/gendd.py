"""GenDD's training loss: the student's pooled feature conditions a diffusion head that generates
the (contracted, mixed) teacher feature, split into tokens (docs/methods/gendd.md §2).

``GenDDLoss`` does one stage-2 step of the diffusion part: LayerNorm of the student feature,
contraction of the teacher feature toward its class prototype, feature mixup, split tokens
tiled ``batch_mul`` times, CFG dropout, noising and the diffusion loss of a
``SplitTokenDiffusionHead`` (IDDPM hybrid loss with learned variance, or epsilon MSE). The
probe cross-entropy of docs/methods/gendd.md §2.9 belongs to the training loop, not here.
"""
from __future__ import annotations

from numbers import Real
from typing import TYPE_CHECKING, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from ddg_ops import diffusion_loss, split_token_prepare, split_token_rows

if TYPE_CHECKING:  # ddg_models imports diffusers; the loss only needs the head's interface
    from ddg_models.split_token_head import SplitTokenDiffusionHead

_NAME = "GenDDLoss"


class GenDDLossOutput(NamedTuple):
    loss: torch.Tensor  # the diffusion loss to backpropagate (mean over rows)
    mse: torch.Tensor   # its epsilon-MSE part (detached)
    vb: torch.Tensor    # loss - mse: the variational-bound part (detached; 0 without learned variance)
    mix: torch.Tensor   # the mixup coefficient m used (1 when mixup is off)


class GenDDDraws(NamedTuple):
    """The random choices of one step, in the order they are drawn from the generator."""
    permutation: Optional[torch.Tensor]  # int64 [B], mixup partner of each sample (None: mixup off)
    mix: float                           # m ~ Beta(beta, beta) (1.0: mixup off)
    keep: torch.Tensor                   # [M] 1 = condition kept, 0 = dropped (CFG dropout)
    timesteps: torch.Tensor              # int64 [M]
    noise: torch.Tensor                  # [M, C]


def _on(generator: Optional[torch.Generator], device: torch.device) -> torch.device:
    """Where to draw: the generator's device (draws are moved to ``device`` afterwards)."""
    return generator.device if generator is not None else device


class GenDDLoss(nn.Module):
    """Diffusion distillation loss of GenDD around a ``SplitTokenDiffusionHead``.

    Args:
        head: the diffusion head (its config gives the token size C, N tokens, D_S and the schedule).
        prototypes: the teacher classifier's weight [K, D_T] (D_T = N C), the class prototypes of the
            contraction; stored as a buffer. None: no contraction.
        contraction: lambda in x0 = (1 - lambda) f_T + lambda mu.
        mix_beta: beta of the mixup coefficient m ~ Beta(beta, beta); 0 disables mixup.
        cond_drop_prob: probability that a row's condition is dropped (CFG training).
        batch_mul: R, how many times the B N tokens are tiled (each copy gets its own t and noise).

    ``cond_norm`` (LayerNorm(D_S), affine: GenDD's ``cls_projector``) turns the student feature into
    the condition z. Randomness (permutation, m, dropout mask, timesteps, noise) comes from
    ``generator`` when given (m from a numpy Generator seeded from it), else from torch's and
    numpy's global generators as in the original code.
    """

    def __init__(self, head: "SplitTokenDiffusionHead", prototypes: Optional[torch.Tensor] = None,
                 contraction: float = 0.9, mix_beta: float = 1.0, cond_drop_prob: float = 0.2,
                 batch_mul: int = 30):
        super().__init__()
        if not isinstance(head, nn.Module) or not all(hasattr(head, a) for a in ("config", "schedule", "sample")):
            raise TypeError(f"{_NAME}: 'head' must be a ddg_models.SplitTokenDiffusionHead, got {type(head).__name__}")
        cfg = head.config
        _check_real("contraction", contraction, 0.0, 1.0)
        _check_real("mix_beta", mix_beta, 0.0, float("inf"))
        _check_real("cond_drop_prob", cond_drop_prob, 0.0, 1.0)
        if isinstance(batch_mul, bool) or not isinstance(batch_mul, int) or batch_mul < 1:
            raise ValueError(f"{_NAME}: 'batch_mul' must be a positive int, got {batch_mul!r}")
        if prototypes is not None:
            if not isinstance(prototypes, torch.Tensor) or prototypes.ndim != 2 \
                    or prototypes.shape[1] != cfg.feature_dim or not prototypes.is_floating_point():
                got = (f"{prototypes.dtype} {tuple(prototypes.shape)}" if isinstance(prototypes, torch.Tensor)
                       else type(prototypes).__name__)
                raise ValueError(f"{_NAME}: 'prototypes' must be a float [K, {cfg.feature_dim}] tensor (the teacher "
                                 f"classifier weight, D_T = num_tokens * token_size), got {got}")
            prototypes = prototypes.detach().clone()
        self.head = head
        self.cond_norm = nn.LayerNorm(cfg.cond_dim)
        self.register_buffer("prototypes", prototypes)
        self.contraction = float(contraction)
        self.mix_beta = float(mix_beta)
        self.cond_drop_prob = float(cond_drop_prob)
        self.batch_mul = batch_mul
        sqrt_ab, sqrt_1mab = head.schedule.noising_tables()
        self.register_buffer("sqrt_alpha_bar", sqrt_ab, persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", sqrt_1mab, persistent=False)
        self.register_buffer("loss_coefs", head.schedule.loss_coefs(), persistent=False)

    def draw(self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None) -> GenDDDraws:
        """The random choices of a step for ``batch`` samples: permutation, then m, then the dropout
        mask, the timesteps and the noise (as GenDD: randperm, Beta, rand < p, randint, randn)."""
        cfg = self.head.config
        M, where = batch * cfg.num_tokens * self.batch_mul, _on(generator, device)
        permutation, mix = None, 1.0
        if self.mix_beta > 0:
            permutation = torch.randperm(batch, generator=generator, device=where).to(device)
            if generator is None:
                mix = float(np.random.beta(self.mix_beta, self.mix_beta))
            else:
                seed = int(torch.randint(0, 2 ** 63 - 1, (1,), generator=generator, device=where))
                mix = float(np.random.default_rng(seed).beta(self.mix_beta, self.mix_beta))
        dropped = torch.rand(M, generator=generator, device=where) < self.cond_drop_prob
        keep = (~dropped).to(device=device, dtype=self.head.dtype)
        timesteps = torch.randint(0, cfg.num_timesteps, (M,), generator=generator, device=where).to(device)
        # Drawn in fp32 whatever the head's dtype, so fp32 and fp64 runs see the same draws.
        noise = torch.randn(M, cfg.token_size, generator=generator, device=where).to(device, self.head.dtype)
        return GenDDDraws(permutation, mix, keep, timesteps, noise)

    def class_prototypes(self, labels: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """mu [B, D_T] of hard labels (a row gather) or soft labels [B, K] (a mixture); None when there is
        no contraction (no labels or no prototypes)."""
        if labels is None or self.prototypes is None:
            return None
        with torch.no_grad():
            if labels.ndim == 1:
                return self.prototypes[labels].to(dtype)
            return (labels.to(self.prototypes.dtype) @ self.prototypes).to(dtype)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor,
                labels: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> GenDDLossOutput:
        """student_features f_S [B, D_S] (gradients flow to them and to cond_norm and the head);
        teacher_features f_T [B, D_T] (constants); labels: int64 [B] class ids or float [B, K] soft labels
        for the contraction (None: pure teacher-feature generation)."""
        B = self._check_inputs(student_features, teacher_features, labels)
        cfg, device, dtype = self.head.config, student_features.device, self.head.dtype
        z = self.cond_norm(student_features)
        mu = self.class_prototypes(labels, dtype)
        draws = self.draw(B, device, generator)
        if draws.permutation is not None:
            z = draws.mix * z + (1 - draws.mix) * z[draws.permutation]
        x_t, x0 = split_token_prepare(
            teacher_features.detach().to(dtype), draws.timesteps, draws.noise, self.sqrt_alpha_bar,
            self.sqrt_one_minus_alpha_bar, cfg.token_size, prototypes=mu,
            contraction=self.contraction if mu is not None else 0.0, permutation=draws.permutation, mix=draws.mix)
        sample_index, token_index = split_token_rows(B, cfg.num_tokens, self.batch_mul, device)
        out = self.head(x_t, draws.timesteps, z, sample_index, token_index, draws.keep)
        loss, mse = diffusion_loss(out.to(dtype), draws.noise, draws.timesteps, self.loss_coefs,
                                   x0 if cfg.learn_sigma else None, learned_variance=cfg.learn_sigma)
        mix = torch.tensor(draws.mix, dtype=loss.dtype, device=device)
        return GenDDLossOutput(loss, mse, (loss - mse).detach(), mix)

    @torch.no_grad()
    def sample(self, student_features: torch.Tensor, num_samples: int = 5, cfg_scale: float = 2.0,
               temperature: float = 1.0, num_steps=100, generator: Optional[torch.Generator] = None,
               skip_clipped_step: bool = False) -> torch.Tensor:
        """Generated teacher features [B, D_T] for student features [B, D_S]: the mean over
        ``num_samples`` draws of the head's CFG sampler conditioned on cond_norm(f_S)
        (``skip_clipped_step``: see ``SplitTokenDiffusionHead.sample``)."""
        self._check_student(student_features, "sample")
        return self.head.sample(self.cond_norm(student_features), num_samples=num_samples, cfg_scale=cfg_scale,
                                temperature=temperature, num_steps=num_steps, generator=generator, reduce="mean",
                                skip_clipped_step=skip_clipped_step)

    # ------------------------------------------------------------------------------ checks

    def _check_student(self, student_features, where: str) -> int:
        D = self.head.config.cond_dim
        if not isinstance(student_features, torch.Tensor) or student_features.ndim != 2 \
                or student_features.shape[1] != D or not student_features.is_floating_point():
            raise ValueError(f"{_NAME}.{where}: 'student_features' must be a float [B, {D}] tensor (cond_dim of the "
                             f"head), got {_describe(student_features)}")
        if student_features.shape[0] == 0:
            raise ValueError(f"{_NAME}.{where}: 'student_features' must hold at least one sample, got an empty batch")
        return student_features.shape[0]

    def _check_inputs(self, student_features, teacher_features, labels) -> int:
        B = self._check_student(student_features, "forward")
        D_T, device = self.head.config.feature_dim, student_features.device
        if not isinstance(teacher_features, torch.Tensor) or tuple(teacher_features.shape) != (B, D_T) \
                or not teacher_features.is_floating_point():
            raise ValueError(f"{_NAME}.forward: 'teacher_features' must be a float [{B}, {D_T}] tensor (one row "
                             f"per student sample, D_T = num_tokens * token_size), got {_describe(teacher_features)}")
        for name, t in (("teacher_features", teacher_features), ("labels", labels)):
            if t is not None and t.device != device:
                raise ValueError(f"{_NAME}.forward: '{name}' must be on {device} like 'student_features', "
                                 f"got {t.device}")
        if labels is None:
            return B
        K = None if self.prototypes is None else self.prototypes.shape[0]
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{_NAME}.forward: 'labels' must be a tensor or None, got {type(labels).__name__}")
        if labels.ndim == 1 and labels.dtype == torch.int64 and labels.shape[0] == B:
            if K is not None and labels.numel() and bool(((labels < 0) | (labels >= K)).any()):
                raise ValueError(f"{_NAME}.forward: 'labels' must be class ids in [0, {K}), got values in "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            return B
        if labels.ndim == 2 and labels.is_floating_point() and labels.shape[0] == B \
                and (K is None or labels.shape[1] == K):
            return B
        k = "K" if K is None else K
        raise ValueError(f"{_NAME}.forward: 'labels' must be int64 [{B}] class ids or float [{B}, {k}] soft labels, "
                         f"got {_describe(labels)}")

    def extra_repr(self) -> str:
        K = None if self.prototypes is None else self.prototypes.shape[0]
        return (f"classes={K}, contraction={self.contraction}, mix_beta={self.mix_beta}, "
                f"cond_drop_prob={self.cond_drop_prob}, batch_mul={self.batch_mul}")


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_real(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{_NAME}: '{name}' must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{_NAME}: '{name}' must be in [{low}, {high}], got {value}")
