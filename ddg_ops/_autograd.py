"""Autograd for the ddg ops: each forward op's backward is another ddg op, so
AOTAutograd can trace training steps. Scales and step coefficients are constants (no
gradient). Backward ops are not differentiable again (double backward raises)."""
from __future__ import annotations

import torch


def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"ddg.{op}: double backward is not supported")
    return backward


def _saved_operands(ctx, uncond, cond):
    # Without rescale the backward never reads uncond/cond, so they are not kept alive.
    return (uncond, cond) if ctx.rescale else (None, None)


# ---------------------------------------------------------------- cfg_combine

def _cfg_combine_setup(ctx, inputs, output):
    uncond, cond, scale, scale_per_sample, rescale = inputs
    ctx.scale, ctx.rescale = scale, rescale
    ctx.save_for_backward(*_saved_operands(ctx, uncond, cond), scale_per_sample, output[1])


def _cfg_combine_backward(ctx, grad_out, _grad_stats):
    uncond, cond, scale_per_sample, stats = ctx.saved_tensors
    if not ctx.rescale:
        uncond = cond = grad_out  # shape/dtype placeholders, not read
    grad_uncond, grad_cond = torch.ops.ddg.cfg_combine_backward(
        grad_out, uncond, cond, ctx.scale, scale_per_sample, ctx.rescale, stats)
    return grad_uncond, grad_cond, None, None, None


# ---------------------------------------------------------------- cfg_step

def _cfg_step_setup(ctx, inputs, output):
    sample, uncond, cond, scale, scale_per_sample, rescale, update, coef_t, coef_next, coef_per_sample = inputs
    ctx.scale, ctx.rescale, ctx.update, ctx.coef_t, ctx.coef_next = scale, rescale, update, coef_t, coef_next
    ctx.save_for_backward(*_saved_operands(ctx, uncond, cond), scale_per_sample, coef_per_sample, output[1])


def _cfg_step_backward(ctx, grad_out, _grad_stats):
    uncond, cond, scale_per_sample, coef_per_sample, stats = ctx.saved_tensors
    if not ctx.rescale:
        uncond = cond = grad_out
    grad_sample, grad_uncond, grad_cond = torch.ops.ddg.cfg_step_backward(
        grad_out, uncond, cond, ctx.scale, scale_per_sample, ctx.rescale, ctx.update, ctx.coef_t,
        ctx.coef_next, coef_per_sample, stats)
    return grad_sample, grad_uncond, grad_cond, None, None, None, None, None, None, None


# ---------------------------------------------------------------- dmd_grad

def _dmd_grad_setup(ctx, inputs, output):
    ctx.x_dtype = inputs[0].dtype
    grad, denom, _loss = output
    ctx.mark_non_differentiable(grad, denom)
    ctx.save_for_backward(grad)


def _dmd_grad_backward(ctx, _grad_grad, _grad_denom, grad_loss):
    (grad,) = ctx.saved_tensors
    grad_x = torch.ops.ddg.dmd_grad_backward(grad_loss, grad, ctx.x_dtype)
    # Stop-gradient: the teacher, fake and noised inputs receive nothing.
    return grad_x, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------- bn_stats

def _bn_stats_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _bn_stats_backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    return torch.ops.ddg.bn_stats_backward(grad_mean, grad_var, x, mean)


# ---------------------------------------------------------------- split_token

def _sum_cond_rows(rows_grad: torch.Tensor, cond_index, cond_rows: int) -> torch.Tensor:
    """Per-row gradients of [U, W] condition rows shared through cond_index: summed per condition in a
    fixed order (fp32 accumulation; no atomics, so the same bits on every run on every backend)."""
    if cond_index is None:
        return rows_grad
    return torch.ops.ddg.cond_rows_sum(rows_grad, cond_index, cond_rows)


def _cond_rows_sum_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _cond_rows_sum_backward(ctx, grad_out):
    (cond_index,) = ctx.saved_tensors
    return grad_out[cond_index], None, None


def _adaln_modulate_setup(ctx, inputs, output):
    x, weight, bias, shift, scale, cond_index, eps = inputs
    ctx.cond_rows = shift.shape[0]
    ctx.affine = (weight is not None, bias is not None)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, bias, scale, cond_index, output[1], output[2])


def _adaln_modulate_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, bias, scale, cond_index, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias, grad_scale_rows = torch.ops.ddg.adaln_modulate_backward(
        grad_out, x, weight, bias, scale, cond_index, mean, rstd)
    grad_shift = _sum_cond_rows(grad_out, cond_index, ctx.cond_rows)
    grad_scale = _sum_cond_rows(grad_scale_rows, cond_index, ctx.cond_rows)
    return (grad_x, grad_weight if ctx.affine[0] else None, grad_bias if ctx.affine[1] else None,
            grad_shift, grad_scale, None, None)


def _gated_residual_setup(ctx, inputs, output):
    x, gate, h, cond_index = inputs
    ctx.cond_rows = gate.shape[0]
    ctx.save_for_backward(gate, h, cond_index)


def _gated_residual_backward(ctx, grad_out):
    gate, h, cond_index = ctx.saved_tensors
    grad_h, grad_gate_rows = torch.ops.ddg.gated_residual_backward(grad_out, gate, h, cond_index)
    return grad_out, _sum_cond_rows(grad_gate_rows, cond_index, ctx.cond_rows), grad_h, None


def _diffusion_loss_setup(ctx, inputs, output):
    model_output, noise, timesteps, x0, loss_coefs, learned_variance = inputs
    ctx.learned_variance = learned_variance
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(model_output, noise, timesteps, x0, loss_coefs)


def _diffusion_loss_backward(ctx, grad_loss, _grad_mse):
    model_output, noise, timesteps, x0, loss_coefs = ctx.saved_tensors
    grad = torch.ops.ddg.diffusion_loss_backward(grad_loss, model_output, noise, timesteps, x0, loss_coefs,
                                                 ctx.learned_variance)
    return grad, None, None, None, None, None


def _constant_targets(ctx, *grads):
    raise RuntimeError("ddg.split_token_prepare: the diffusion targets are constants (no gradient); "
                       "pass detached inputs")


torch.library.register_autograd("ddg::bn_stats", _bn_stats_backward, setup_context=_bn_stats_setup)
torch.library.register_autograd("ddg::cfg_combine", _cfg_combine_backward, setup_context=_cfg_combine_setup)
torch.library.register_autograd("ddg::cfg_step", _cfg_step_backward, setup_context=_cfg_step_setup)
torch.library.register_autograd("ddg::dmd_grad", _dmd_grad_backward, setup_context=_dmd_grad_setup)
torch.library.register_autograd("ddg::adaln_modulate", _adaln_modulate_backward, setup_context=_adaln_modulate_setup)
torch.library.register_autograd("ddg::gated_residual", _gated_residual_backward, setup_context=_gated_residual_setup)
torch.library.register_autograd("ddg::diffusion_loss", _diffusion_loss_backward, setup_context=_diffusion_loss_setup)
torch.library.register_autograd("ddg::cond_rows_sum", _cond_rows_sum_backward, setup_context=_cond_rows_sum_setup)
torch.library.register_autograd("ddg::split_token_prepare", _constant_targets)
for _op in ("cfg_combine_backward", "cfg_step_backward", "dmd_grad_backward", "bn_stats_backward",
            "adaln_modulate_backward", "gated_residual_backward", "diffusion_loss_backward"):
    torch.library.register_autograd(f"ddg::{_op}", _no_double_backward(_op))
