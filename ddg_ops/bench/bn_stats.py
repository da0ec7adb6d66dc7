"""BN-statistics family: the DeepInversion/DDIS alignment loss ``bn_stats_loss`` (form 'unsquared',
weight 1) on the BatchNorm inputs of a ResNet-34, NCHW and channels-last.

'forward' times the loss value (batch mean/var of x and the loss on the [C] vectors); 'full' adds
the backward of the loss into x (x requires grad).

Providers:
  ddg         ddg_ops.bn_stats_loss (one Welford pass, one elementwise backward)
  eager       ddg_ops.reference.bn_stats_loss: DeepInversion-style mean + permute/contiguous/var,
              and the test oracle, so this baseline cannot drift from what the tests check
  eager_best  hand-optimised eager: one torch.var_mean pass (see _best_stats), the same loss math
  compile     torch.compile(reference, dynamic=False)

Besides the per-shape rows, ``derived_rows`` adds a ``resnet34_all_bn`` row per provider: the
whole network's BN-loss time, sum over its 36 BN layers of count x median time of that layer's
shape (shape column: the network input, N x 3 x 224 x 224).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .. import reference
from ..bn_stats import bn_stats_loss
from ..reference import BNStatsLossOutput
from ._utils import Timing, case_rows

PROVIDERS = ("ddg", "eager", "eager_best", "compile")
MODES = ("forward", "full")
ORACLE = "eager"
FORM = "unsquared"

# BatchNorm inputs of torchvision's resnet34 at 224x224, (C, H, W) -> number of BN layers with
# that input: counted with forward hooks on every BatchNorm2d of resnet34(weights=None) run on a
# 1x3x224x224 input (bn1: 1 at 112x112; layer1: 6; layer2: 8 + 1 downsample; layer3: 12 + 1;
# layer4: 6 + 1). 36 layers in all. Hard-coded so the benchmark does not need torchvision.
RESNET34_BN_INPUTS = {(64, 112, 112): 1, (64, 56, 56): 6, (128, 28, 28): 9, (256, 14, 14): 13, (512, 7, 7): 7}
RESNET34_INPUT_HW = (224, 224)
BATCHES = (32, 64)
QUICK_BATCHES = (8,)
# One large map: a single 32-channel 1024x1024 feature map (128 MiB in fp32).
LARGE_SHAPES = ((1, 32, 1024, 1024),)
# Kernel name -> memory format of x.
LAYOUTS = {"bn_stats_loss": torch.contiguous_format, "bn_stats_loss_channels_last": torch.channels_last}
QUICK_KERNELS = ("bn_stats_loss",)
NETWORK_KERNELS = {"bn_stats_loss": "resnet34_all_bn", "bn_stats_loss_channels_last": "resnet34_all_bn_channels_last"}


# ---------------------------------------------------------------- eager_best

def _best_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var) in one torch.var_mean (Welford) pass, as fp32 [C].

    Measured on a 2-core EPYC with torch 2.14 (CPU), per layout:
    - NCHW: var_mean over dims (0, 2, 3).
    - channels-last: var_mean over dim 0 of the [N*H*W, C] view (no copy): in forward +
      backward 10-50% faster than var_mean over (0, 2, 3) of the channels-last tensor, the same in forward.
    - bf16: var_mean on the bf16 tensor (fp32 accumulation; mean/var come back rounded to bf16,
      within the benchmark's bf16 tolerance) is up to 1.5x faster than on x.float().
    Not used: torch.batch_norm_stats (nn.SyncBatchNorm's one-pass statistics) has no CPU kernel;
    on CUDA it returns invstd, not var, and SyncBatchNorm supplies its own backward. A centred
    two-pass (mean, then mean of (x - mean)^2) is 2-4x faster in forward on maps that fit in the
    L3 cache, but slower than var_mean on large maps and in forward + backward.
    """
    rows = x.movedim(1, -1)
    if rows.is_contiguous():  # channels-last (or C == 1, or no spatial dims): [-1, C] is a view
        var, mean = torch.var_mean(rows.reshape(-1, x.shape[1]), dim=0, correction=0)
    else:
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.ndim)], correction=0)
    return mean.float(), var.float()


def _best_bn_stats_loss(x: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor, *, form: str,
                        weight: float) -> BNStatsLossOutput:
    mean, var = _best_stats(x)
    return BNStatsLossOutput(weight * reference.bn_alignment(mean, var, target_mean, target_var, form), mean, var)


IMPLS: Dict[str, Callable] = {
    provider: functools.partial(fn, form=FORM, weight=1.0)
    for provider, fn in (("ddg", bn_stats_loss), ("eager", reference.bn_stats_loss),
                         ("eager_best", _best_bn_stats_loss))}


# ---------------------------------------------------------------- cases

def cases(quick: bool, device=None) -> List[Tuple[str, Tuple[int, ...]]]:
    """Every distinct BN input of ResNet-34 at each batch size, per layout, then the large map.
    --quick: batch 8, NCHW, no large map (30-40 s on a 2-core EPYC with both dtypes; --dtype float32
    halves it). The full CPU run takes 3.5-7.5 min there, depending on torch.compile's cache."""
    kernels = QUICK_KERNELS if quick else tuple(LAYOUTS)
    batches = QUICK_BATCHES if quick else BATCHES
    out = []
    for kernel in kernels:
        out += [(kernel, (n, *chw)) for n in batches for chw in RESNET34_BN_INPUTS]
        if not quick:
            out += [(kernel, shape) for shape in LARGE_SHAPES]
    return out


