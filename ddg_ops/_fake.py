"""Fake (meta) kernels: output metadata of every ddg op without touching data, so the
ops trace under torch.compile / FakeTensor. Output strides follow torch.empty_like, which
is also what the C++ ops return."""
from __future__ import annotations

import torch

from ._types import opmath_dtype

_STATS_PER_SAMPLE = 4  # [mean_guided, var_guided, mean_cond, var_cond]


def _same(op: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        torch._check(t.shape == ref.shape, lambda: f"ddg.{op}: '{name}' must have shape {tuple(ref.shape)}, "
                     f"got {tuple(t.shape)}")
        torch._check(t.dtype == ref.dtype, lambda: f"ddg.{op}: '{name}' must be {ref.dtype}, got {t.dtype}")


def _stats(ref: torch.Tensor, rescale: float) -> torch.Tensor:
    rows = ref.shape[0] if rescale != 0.0 else 0
    return ref.new_empty((rows, _STATS_PER_SAMPLE), dtype=opmath_dtype(ref.dtype))


@torch.library.register_fake("ddg::cfg_combine")
def _cfg_combine(uncond, cond, scale, scale_per_sample, rescale):
    _same("cfg_combine", uncond, cond=cond)
    return torch.empty_like(uncond), _stats(uncond, rescale)


@torch.library.register_fake("ddg::cfg_combine_backward")
def _cfg_combine_backward(grad_out, uncond, cond, scale, scale_per_sample, rescale, stats):
    _same("cfg_combine_backward", grad_out, uncond=uncond, cond=cond)
    return torch.empty_like(uncond), torch.empty_like(cond)


@torch.library.register_fake("ddg::cfg_step")
def _cfg_step(sample, uncond, cond, scale, scale_per_sample, rescale, update, coef_t, coef_next, coef_per_sample):
    _same("cfg_step", sample, uncond=uncond, cond=cond)
    return torch.empty_like(sample), _stats(sample, rescale)


@torch.library.register_fake("ddg::cfg_step_backward")
def _cfg_step_backward(grad_out, uncond, cond, scale, scale_per_sample, rescale, update, coef_t, coef_next,
                       coef_per_sample, stats):
    _same("cfg_step_backward", grad_out, uncond=uncond, cond=cond)
    return torch.empty_like(grad_out), torch.empty_like(uncond), torch.empty_like(cond)


@torch.library.register_fake("ddg::dmd_grad")
def _dmd_grad(x, uncond, cond, fake, scale, scale_per_sample, prediction, x_t, alpha_bar):
    _same("dmd_grad", x, uncond=uncond, cond=cond, fake=fake)
    acc = opmath_dtype(x.dtype)
    return (torch.empty_like(x, dtype=acc), x.new_empty((x.shape[0],), dtype=acc), x.new_empty((), dtype=acc))


@torch.library.register_fake("ddg::dmd_grad_backward")
def _dmd_grad_backward(grad_loss, grad, dtype):
    return torch.empty_like(grad, dtype=dtype)


@torch.library.register_fake("ddg::bn_stats")
def _bn_stats(x):
    torch._check(x.dim() >= 2, lambda: f"ddg.bn_stats: 'x' must be at least 2-D, got {x.dim()}-D")
    acc = opmath_dtype(x.dtype)
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


@torch.library.register_fake("ddg::bn_stats_backward")
def _bn_stats_backward(grad_mean, grad_var, x, mean):
    return torch.empty_like(x)


# ---------------------------------------------------------------- split_token

@torch.library.register_fake("ddg::split_token_prepare")
def _split_token_prepare(features, prototypes, contraction, permutation, mix, timesteps, noise, sqrt_alpha_bar,
                         sqrt_one_minus_alpha_bar, token_size):
    torch._check(features.dim() == 2, lambda: "ddg.split_token_prepare: 'features' must be 2-D")
    tokens = features.shape[0] * (features.shape[1] // token_size)
    return features.new_empty((timesteps.shape[0], token_size)), features.new_empty((tokens, token_size))


def _row_stats(x):
    return x.new_empty((x.shape[0],), dtype=opmath_dtype(x.dtype))


@torch.library.register_fake("ddg::adaln_modulate")
def _adaln_modulate(x, weight, bias, shift, scale, cond_index, eps):
    torch._check(x.dim() == 2, lambda: f"ddg.adaln_modulate: 'x' must be 2-D, got {x.dim()}-D")
    return x.new_empty(x.shape), _row_stats(x), _row_stats(x)


@torch.library.register_fake("ddg::adaln_modulate_backward")
def _adaln_modulate_backward(grad_out, x, weight, bias, scale, cond_index, mean, rstd):
    _same("adaln_modulate_backward", x, grad_out=grad_out)
    width = x.shape[1]
    return (x.new_empty(x.shape), x.new_empty((width,) if weight is not None else (0,)),
            x.new_empty((width,) if bias is not None else (0,)), x.new_empty(x.shape))


@torch.library.register_fake("ddg::gated_residual")
def _gated_residual(x, gate, h, cond_index):
    _same("gated_residual", x, h=h)
    return x.new_empty(x.shape)


@torch.library.register_fake("ddg::gated_residual_backward")
def _gated_residual_backward(grad_out, gate, h, cond_index):
    _same("gated_residual_backward", h, grad_out=grad_out)
    return h.new_empty(h.shape), h.new_empty(h.shape)


@torch.library.register_fake("ddg::cond_rows_sum")
def _cond_rows_sum(rows, cond_index, cond_rows):
    torch._check(rows.dim() == 2, lambda: f"ddg.cond_rows_sum: 'rows' must be 2-D, got {rows.dim()}-D")
    return rows.new_empty((cond_rows, rows.shape[1]))


@torch.library.register_fake("ddg::diffusion_loss")
def _diffusion_loss(model_output, noise, timesteps, x0, loss_coefs, learned_variance):
    return _row_stats(noise), _row_stats(noise)


@torch.library.register_fake("ddg::diffusion_loss_backward")
def _diffusion_loss_backward(grad_loss, model_output, noise, timesteps, x0, loss_coefs, learned_variance):
    return model_output.new_empty(model_output.shape)
