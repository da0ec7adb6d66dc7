"""The self-test's bandwidth table: per op family, the median time of the fused kernel, the bytes a
perfect implementation moves, the GB/s that makes, and the same for a plain tensor copy of the same
number of bytes timed in the same run (the ceiling an elementwise kernel can hope for here).

The guidance and BN-statistics rows reuse ddg_ops.bench's cases and byte counts (provider 'ddg');
the split-token bench times whole GEMM-bound head steps, so the row ops (adaLN, gated residual,
diffusion loss, target preparation) have their own memory-bound cases here.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import functional
from ..bench import bn_stats as bench_bn_stats, guidance as bench_guidance
from ..bench._utils import time_fn
from ..diffusion_schedule import GaussianDiffusionSchedule

# Seconds of timing per kernel and per copy.
MIN_RUN_TIME = {"quick": 0.05, "full": 0.2}
DTYPES = {"quick": (torch.float32,), "full": (torch.float32, torch.bfloat16)}
# [M, W] rows of the row-op cases (M = rows, W = the head's width 1024): >= 8 MiB per fp32 operand
# with --quick, 64 MiB on CUDA (past any L2) in the full run.
ROWS = {("cpu", True): 2048, ("cpu", False): 8192, ("cuda", True): 4096, ("cuda", False): 16384}
WIDTH = 1024
TOKEN = 64


@dataclass
class Row:
    family: str
    kernel: str
    mode: str
    dtype: str
    shape: str
    nbytes: int
    ms: float
    copy_ms: float
    # Largest p80/p20 of the kernel's and the copy's times: near 1 on a quiet machine; well above it
    # when other processes share the cores and the row says little.
    spread: float = 1.0

    @property
    def gbps(self) -> float:
        return self.nbytes / (self.ms * 1e-3) / 1e9

    @property
    def copy_gbps(self) -> float:
        return self.nbytes / (self.copy_ms * 1e-3) / 1e9

    @property
    def ratio(self) -> float:
        """Kernel GB/s over copy GB/s: 1.0 is the copy limit."""
        return self.copy_ms / self.ms

    def as_dict(self) -> Dict[str, object]:
        return {"family": self.family, "kernel": self.kernel, "mode": self.mode, "dtype": self.dtype,
                "shape": self.shape, "bytes": self.nbytes, "ms": round(self.ms, 6), "gb_per_s": round(self.gbps, 2),
                "copy_ms": round(self.copy_ms, 6), "copy_gb_per_s": round(self.copy_gbps, 2),
                "ratio_to_copy": round(self.ratio, 3), "spread_p80_p20": round(self.spread, 2)}


# ------------------------------------------------------------------------------ row-op cases

def _rows_case(kernel: str, mode: str, dtype: torch.dtype, device, rows: int
               ) -> Tuple[Callable[[], object], int, Tuple[int, ...]]:
    """(step, bytes a fused implementation moves, shape) of one row op. 'full' adds the backward
    with a fixed random grad_output; per-row operands (no cond_index), as in training."""
    size = dtype.itemsize
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    full = mode == "full"
    if kernel == "adaln_modulate":
        x, shift, scale = (randn(rows, WIDTH, grad=full) for _ in range(3))
        fn = lambda: functional.adaln_modulate(x, shift, scale)  # noqa: E731
        # forward: read x, shift, scale, write out (+ 8 B of row stats); backward: read grad_out, x, scale,
        # write grad_x, grad_scale (grad_shift is grad_out itself).
        nbytes = rows * WIDTH * size * (4 + (5 if full else 0)) + rows * 8
        leaves, shape = [x, shift, scale], (rows, WIDTH)
    elif kernel == "gated_residual":
        x, gate, h = (randn(rows, WIDTH, grad=full) for _ in range(3))
        fn = lambda: functional.gated_residual(x, gate, h)  # noqa: E731
        # forward: read x, gate, h, write out; backward: read grad_out, gate, h, write grad_gate, grad_h.
        nbytes = rows * WIDTH * size * (4 + (5 if full else 0))
        leaves, shape = [x, gate, h], (rows, WIDTH)
    elif kernel == "diffusion_loss_learned":
        schedule = GaussianDiffusionSchedule.named("cosine", 1000)
        m = rows * WIDTH // TOKEN
        model_output, noise = randn(m, 2 * TOKEN, grad=full), randn(m, TOKEN)
        x0 = randn(m // 8, TOKEN)  # 8 replicas share a clean target
        t = torch.randint(0, 1000, (m,), generator=gen).to(device)
        coefs = schedule.loss_coefs(device)
        fn = lambda: functional.diffusion_loss(model_output, noise, t, coefs, x0, reduction="none").loss  # noqa: E731
        # forward: read [eps_hat, v], eps, x0, t; write loss, mse (fp32); backward: read grad_loss and the
        # forward's inputs again, write d/d[eps_hat, v].
        fwd = m * TOKEN * size * 3 + x0.numel() * size + m * (8 + 8)
        bwd = m * TOKEN * size * 5 + x0.numel() * size + m * (8 + 4)
        nbytes = fwd + (bwd if full else 0)
        leaves, shape = [model_output], (m, TOKEN)
    elif kernel == "split_token_prepare":
        sqrt_ab, sqrt_1mab = (table.to(device) for table in GaussianDiffusionSchedule.named("cosine", 1000)
                              .noising_tables())
        replicas, tokens = 8, WIDTH // TOKEN
        batch = max(rows * WIDTH // (TOKEN * tokens * replicas), 1)
        m = batch * tokens * replicas
        features, prototypes = randn(batch, tokens * TOKEN), randn(batch, tokens * TOKEN)
        noise = randn(m, TOKEN)
        perm = torch.randperm(batch, generator=gen).to(device)
        t = torch.randint(0, 1000, (m,), generator=gen).to(device)
        fn = lambda: functional.split_token_prepare(features, t, noise, sqrt_ab, sqrt_1mab, TOKEN,  # noqa: E731
                                                    prototypes=prototypes, contraction=0.9, permutation=perm, mix=0.7)
        # read features, prototypes, noise, t; write x_t and the x0 tokens.
        nbytes = features.numel() * size * 3 + m * TOKEN * size * 2 + m * 8
        leaves, shape = [], (batch, tokens * TOKEN, replicas)
    else:
        raise ValueError(f"unknown row kernel {kernel!r}")
    if not full:
        return fn, nbytes, shape
    out = fn()
    grad_out = torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype)

    def forward_backward():
        for t in leaves:
            t.grad = None
        result = fn()
        torch.autograd.backward(result, grad_out)
        return result

    return forward_backward, nbytes, shape


ROW_KERNELS = {"adaln_modulate": ("forward", "full"), "gated_residual": ("forward", "full"),
               "diffusion_loss_learned": ("forward", "full"), "split_token_prepare": ("forward",)}


# ------------------------------------------------------------------------------ the table

def _largest(cases: Sequence[Tuple[str, Tuple[int, ...]]], kernel: str) -> Optional[Tuple[int, ...]]:
    shapes = [shape for k, shape in cases if k == kernel]
    return max(shapes, key=math.prod) if shapes else None


def _copy_times(nbytes: int, device, min_run_time: float) -> Tuple[float, float, float]:
    """(p50, p20, p80) ms of a same-device copy that reads nbytes / 2 and writes nbytes / 2."""
    src = torch.ones(max(nbytes // 8, 1), dtype=torch.float32, device=device)  # ones: touch the pages
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device, min_run_time)


def _bench_case(module, kernel: str, shape, mode: str, dtype: torch.dtype, device):
    """(step, bytes, shape) of one ddg_ops.bench case, provider 'ddg'."""
    case = module.Case(kernel, shape, dtype, mode, device)
    return case.step("ddg"), module.min_bytes(kernel, shape, dtype, mode), shape


def measure(device: torch.device, quick: bool, progress=None) -> List[Row]:
    """One row per (family, kernel, mode, dtype) at the largest shape its bench cases use (``quick``:
    the bench's --quick cases), each next to a copy of the same bytes timed in the same run."""
    level = "quick" if quick else "full"
    min_run_time = MIN_RUN_TIME[level]
    todo: List[Tuple[str, str, str, torch.dtype, Callable]] = []  # (family, kernel, mode, dtype, build)
    for family, module in (("guidance", bench_guidance), ("bn_stats", bench_bn_stats)):
        cases = module.cases(quick, device)
        for kernel in dict.fromkeys(k for k, _ in cases):
            shape = _largest(cases, kernel)
            for mode in getattr(module, "kernel_modes", lambda k: module.MODES)(kernel):
                for dtype in DTYPES[level]:
                    todo.append((family, kernel, mode, dtype, functools.partial(_bench_case, module, kernel, shape,
                                                                                mode, dtype, device)))
    rows = ROWS[(device.type, quick)]
    for kernel, modes in ROW_KERNELS.items():
        for mode in modes:
            for dtype in DTYPES[level]:
                todo.append(("split_token", kernel, mode, dtype,
                             functools.partial(_rows_case, kernel, mode, dtype, device, rows)))
    table = []
    for family, kernel, mode, dtype, build in todo:
        step, nbytes, shape = build()
        step()  # warm-up (and first-touch of the outputs)
        ms, ms20, ms80 = time_fn(step, device, min_run_time)
        copy_ms, copy20, copy80 = _copy_times(nbytes, device, min_run_time)
        row = Row(family, kernel, mode, str(dtype).replace("torch.", ""), "x".join(map(str, shape)), nbytes, ms,
                  copy_ms, max(ms80 / ms20, copy80 / copy20))
        table.append(row)
        if progress:
            progress(row)
    return table
