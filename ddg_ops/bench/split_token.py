"""Split-token family: the memory-bound row ops of GenDD's diffusion head, one op per case on [M, W]
rows (W = the head's width 1024), per-row operands (no cond_index) as in training.

Kernels: adaln_modulate, gated_residual, diffusion_loss_learned (IDDPM's hybrid loss, 64-wide
tokens, 8 replicas sharing a clean target) and split_token_prepare (contraction + mixup + split +
replication + noising; forward only: its outputs are targets). The whole head, GEMMs included, is
the module benchmark ``python -m benchmarks split_token_head``.

Providers:
  ddg    ddg_ops.split_token (the fused kernels)
  eager  ddg_ops.reference: the straightforward PyTorch code, and the test oracle
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

from .. import reference, split_token as ops
from ..diffusion_schedule import GaussianDiffusionSchedule

PROVIDERS = ("ddg", "eager")
MODES = ("forward", "full")
ORACLE = "eager"
# The loss sums 64 products per row and the LayerNorm statistics 1024: fp32 results of two orders of
# summation differ by a few ulps of the row's largest term.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
WIDTH = 1024
TOKEN = 64
REPLICAS = 8
# Rows M: >= 8 MiB per fp32 operand with --quick; 64 MiB on CUDA (past any L2) in the full run.
ROWS = {("cpu", True): 2048, ("cpu", False): 8192, ("cuda", True): 4096, ("cuda", False): 16384}
KERNEL_MODES = {"adaln_modulate": ("forward", "full"), "gated_residual": ("forward", "full"),
                "diffusion_loss_learned": ("forward", "full"), "split_token_prepare": ("forward",)}


def kernel_modes(kernel: str) -> Tuple[str, ...]:
    return KERNEL_MODES[kernel]


def cases(quick: bool, device=None) -> List[Tuple[str, Tuple[int, ...]]]:
    rows = ROWS[(torch.device(device or "cpu").type, quick)]
    return [(kernel, (rows, WIDTH)) for kernel in KERNEL_MODES]


def min_bytes(kernel: str, shape: Sequence[int], dtype: torch.dtype, mode: str) -> int:
    """Bytes a fused implementation moves: inputs read once, outputs written once."""
    rows, width = shape
    size = dtype.itemsize
    full = mode == "full"
    if kernel == "adaln_modulate":
        # forward: read x, shift, scale, write out (+ 8 B of row stats); backward: read grad_out, x, scale,
        # write grad_x, grad_scale (grad_shift is grad_out itself).
        return rows * width * size * (4 + (5 if full else 0)) + rows * 8
    if kernel == "gated_residual":
        # forward: read x, gate, h, write out; backward: read grad_out, gate, h, write grad_gate, grad_h.
        return rows * width * size * (4 + (5 if full else 0))
    if kernel == "diffusion_loss_learned":
        m = rows * width // TOKEN
        x0 = m // REPLICAS * TOKEN
        # forward: read [eps_hat, v], eps, x0, t; write loss, mse (fp32); backward: read grad_loss and the
        # forward's inputs again, write d/d[eps_hat, v].
        fwd = m * TOKEN * size * 3 + x0 * size + m * (8 + 8)
        bwd = m * TOKEN * size * 5 + x0 * size + m * (8 + 4)
        return fwd + (bwd if full else 0)
    if kernel == "split_token_prepare":
        batch, tokens = _prepare_batch(rows, width)
        m = batch * tokens * REPLICAS
        # read features, prototypes, noise, t; write x_t and the x0 tokens.
        return batch * tokens * TOKEN * size * 3 + m * TOKEN * size * 2 + m * 8
    raise ValueError(f"unknown split-token kernel {kernel!r}")


def _prepare_batch(rows: int, width: int) -> Tuple[int, int]:
    """(B, N) of a prepare call whose M = B N R rows of 64-wide tokens hold as many elements as [rows, width]."""
    tokens = width // TOKEN
    return max(rows * width // (TOKEN * tokens * REPLICAS), 1), tokens


class Case:
    """One (kernel, shape, dtype, mode) with fixed random inputs shared by both providers."""

    def __init__(self, kernel: str, shape: Sequence[int], dtype: torch.dtype, mode: str, device):
        self.mode = mode
        rows, width = shape
        full = mode == "full"
        gen = torch.Generator().manual_seed(0)

        def randn(*size, grad=False):
            # Drawn in fp32 on the CPU generator so every device and dtype sees the same values.
            return torch.randn(size, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

        if kernel == "adaln_modulate":
            x, shift, scale = (randn(rows, width, grad=full) for _ in range(3))
            self.leaves = [x, shift, scale]
            self.impls = {"ddg": lambda: ops.adaln_modulate(x, shift, scale),
                          "eager": lambda: reference.adaln_modulate(x, None, None, shift, scale, None, 1e-6)}
        elif kernel == "gated_residual":
            x, gate, h = (randn(rows, width, grad=full) for _ in range(3))
            self.leaves = [x, gate, h]
            self.impls = {"ddg": lambda: ops.gated_residual(x, gate, h),
                          "eager": lambda: reference.gated_residual(x, gate, h, None)}
        elif kernel == "diffusion_loss_learned":
            coefs = GaussianDiffusionSchedule.named("cosine", 1000).loss_coefs(device)
            m = rows * width // TOKEN
            model_output, noise = randn(m, 2 * TOKEN, grad=full), randn(m, TOKEN)
            x0 = randn(m // REPLICAS, TOKEN)
            t = torch.randint(0, 1000, (m,), generator=gen).to(device)
            self.leaves = [model_output]
            self.impls = {
                "ddg": lambda: ops.diffusion_loss(model_output, noise, t, coefs, x0, reduction="none").loss,
                "eager": lambda: reference.diffusion_loss(model_output, noise, t, x0, coefs, True)[0]}
        elif kernel == "split_token_prepare":
            sab, s1m = (table.to(device) for table in GaussianDiffusionSchedule.named("cosine", 1000).noising_tables())
            batch, tokens = _prepare_batch(rows, width)
            m = batch * tokens * REPLICAS
            features, prototypes = randn(batch, tokens * TOKEN), randn(batch, tokens * TOKEN)
            noise = randn(m, TOKEN)
            perm = torch.randperm(batch, generator=gen).to(device)
            t = torch.randint(0, 1000, (m,), generator=gen).to(device)
            self.leaves = []
            self.impls = {
                "ddg": lambda: ops.split_token_prepare(features, t, noise, sab, s1m, TOKEN, prototypes=prototypes,
                                                       contraction=0.9, permutation=perm, mix=0.7),
                "eager": lambda: reference.split_token_prepare(features, prototypes, 0.9, 0.7, perm, t, noise, sab,
                                                               s1m, TOKEN)}
        else:
            raise ValueError(f"unknown split-token kernel {kernel!r}")
        if full:
            with torch.no_grad():
                out = self.impls[ORACLE]()
            self.grad_output = torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype)

    def step(self, provider: str) -> Callable[[], object]:
        """The timed call, forward or forward + backward; returns the forward output."""
        fn = self.impls[provider]
        if self.mode == "forward":
            return fn

        def forward_backward():
            for t in self.leaves:
                t.grad = None
            out = fn()
            torch.autograd.backward(out, self.grad_output)
            return out

        return forward_backward

    def results(self, out) -> List[torch.Tensor]:
        """What a step computed: its outputs and, in 'full' mode, the input gradients."""
        outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return [t.detach() for t in outputs] + [t.grad for t in self.leaves if self.mode == "full"]
