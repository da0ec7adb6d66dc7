"""Pure-PyTorch reference implementations of every ddg op.

These are the test oracle, the benchmark's eager baseline and the fallback when the
compiled extension is unavailable. They compute in the kernels' accumulation dtype
(float32, or float64 for float64 inputs) and follow diffusers' formulas term by term.
Scalars (`scale`, step coefficients, `alpha_bar`) are Python floats or [B] tensors.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

from ._types import opmath_dtype, per_sample

Scalar = Union[float, torch.Tensor]


class BNStatsLossOutput(NamedTuple):
    loss: torch.Tensor  # weight * R, fp32 (fp64 for fp64 inputs)
    mean: torch.Tensor  # per-channel batch mean [C]
    var: torch.Tensor   # per-channel biased batch variance [C]


class DMDGradOutput(NamedTuple):
    grad: torch.Tensor   # g, fp32 (fp64 for fp64 inputs), shaped like x
    denom: torch.Tensor  # per-sample normaliser mean|p_real|, [B]
    loss: torch.Tensor   # 0.5 * mean(g^2); d(loss)/dx = g / numel (the stop-gradient MSE trick)


def _bcast(value: Scalar, like: torch.Tensor) -> Scalar:
    if isinstance(value, torch.Tensor):
        return per_sample(value.to(like.dtype).expand(like.shape[0]), like.ndim)
    return value


def _sample_rows(t: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, n] (also for 1-D and empty batches)."""
    return t.flatten(1) if t.ndim > 1 else t.unsqueeze(1)


def _std_or_zero(var: torch.Tensor) -> torch.Tensor:
    """sqrt(var) whose gradient at var == 0 is 0 rather than NaN (a constant sample)."""
    positive = var > 0
    return torch.where(positive, torch.where(positive, var, 1.0).sqrt(), 0.0)


def rescale_guided(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023), as diffusers' rescale_noise_cfg, per sample.

    A sample whose guided prediction is constant keeps ratio 1 (diffusers returns NaN).
    """
    shape = (guided.shape[0],) + (1,) * (guided.ndim - 1)
    std_cond = _std_or_zero(_sample_rows(cond).var(dim=1, correction=0)).reshape(shape)
    std_guided = _std_or_zero(_sample_rows(guided).var(dim=1, correction=0)).reshape(shape)
    positive = std_guided > 0
    ratio = torch.where(positive, std_cond / torch.where(positive, std_guided, 1.0), 1.0)
    rescaled = guided * ratio
    return rescale * rescaled + (1 - rescale) * guided


def _guided(uncond: torch.Tensor, cond: torch.Tensor, scale: Scalar, rescale: float) -> torch.Tensor:
    acc = opmath_dtype(uncond.dtype)
    u, c = uncond.to(acc), cond.to(acc)
    guided = u + _bcast(scale, u) * (c - u)
    if rescale:
        guided = rescale_guided(guided, c, rescale)
    return guided


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: Scalar, rescale: float = 0.0) -> torch.Tensor:
    """uncond + scale * (cond - uncond), optionally guidance-rescaled."""
    return _guided(uncond, cond, scale, rescale).to(uncond.dtype)


def cfg_step(sample: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor, scale: Scalar, *,
             update: str, coef_t: Scalar, coef_next: Scalar, rescale: float = 0.0) -> torch.Tensor:
    """CFG followed by one sampler update, written as diffusers' schedulers write it.

    update='ddim_epsilon' / 'ddim_v_prediction': DDIMScheduler.step with eta=0, where
    coef_t = alpha_bar(t) and coef_next = alpha_bar(t_prev).
    update='euler': FlowMatchEulerDiscreteScheduler.step, coef_t = sigma, coef_next = sigma_next.
    """
    pred = _guided(uncond, cond, scale, rescale)
    x = sample.to(pred.dtype)
    a_t, a_next = _bcast(coef_t, pred), _bcast(coef_next, pred)
    if update == "euler":
        out = x + (a_next - a_t) * pred
    elif update in ("ddim_epsilon", "ddim_v_prediction"):
        if update == "ddim_epsilon":
            x0 = (x - (1 - a_t) ** 0.5 * pred) / a_t ** 0.5
            eps = pred
        else:
            x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * pred
            eps = a_t ** 0.5 * pred + (1 - a_t) ** 0.5 * x
        out = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
    else:
        raise ValueError(f"ddg.cfg_step: unknown update {update!r}")
    return out.to(sample.dtype)


def dmd_grad(x: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor, fake: torch.Tensor, scale: Scalar, *,
             prediction: str = "velocity", x_t: Optional[torch.Tensor] = None,
             alpha_bar: Optional[Scalar] = None) -> DMDGradOutput:
    """The distribution-matching gradient (docs/methods/dpdmd.md; docs/guidance_kernels.md §4, K2) and its loss.

    velocity: g = (v_real - v_fake) / mean|v_real|  (DP-DMD's p = x_sigma - x0 = sigma * v; sigma cancels)
    epsilon:  g = (x0_fake - x0_real) / mean|x - x0_real|, x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)  (DMD2)
    with v_real / eps_real = CFG(uncond, cond, scale), means per sample, then nan_to_num.
    """
    acc = opmath_dtype(x.dtype)
    real = _guided(uncond, cond, scale, 0.0)
    fake_ = fake.to(acc)
    if prediction == "velocity":
        p_real, p_fake = real, fake_
    elif prediction == "epsilon":
        ab = _bcast(alpha_bar, real)
        xt, x_ = x_t.to(acc), x.to(acc)
        x0_real = (xt - (1 - ab) ** 0.5 * real) / ab ** 0.5
        x0_fake = (xt - (1 - ab) ** 0.5 * fake_) / ab ** 0.5
        p_real, p_fake = x_ - x0_real, x_ - x0_fake
    else:
        raise ValueError(f"ddg.dmd_grad: unknown prediction {prediction!r}")
    denom = _sample_rows(p_real).abs().mean(dim=1)
    grad = torch.nan_to_num((p_real - p_fake) / per_sample(denom, p_real.ndim)).detach()
    x_acc = x.to(acc)
    # Value 0.5*mean(g^2); gradient g/numel w.r.t. x and none to the scores (stop-gradient).
    surrogate = ((x_acc - x_acc.detach()) * grad).sum() / grad.numel()
    loss = 0.5 * grad.square().mean() + surrogate
    return DMDGradOutput(grad, denom.detach(), loss)


# ------------------------------------------------------------------------------ BN statistics

def bn_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every dim but 1, DeepInversion-style
    (channels made leading with permute + contiguous), in the accumulation dtype."""
    acc = opmath_dtype(x.dtype)
    rows = x.transpose(0, 1).contiguous().reshape(x.shape[1], -1).to(acc)
    return rows.mean(dim=1), rows.var(dim=1, unbiased=False)


