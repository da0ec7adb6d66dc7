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


torch.library.register_autograd("ddg::bn_stats", _bn_stats_backward, setup_context=_bn_stats_setup)
torch.library.register_autograd("ddg::cfg_combine", _cfg_combine_backward, setup_context=_cfg_combine_setup)
torch.library.register_autograd("ddg::cfg_step", _cfg_step_backward, setup_context=_cfg_step_setup)
torch.library.register_autograd("ddg::dmd_grad", _dmd_grad_backward, setup_context=_dmd_grad_setup)
for _op in ("cfg_combine_backward", "cfg_step_backward", "dmd_grad_backward", "bn_stats_backward"):
    torch.library.register_autograd(f"ddg::{_op}", _no_double_backward(_op))
