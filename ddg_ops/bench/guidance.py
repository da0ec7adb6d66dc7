"""Guidance family: cfg_combine (plain and rescaled), cfg_step (DDIM, Euler) and dmd_grad.

Providers:
  ddg         ddg_ops.guidance (the fused kernels)
  eager       ddg_ops.reference: the straightforward code users write, and the test oracle,
              so this baseline cannot drift from what the tests check
  eager_best  hand-optimised eager: torch.lerp, folded coefficients, in-place updates
  compile     torch.compile(reference, dynamic=False)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .. import guidance as ops, reference
from .._types import opmath_dtype, per_sample
from ..reference import DMDGradOutput

PROVIDERS = ("ddg", "eager", "eager_best", "compile")
MODES = ("forward", "full")
ORACLE = "eager"

# Latents: SD1.5 and SDXL with a CFG batch of 2, SD3.5 at batch 1 and at the DP-DMD batch of 4,
# a large batch, and an odd shape that exercises the kernels' tails.
SHAPES = ((2, 4, 64, 64), (2, 4, 128, 128), (1, 16, 128, 128), (4, 16, 128, 128), (8, 16, 128, 128),
          (3, 5, 37, 41))
QUICK_SHAPES = ((2, 4, 64, 64), (1, 16, 128, 128))


# ---------------------------------------------------------------- eager_best

def _std_rows(t: torch.Tensor) -> torch.Tensor:
    """Per-sample population std of a [B, ...] tensor, the fastest stable way per device."""
    rows = t.flatten(1)
    if rows.is_cuda:
        return torch.std(rows, dim=1, correction=0)  # one Welford pass
    # On CPU torch's Welford reduction over a few long rows runs 2-20x slower than this centred
    # two-pass (measured on a 2-core EPYC with torch 2.14), which is as stable.
    centred = rows - rows.mean(dim=1, keepdim=True)
    return torch.linalg.vector_norm(centred, dim=1) / math.sqrt(rows.shape[1])


def _mean_abs_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample mean |t|, accumulated in ``dtype``."""
    rows = t.flatten(1)
    if rows.is_cuda:
        return torch.linalg.vector_norm(rows, 1, dim=1, dtype=dtype) / rows.shape[1]  # one pass
    # On CPU linalg.vector_norm(ord=1) is about 4x slower than abs() + mean, temporary included.
    return rows.abs().mean(dim=1, dtype=dtype)