def bn_alignment(mean: torch.Tensor, var: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor,
                 form: str) -> torch.Tensor:
    """R of docs/methods/ddis.md §4: 'unsquared' ||v - var||_2 + ||m - mean||_2 (DeepInversion, DDIS code) or
    'squared' ||mean - m||^2 + ||var - v||^2 (the DDIS paper)."""
    dm, dv = mean - target_mean.to(mean.dtype), var - target_var.to(var.dtype)
    if form == "unsquared":
        return torch.linalg.vector_norm(dv) + torch.linalg.vector_norm(dm)
    if form == "squared":
        return dm.square().sum() + dv.square().sum()
    raise ValueError(f"ddg.bn_stats_loss: unknown form {form!r}")


def bn_stats_loss(x: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor, *, form: str = "unsquared",
                  weight: float = 1.0) -> BNStatsLossOutput:
    """weight * R(batch statistics of x, running statistics of a BN layer)."""
    mean, var = bn_stats(x)
    return BNStatsLossOutput(weight * bn_alignment(mean, var, target_mean, target_var, form), mean, var)


# ---------------------------------------------------------------- split_token (docs/methods/gendd.md)

def split_token_prepare(features: torch.Tensor, prototypes: Optional[torch.Tensor], contraction: float, mix: float,
                        permutation: Optional[torch.Tensor], timesteps: torch.Tensor, noise: torch.Tensor,
                        sqrt_alpha_bar: torch.Tensor, sqrt_one_minus_alpha_bar: torch.Tensor,
                        token_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """GenDD's target path: contraction x0 = (1-l) f + l mu, mixup m x0 + (1-m) x0[perm], split into
    token_size chunks ([B*N, C], sample-major), tiled replica-outer to the M = len(timesteps) rows and
    noised x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps. Returns (x_t [M, C], x0 tokens [B*N, C])."""
    acc = opmath_dtype(features.dtype)
    x0 = features.to(acc)
    if prototypes is not None:
        x0 = (1 - contraction) * x0 + contraction * prototypes.to(acc)
    if permutation is not None:
        x0 = mix * x0 + (1 - mix) * x0[permutation]
    tokens = x0.reshape(-1, token_size)
    rows = tokens.repeat(timesteps.shape[0] // max(tokens.shape[0], 1), 1)
    x_t = sqrt_alpha_bar.to(acc)[timesteps, None] * rows + sqrt_one_minus_alpha_bar.to(acc)[timesteps, None] * noise.to(acc)
    return x_t.to(features.dtype), tokens.to(features.dtype)


def _gather_rows(t: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    return t if index is None else t[index]


def adaln_modulate(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   shift: torch.Tensor, scale: torch.Tensor, cond_index: Optional[torch.Tensor] = None,
                   eps: float = 1e-6) -> torch.Tensor:
    """adaLN modulation of a LayerNorm over the last dim of [M, W] rows: LN(x) * (1 + scale) + shift.
    LN is affine when weight/bias are given; shift/scale are [U, W] rows picked by cond_index [M]
    (row r uses row cond_index[r]; without it U = M)."""
    acc = opmath_dtype(x.dtype)
    xf = x.to(acc)
    var, mean = torch.var_mean(xf, dim=-1, correction=0, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    out = y * (1 + _gather_rows(scale, cond_index).to(acc)) + _gather_rows(shift, cond_index).to(acc)
    return out.to(x.dtype)


def cond_rows_sum(rows: torch.Tensor, cond_index: torch.Tensor, cond_rows: int) -> torch.Tensor:
    """[cond_rows, W]: row u is the sum of the rows r of [M, W] with cond_index[r] == u (the gradient of
    condition rows shared through cond_index), accumulated in fp32 (fp64 for fp64)."""
    acc = torch.zeros((cond_rows, rows.shape[1]), dtype=opmath_dtype(rows.dtype), device=rows.device)
    return acc.index_add_(0, cond_index, rows.to(acc.dtype)).to(rows.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor,
                   cond_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x + gate * h on [M, W] rows; gate is [U, W] picked by cond_index [M] (U = M without it)."""
    acc = opmath_dtype(x.dtype)
    return (x.to(acc) + _gather_rows(gate, cond_index).to(acc) * h.to(acc)).to(x.dtype)


_LOG2 = math.log(2.0)


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_nll(x: torch.Tensor, centered: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log P(x) of IDDPM's decoder: a Gaussian discretized into bins of width 2/255 on [-1, 1]
    (x - mean = centered); the end bins extend to -inf / +inf (selected by x < -0.999, x > 0.999)."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return -torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def diffusion_loss(model_output: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   x0: Optional[torch.Tensor], loss_coefs: torch.Tensor,
                   learned_variance: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row diffusion loss of epsilon-prediction rows, (loss [M], mse [M]) in fp32 (fp64).

    mse = mean_c (eps_hat - eps)^2. With learned_variance, model_output is [M, 2C] = [eps_hat, v]
    and loss = mse + vb, IDDPM's hybrid loss: vb is KL(q(x_{t-1}|x_t,x_0) || p(eps_hat.detach(), v))
    averaged over channels in bits, or at t = 0 the discretized-Gaussian decoder NLL of x0 (x0 is
    [M0, C]; row r reads x0[r % M0]). loss_coefs is GaussianDiffusionSchedule.loss_coefs()."""
    acc = opmath_dtype(model_output.dtype)
    C = noise.shape[1]
    diff = model_output[:, :C].to(acc) - noise.to(acc)
    mse = diff.square().mean(1)
    if not learned_variance:
        return mse, mse.detach().clone()
    coefs = loss_coefs.to(acc)[timesteps]
    mean_coef, log_beta, log_post = (c[:, None] for c in coefs.unbind(1))
    frac = (model_output[:, C:].to(acc) + 1) / 2
    log_var = frac * log_beta + (1 - frac) * log_post
    d = mean_coef * diff.detach()  # mu_q - mu_theta; the stop-gradient on the mean
    kl = 0.5 * (-1.0 + log_var - log_post + torch.exp(log_post - log_var) + d * d * torch.exp(-log_var))
    vb = kl.mean(1) / _LOG2
    rows = torch.arange(noise.shape[0], device=noise.device) % max(x0.shape[0], 1)
    nll = discretized_gaussian_nll(x0[rows].to(acc), d, 0.5 * log_var).mean(1) / _LOG2
    vb = torch.where(timesteps == 0, nll, vb)
    return mse + vb, mse.detach().clone()