def min_bytes(kernel: str, shape: Sequence[int], dtype: torch.dtype, mode: str) -> int:
    """Fused traffic (docs/benchmarks.md §1): forward reads x once, reads the two fp32 [C] targets and
    writes fp32 mean/var; backward reads x again and writes dx (x's dtype)."""
    numel, channels = math.prod(shape), shape[1]
    nbytes = numel * dtype.itemsize + 4 * channels * 4
    if mode == "full":
        nbytes += 2 * numel * dtype.itemsize
    return nbytes


class Case:
    """One (kernel, shape, dtype, mode) with fixed random inputs shared by all providers."""

    def __init__(self, kernel: str, shape: Sequence[int], dtype: torch.dtype, mode: str, device):
        self.mode = mode
        gen = torch.Generator().manual_seed(0)
        channels = shape[1]
        # Drawn in fp32 on the CPU generator so every device and dtype sees the same values.
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        self.x = x.contiguous(memory_format=LAYOUTS[kernel]).requires_grad_(mode == "full")
        # A BN layer's running statistics: fp32 constants, away from the batch's (0, 1) so
        # neither norm of the unsquared loss is near 0.
        self.target_mean = (0.1 * torch.randn(channels, generator=gen)).to(device)
        self.target_var = (0.5 + torch.rand(channels, generator=gen)).to(device)
        self.grad_output = torch.randn((), generator=gen).to(device)  # a random dL/dloss, fixed for the case

    def _impl(self, provider: str) -> Callable:
        if provider != "compile":
            return IMPLS[provider]
        # dynamic=False recompiles for every shape/dtype; past the recompile limit dynamo would
        # silently run eager, so each case starts from a clean cache.
        torch._dynamo.reset()
        return torch.compile(IMPLS[ORACLE], dynamic=False)

    def step(self, provider: str) -> Callable[[], object]:
        """The timed call, forward or forward + backward; returns the forward output."""
        fn = functools.partial(self._impl(provider), self.x, self.target_mean, self.target_var)
        if self.mode == "forward":
            return fn

        def forward_backward():
            self.x.grad = None
            out = fn()
            torch.autograd.backward(out.loss, self.grad_output)
            return out

        return forward_backward

    def results(self, out) -> List[torch.Tensor]:
        """What a step computed: loss, mean, var and, in 'full' mode, dL/dx."""
        return [t.detach() for t in out] + ([self.x.grad] if self.mode == "full" else [])


# ---------------------------------------------------------------- whole network

def derived_rows(rows: Sequence[Dict[str, object]], ceiling_gbps: float,
                 env: Dict[str, object]) -> List[Dict[str, object]]:
    """Whole-ResNet-34 rows (kernel ``resnet34_all_bn[_channels_last]``, shape N x 3 x 224 x 224):
    per provider, sum over the 36 BN layers of count x time of that layer's input shape, for every
    (layout, mode, dtype, N) whose 5 shapes it timed. The p20/p80 columns are the same sums of the
    per-shape p20/p80 (the spread of the parts, not quantiles of the sum)."""
    measured = {(r["kernel"], r["mode"], r["dtype"], r["shape"], r["provider"]): r for r in rows}
    groups = dict.fromkeys((r["kernel"], r["mode"], r["dtype"], int(r["shape"].split("x")[0]))
                           for r in rows if r["kernel"] in NETWORK_KERNELS)
    derived = []
    for kernel, mode, dtype_name, batch in groups:
        layers = {"x".join(map(str, (batch, *chw))): count for chw, count in RESNET34_BN_INPUTS.items()}
        timings = {}
        for provider in PROVIDERS:
            layer_rows = [measured.get((kernel, mode, dtype_name, shape, provider)) for shape in layers]
            if any(r is None for r in layer_rows):
                continue  # a layer shape not run (the large map's batch, --providers)
            if any(r["ms_p50"] is None for r in layer_rows):
                timings[provider] = Timing(note="a layer shape has no timing: " +
                                           next(r["note"] for r in layer_rows if r["ms_p50"] is None))
                continue
            timings[provider] = Timing(tuple(sum(count * r[key] for r, count in zip(layer_rows, layers.values()))
                                             for key in ("ms_p50", "ms_p20", "ms_p80")))
        if not timings:
            continue
        dtype = getattr(torch, dtype_name)
        nbytes = sum(count * min_bytes(kernel, [int(d) for d in shape.split("x")], dtype, mode)
                     for shape, count in layers.items())
        meta = {"kernel": NETWORK_KERNELS[kernel], "mode": mode, "dtype": dtype_name,
                "shape": "x".join(map(str, (batch, 3, *RESNET34_INPUT_HW)))}
        derived += case_rows(meta, timings, PROVIDERS, nbytes, ceiling_gbps, env)
    return derived
