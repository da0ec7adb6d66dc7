"""Registry row of the BN-statistics family: bn_stats (bn_stats_loss is built on it)."""
from __future__ import annotations

import torch

from .. import reference
# ddg_ops.bn_stats is the function (the package re-exports it over its module's name): import from the module.
from ..bn_stats import bn_stats, bn_stats_loss
from ..testing import make
from .core import ALL_LAYOUTS, LAYOUTS, BenchRef, Call, GradSample, OpInfo, Sample, as_tuple, bad, raw_bad

ops = torch.ops.ddg


def _build_bn_stats(shape, dtype, layout, variant, device) -> Call:
    # Mean 1.5, std 3: away from zero so a merge that drops the offset shows.
    x = make(shape, dtype, LAYOUTS[layout], 0, device, scale=3.0, offset=1.5)
    # Mean and variance are sums over N*H*W elements: their rounding error grows with that count.
    return Call(dict(x=x), ("x",), lambda x: as_tuple(bn_stats(x)),
                lambda x: as_tuple(reference.bn_stats(x)), lambda inputs, grads: {"out0": 10.0, "out1": 10.0})


def _opcheck():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for layout in ("contiguous", "channels_last"):
            tag = f"{str(dtype)[6:]}-{layout}"
            x = make((2, 5, 6, 7), dtype, layout, scale=3.0, offset=1.5).requires_grad_()
            yield Sample(tag, "bn_stats", (x,))
            mean, _ = ops.bn_stats(x.detach())
            acc = mean.dtype
            yield Sample(f"backward-{tag}", "bn_stats_backward",
                         (torch.randn(5, dtype=acc), torch.randn(5, dtype=acc), x.detach(), mean))


def _gradcheck():
    def leaf(channels_last):
        def inputs():
            x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return (x.requires_grad_(),)
        return inputs

    tm, tv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    samples = []
    for channels_last in (False, True):
        tag = "channels_last" if channels_last else "nchw"
        samples.append(GradSample(f"bn_stats-{tag}", lambda t: bn_stats(t), leaf(channels_last)))
        for form in ("unsquared", "squared"):
            samples.append(GradSample(f"bn_stats_loss-{form}-{tag}",
                                      lambda t, form=form: bn_stats_loss(t, tm, tv, form=form).loss,
                                      leaf(channels_last)))
    return samples


def _bad():
    return [
        bad(lambda: bn_stats(torch.randn(5)), ValueError, r"'x' must be \[N, C, ...\]"),
        bad(lambda: bn_stats(torch.randn(0, 3, 2)), ValueError, "'x' must have elements"),
        bad(lambda: bn_stats(torch.ones(2, 3, dtype=torch.long)), TypeError, "'x' must be float32"),
        bad(lambda: bn_stats_loss(torch.randn(2, 3, 4), torch.zeros(4), torch.ones(3)), ValueError,
            r"'target_mean' must be a floating \[C\] = \[3\]"),
        bad(lambda: bn_stats_loss(torch.randn(2, 3, 4), torch.zeros(3), torch.ones(3), form="l1"), ValueError,
            "'form' must be one of"),
        bad(lambda: bn_stats_loss(torch.randn(2, 3, 4), torch.zeros(3), torch.ones(3), weight=float("inf")),
            ValueError, "'weight' must be finite"),
        raw_bad(lambda: ops.bn_stats(torch.randn(4)), r"ddg.bn_stats: 'x' must be \[N, C, ...\]"),
        raw_bad(lambda: ops.bn_stats_backward(torch.randn(3), torch.randn(4), torch.randn(2, 4, 5), torch.randn(4)),
                r"'grad_mean' must have shape \[4\]"),
        raw_bad(lambda: ops.bn_stats_backward(torch.randn(4), torch.randn(4), torch.randn(2, 4, 5),
                                              torch.randn(4, dtype=torch.float64)), "'mean' must be Float"),
    ]


ROWS = (
    # bn_stats rejects empty maps by design (no statistics to take).
    OpInfo("bn_stats", "bn_stats", ("bn_stats", "bn_stats_backward"), bn_stats, reference.bn_stats,
           {"odd": ((5, 3, 13, 17), (2, 7, 5, 9), (33, 7)), "large": ((4, 64, 28, 28), (8, 64, 56, 56))},
           ALL_LAYOUTS, ("stats",), _build_bn_stats, _opcheck, _gradcheck, _bad,
           BenchRef("bn_stats", ("bn_stats_loss", "bn_stats_loss_channels_last"))),
)