def _best_rescale(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    # phi * g * ratio + (1 - phi) * g == g * (phi * ratio + 1 - phi): one pass over g after the
    # std reductions, instead of the reference's four elementwise passes.
    std_guided = _std_rows(guided)
    ratio = torch.where(std_guided > 0, _std_rows(cond) / std_guided, 1.0)
    return guided * per_sample(ratio.mul_(rescale).add_(1 - rescale), guided.ndim)


def _best_cfg_combine(uncond, cond, *, scale: float, rescale: float = 0.0) -> torch.Tensor:
    guided = torch.lerp(uncond, cond, scale)  # one kernel, 3T bytes, fp32 math for bf16/fp16
    return _best_rescale(guided, cond, rescale) if rescale else guided


def _step_coefficients(update: str, coef_t: float, coef_next: float) -> Tuple[float, float]:
    """(a, b) with step(x, pred) == a * x + b * pred, folded on the host."""
    if update == "euler":
        return 1.0, coef_next - coef_t
    if update == "ddim_epsilon":
        a = math.sqrt(coef_next / coef_t)
        return a, math.sqrt(1 - coef_next) - a * math.sqrt(1 - coef_t)
    raise ValueError(f"eager_best has no cfg_step update {update!r}")


def _best_cfg_step(sample, uncond, cond, *, scale: float, update: str, coef_t: float,
                   coef_next: float) -> torch.Tensor:
    a, b = _step_coefficients(update, coef_t, coef_next)
    pred = torch.lerp(uncond, cond, scale)
    if a == 1.0:
        return torch.add(sample, pred, alpha=b)  # one more kernel, 3T
    return pred.mul_(b).add_(sample, alpha=a)  # in place: 2T + 3T, no new allocation


def _best_dmd_grad(x, uncond, cond, fake, *, scale: float, prediction: str) -> DMDGradOutput:
    if prediction != "velocity":
        raise ValueError(f"eager_best has no dmd_grad prediction {prediction!r}")
    acc = opmath_dtype(x.dtype)
    real = torch.lerp(uncond, cond, scale)
    denom = _mean_abs_rows(real, acc)
    # bf16/fp16 difference divided by the fp32 [B] denominator: type promotion writes fp32 g directly.
    grad = torch.div(real.sub_(fake), per_sample(denom, real.ndim)).nan_to_num_()
    flat = grad.flatten()
    loss = 0.5 * torch.dot(flat, flat) / flat.numel()
    if x.requires_grad:
        # Value 0, gradient g / numel into x: the stop-gradient MSE trick in one reduction.
        dot = torch.dot(x.flatten().to(acc), flat) / flat.numel()
        loss = loss + (dot - dot.detach())
    return DMDGradOutput(grad, denom, loss)


# ---------------------------------------------------------------- kernels

@dataclass(frozen=True)
class Kernel:
    name: str
    operands: Tuple[str, ...]        # positional inputs, all shaped like the latents
    differentiable: Tuple[str, ...]  # operands that require grad in 'full' mode
    impls: Dict[str, Callable]       # provider -> fn(*operands); 'compile' compiles ORACLE
    target: Callable                 # output -> the tensor 'full' mode backpropagates
    # Unavoidable traffic (each input read once, each output written once) as
    # (tensors in the input dtype, fp32 tensors), forward and backward.
    forward_io: Tuple[int, int]
    backward_io: Tuple[int, int]


def _kernel(name, operands, differentiable, ddg_fn, reference_fn, best_fn, forward_io, backward_io,
            target=lambda out: out, **kwargs) -> Kernel:
    impls = {provider: functools.partial(fn, **kwargs)
             for provider, fn in (("ddg", ddg_fn), ("eager", reference_fn), ("eager_best", best_fn))}
    return Kernel(name, operands, differentiable, impls, target, forward_io, backward_io)


_CFG = ("uncond", "cond")
_STEP = ("sample", "uncond", "cond")

KERNELS = {k.name: k for k in (
    # backward: read grad_output, write one grad per differentiable operand.
    _kernel("cfg_combine", _CFG, _CFG, ops.cfg_combine, reference.cfg_combine, _best_cfg_combine,
            (3, 0), (3, 0), scale=7.5),
    # The rescale backward also needs uncond and cond again (the per-sample std gradients).
    _kernel("cfg_combine_rescale", _CFG, _CFG, ops.cfg_combine, reference.cfg_combine,
            _best_cfg_combine, (3, 0), (5, 0), scale=7.5, rescale=0.7),
    _kernel("cfg_step_ddim", _STEP, _STEP, ops.cfg_step, reference.cfg_step, _best_cfg_step,
            (4, 0), (4, 0), scale=7.5, update="ddim_epsilon", coef_t=0.5, coef_next=0.6),
    _kernel("cfg_step_euler", _STEP, _STEP, ops.cfg_step, reference.cfg_step, _best_cfg_step,
            (4, 0), (4, 0), scale=7.5, update="euler", coef_t=0.8, coef_next=0.75),
    # Velocity dmd_grad reads the teacher pair and fake (not x) and writes fp32 g; its backward
    # reads g and writes dL/dx. Only x, the generator output, gets a gradient.
    _kernel("dmd_grad", ("x", "uncond", "cond", "fake"), ("x",), ops.dmd_grad, reference.dmd_grad,
            _best_dmd_grad, (3, 1), (1, 1), target=lambda out: out.loss, scale=3.5, prediction="velocity"),
)}


def cases(quick: bool, device=None) -> List[Tuple[str, Tuple[int, ...]]]:
    return [(kernel, shape) for kernel in KERNELS for shape in (QUICK_SHAPES if quick else SHAPES)]


def min_bytes(kernel: str, shape: Sequence[int], dtype: torch.dtype, mode: str) -> int:
    """Bytes a perfect implementation moves: inputs read once, outputs written once."""
    spec = KERNELS[kernel]
    numel = math.prod(shape)
    io = [spec.forward_io] + ([spec.backward_io] if mode == "full" else [])
    return sum(numel * (n_io * dtype.itemsize + n_fp32 * 4) for n_io, n_fp32 in io)


class Case:
    """One (kernel, shape, dtype, mode) with fixed random inputs shared by all providers."""

    def __init__(self, kernel: str, shape: Sequence[int], dtype: torch.dtype, mode: str, device):
        self.kernel = KERNELS[kernel]
        self.mode = mode
        gen = torch.Generator().manual_seed(0)

        def randn(size, dtype_):
            # Drawn in fp32 on the CPU generator so every device and dtype sees the same values.
            return torch.randn(size, generator=gen).to(device=device, dtype=dtype_)

        self.inputs = [randn(shape, dtype).requires_grad_(mode == "full" and name in self.kernel.differentiable)
                       for name in self.kernel.operands]
        self.leaves = [t for t in self.inputs if t.requires_grad]
        with torch.no_grad():
            target = self.kernel.target(self.kernel.impls[ORACLE](*self.inputs))
        # A random grad_output (not ones), fixed for the case.
        self.grad_output = randn(target.shape, target.dtype)

    def _impl(self, provider: str) -> Callable:
        if provider != "compile":
            return self.kernel.impls[provider]
        # dynamic=False recompiles for every shape/dtype; past the recompile limit dynamo would
        # silently run eager, so each case starts from a clean cache.
        torch._dynamo.reset()
        return torch.compile(self.kernel.impls[ORACLE], dynamic=False)

    def step(self, provider: str) -> Callable[[], object]:
        """The timed call, forward or forward + backward; returns the forward output."""
        fn = self._impl(provider)
        if self.mode == "forward":
            return functools.partial(fn, *self.inputs)

        def forward_backward():
            for t in self.leaves:
                t.grad = None
            out = fn(*self.inputs)
            torch.autograd.backward(self.kernel.target(out), self.grad_output)
            return out

        return forward_backward

    def results(self, out) -> List[torch.Tensor]:
        """What a step computed: its outputs and, in 'full' mode, the input gradients."""
        outputs = out if isinstance(out, tuple) else (out,)
        return [t.detach() for t in outputs] + [t.grad for t in self.leaves]
