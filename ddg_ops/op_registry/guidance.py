"""Registry rows of the guidance family: cfg_combine, cfg_step, dmd_grad."""
from __future__ import annotations

import torch

from .. import guidance, reference
from ..testing import make
from .core import (ALL_LAYOUTS, LAYOUTS, BenchRef, Call, GradSample, OpInfo, Sample, as_tuple, bad, fp64_leaves,
                   per_sample, randn, raw_bad)

ops = torch.ops.ddg
_EMPTY = ((0, 4, 8, 8), (2, 0, 3, 3))
_LARGE = (2, 4, 128, 128)
_BAD_X = (2, 3, 4)


def _opcheck_operands():
    """Per (dtype, requires_grad, channels_last): five [2, 3, 5, 7] operands."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for rg in (False, True):
            for cl in (False, True):
                tag = f"{str(dtype)[6:]}-{'grad' if rg else 'nograd'}-{'cl' if cl else 'nchw'}"
                yield tag, [randn(dtype=dtype, requires_grad=rg, channels_last=cl) for _ in range(5)]


# ------------------------------------------------------------------------------ cfg_combine

def _build_cfg_combine(shape, dtype, layout, variant, device) -> Call:
    u, c = (make(shape, dtype, LAYOUTS[layout], i, device) for i in range(2))
    scale = per_sample(shape[0], -1.0, 7.5, device) if "per_sample" in variant else 7.5
    rescale = 0.7 if "rescale" in variant else 0.0
    return Call(dict(uncond=u, cond=c), ("uncond", "cond"),
                lambda uncond, cond: as_tuple(guidance.cfg_combine(uncond, cond, scale, rescale)),
                lambda uncond, cond: as_tuple(reference.cfg_combine(uncond, cond, scale, rescale)))


def _opcheck_cfg_combine():
    for tag, (u, c, _, _, _) in _opcheck_operands():
        yield Sample(f"{tag}-scale", "cfg_combine", (u, c, 7.5, None, 0.0))
        yield Sample(f"{tag}-per_sample+rescale", "cfg_combine", (u, c, 0.0, torch.tensor([0.5, 2.0]), 0.7))
    for dtype in (torch.float32, torch.float16):
        go, u, c = (randn(dtype=dtype) for _ in range(3))
        _, stats = ops.cfg_combine(u, c, 7.5, None, 0.7)
        yield Sample(f"backward-{str(dtype)[6:]}-rescale", "cfg_combine_backward", (go, u, c, 7.5, None, 0.7, stats))
        yield Sample(f"backward-{str(dtype)[6:]}", "cfg_combine_backward",
                     (go, u, c, 7.5, None, 0.0, torch.empty(0, 4)))


def _gradcheck_cfg_combine():
    def sample(scale, rescale, seed):
        s = torch.tensor([0.5, 7.5], dtype=torch.float64) if scale == "per_sample" else scale

        def inputs():
            torch.manual_seed(seed)
            return tuple(fp64_leaves(2))
        return GradSample(f"scale={scale}-rescale={rescale}-seed={seed}",
                          lambda u, c: guidance.cfg_combine(u, c, s, rescale), inputs)
    return [sample(scale, rescale, seed) for scale in (7.5, -1.0, "per_sample") for rescale in (0.0, 0.7, 1.0)
            for seed in range(3)]


def _bad_cfg_combine():
    x = torch.randn(_BAD_X)
    return [
        bad(lambda: guidance.cfg_combine(x, torch.randn(2, 3, 5), 7.5), ValueError,
            "cfg_combine: 'cond' must have the shape"),
        bad(lambda: guidance.cfg_combine(x, x.double(), 7.5), TypeError, "cfg_combine: 'cond' must have the dtype"),
        bad(lambda: guidance.cfg_combine(x, x.to("meta"), 7.5), ValueError, "cfg_combine: 'cond' must be on the device"),
        bad(lambda: guidance.cfg_combine(x.long(), x.long(), 7.5), TypeError, "cfg_combine: 'uncond' must be float32"),
        bad(lambda: guidance.cfg_combine(torch.tensor(1.0), torch.tensor(1.0), 7.5), ValueError,
            "leading batch dimension", argument="uncond"),
        bad(lambda: guidance.cfg_combine(x.numpy(), x, 7.5), TypeError, "'uncond' must be a torch.Tensor"),
        bad(lambda: guidance.cfg_combine(x, x, "7.5"), TypeError, "'scale' must be a number or a tensor"),
        bad(lambda: guidance.cfg_combine(x, x, float("nan")), ValueError, "'scale' must be finite"),
        bad(lambda: guidance.cfg_combine(x, x, torch.ones(3)), ValueError, r"'scale' must be .* shape \[2\]"),
        bad(lambda: guidance.cfg_combine(x, x, torch.ones(2, dtype=torch.long)), TypeError,
            "'scale' must be a floating"),
        bad(lambda: guidance.cfg_combine(x, x, 7.5, rescale=1.5), ValueError, r"'rescale' must be in \[0.0, 1.0\]"),
        raw_bad(lambda: ops.cfg_combine(x, torch.randn(2, 3, 5), 7.5, None, 0.0),
                r"ddg.cfg_combine: 'cond' must have the shape"),
        raw_bad(lambda: ops.cfg_combine(x, x.half(), 7.5, None, 0.0), "ddg.cfg_combine: 'cond' must have the dtype"),
        raw_bad(lambda: ops.cfg_combine(x.int(), x.int(), 7.5, None, 0.0), "ddg.cfg_combine: 'uncond' must be float32"),
        raw_bad(lambda: ops.cfg_combine(x, x, 7.5, torch.ones(3), 0.0), r"'scale_per_sample' must have shape \[2\]"),
        raw_bad(lambda: ops.cfg_combine(x, x, 7.5, None, -0.1),
                r"'rescale' \(guidance rescale phi\) must be in \[0, 1\]"),
        raw_bad(lambda: ops.cfg_combine(x, x, float("inf"), None, 0.0), "'scale' must be finite"),
        raw_bad(lambda: ops.cfg_combine_backward(x, x, x, 7.5, None, 0.5, torch.empty(0, 4)),
                r"'stats' must have shape \[2, 4\]"),
    ]


# ------------------------------------------------------------------------------ cfg_step

_STEPS = {  # variant -> (update, coef_t, coef_next, rescale, per-sample scale and coefficients)
    "ddim_epsilon": ("ddim_epsilon", 0.05, 0.3, 0.0, False),
    "ddim_v_prediction+rescale": ("ddim_v_prediction", 0.6, 0.9, 0.7, False),
    "euler": ("euler", 0.8, 0.75, 0.0, False),
    "ddim_epsilon+per_sample+rescale": ("ddim_epsilon", (0.1, 0.7), (0.2, 1.0), 0.7, True),
}


def _build_cfg_step(shape, dtype, layout, variant, device) -> Call:
    x, u, c = (make(shape, dtype, LAYOUTS[layout], i, device) for i in range(3))
    update, coef_t, coef_next, rescale, ps = _STEPS[variant]
    batch = shape[0]
    if ps:
        coef_t, coef_next = per_sample(batch, *coef_t, device), per_sample(batch, *coef_next, device)
    scale = per_sample(batch, -1.0, 7.5, device) if ps else 7.5
    kw = dict(update=update, coef_t=coef_t, coef_next=coef_next, rescale=rescale)
    return Call(dict(sample=x, uncond=u, cond=c), ("sample", "uncond", "cond"),
                lambda sample, uncond, cond: as_tuple(guidance.cfg_step(sample, uncond, cond, scale, **kw)),
                lambda sample, uncond, cond: as_tuple(reference.cfg_step(sample, uncond, cond, scale, **kw)))


def _opcheck_cfg_step():
    for tag, (u, c, x, _, _) in _opcheck_operands():
        ps = torch.tensor([0.5, 2.0])
        yield Sample(f"{tag}-ddim_epsilon", "cfg_step", (x, u, c, 7.5, None, 0.0, "ddim_epsilon", 0.3, 0.5, None))
        yield Sample(f"{tag}-euler+per_sample", "cfg_step", (x, u, c, 7.5, ps, 0.5, "euler", 0.0, 0.0, torch.rand(2, 2)))
        yield Sample(f"{tag}-ddim_v_prediction", "cfg_step",
                     (x, u, c, 2.0, None, 0.0, "ddim_v_prediction", 0.3, 0.5, None))
    for dtype in (torch.float32, torch.float16):
        go, u, c = (randn(dtype=dtype) for _ in range(3))
        _, stats = ops.cfg_step(go, u, c, 7.5, None, 0.7, "ddim_epsilon", 0.3, 0.5, None)
        yield Sample(f"backward-{str(dtype)[6:]}", "cfg_step_backward",
                     (go, u, c, 7.5, None, 0.7, "ddim_epsilon", 0.3, 0.5, None, stats))


def _gradcheck_cfg_step():
    samples = []
    for update, coef_t, coef_next in (("ddim_epsilon", 0.2, 0.5), ("ddim_v_prediction", 0.4, 0.8),
                                      ("euler", 0.9, 0.7)):
        for rescale in (0.0, 0.7):
            kw = dict(update=update, coef_t=coef_t, coef_next=coef_next, rescale=rescale)
            samples.append(GradSample(f"{update}-rescale={rescale}",
                                      lambda x, u, c, kw=kw: guidance.cfg_step(x, u, c, 4.0, **kw),
                                      lambda: tuple(fp64_leaves(3))))

    def channels_last():
        return tuple(t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in fp64_leaves(3))

    ab = torch.tensor([0.3, 0.6], dtype=torch.float64)
    samples.append(GradSample(
        "channels_last-per_sample",
        lambda x, u, c: guidance.cfg_step(x, u, c, torch.tensor([2.0, 5.0], dtype=torch.float64),
                                          update="ddim_epsilon", coef_t=ab, coef_next=ab + 0.2, rescale=0.5),
        channels_last))
    return samples


def _bad_cfg_step():
    x = torch.randn(_BAD_X)
    return [
        bad(lambda: guidance.cfg_step(x, x, x, 7.5, update="ddpm", coef_t=0.5, coef_next=0.6), ValueError,
            "cfg_step: 'update' must be one of"),
        bad(lambda: guidance.cfg_step(x, x, x, 7.5, update="ddim_epsilon", coef_t=0.0, coef_next=0.6), ValueError,
            r"'coef_t' must be in \(0.0, 1.0\]"),
        bad(lambda: guidance.cfg_step(x, x, x[:1], 7.5, update="euler", coef_t=1.0, coef_next=0.5), ValueError,
            "cfg_step: 'cond' must have the shape of 'sample'"),
        bad(lambda: guidance.ddim_cfg_step(x, x, x, 7.5, 0.5, 0.6, prediction_type="sample"), ValueError,
            "'prediction_type' must be one of"),
        raw_bad(lambda: ops.cfg_step(x, x, x, 7.5, None, 0.0, "heun", 0.5, 0.5, None), "ddg.cfg_step: 'update' must be"),
        raw_bad(lambda: ops.cfg_step(x, x, x, 7.5, None, 0.0, "ddim_epsilon", 1.5, 0.5, None),
                r"'coef_t' \(alpha_bar at t\)"),
        raw_bad(lambda: ops.cfg_step(x, x, x, 7.5, None, 0.0, "euler", 0.5, 0.5, torch.ones(2)),
                r"'coef_per_sample' must have shape \[2, 2\]"),
    ]


# ------------------------------------------------------------------------------ dmd_grad

def _build_dmd_grad(shape, dtype, layout, variant, device) -> Call:
    x, u, c, f, xt = (make(shape, dtype, LAYOUTS[layout], i, device) for i in range(5))
    batch = shape[0]
    scale = per_sample(batch, 1.0, 4.5, device) if "per_sample" in variant else 3.5
    if variant.startswith("epsilon"):
        ab = per_sample(batch, 0.05, 0.95, device) if "per_sample" in variant else 0.35
        inputs = dict(x=x, uncond=u, cond=c, fake=f, x_t=xt)
        kw = dict(prediction="epsilon", alpha_bar=ab)
    else:
        inputs = dict(x=x, uncond=u, cond=c, fake=f)
        kw = dict(prediction="velocity")
    # Only x (the generator output) receives a gradient: the scores are stop-gradient constants.
    return Call(inputs, ("x",),
                lambda x, uncond, cond, fake, **o: as_tuple(guidance.dmd_grad(x, uncond, cond, fake, scale, **kw, **o)),
                lambda x, uncond, cond, fake, **o: as_tuple(reference.dmd_grad(x, uncond, cond, fake, scale, **kw, **o)))


def _opcheck_dmd_grad():
    for tag, (u, c, x, f, xt) in _opcheck_operands():
        yield Sample(f"{tag}-velocity", "dmd_grad", (x, u.detach(), c.detach(), f.detach(), 3.5, None, "velocity",
                                                    None, None))
        yield Sample(f"{tag}-epsilon+per_sample", "dmd_grad",
                     (x, u.detach(), c.detach(), f.detach(), 3.5, torch.tensor([0.5, 2.0]), "epsilon", xt.detach(),
                      torch.tensor([0.2, 0.7])))
    for dtype in (torch.float32, torch.float16):
        go, u, c = (randn(dtype=dtype) for _ in range(3))
        g, _, _ = ops.dmd_grad(go, u, c, go, 3.5, None, "velocity", None, None)
        yield Sample(f"backward-{str(dtype)[6:]}", "dmd_grad_backward", (torch.tensor(1.5), g, dtype))


def _bad_dmd_grad():
    x = torch.randn(_BAD_X)
    return [
        bad(lambda: guidance.dmd_grad(x, x, x, x, 3.5, prediction="epsilon"), ValueError, "needs 'x_t'"),
        bad(lambda: guidance.dmd_grad(x, x, x, x, 3.5, x_t=x), ValueError, "only used with prediction='epsilon'",
            argument="x_t"),
        bad(lambda: guidance.dmd_grad(x, x, x, x, 3.5, prediction="sample"), ValueError,
            "'prediction' must be one of"),
        bad(lambda: guidance.dmd_grad(x, x, x, x.half(), 3.5), TypeError, "dmd_grad: 'fake' must have the dtype"),
        bad(lambda: guidance.dmd_grad(x, x, x, x, 3.5, prediction="epsilon", x_t=x, alpha_bar=torch.ones(5)),
            ValueError, r"'alpha_bar' must be .* shape \[2\]"),
        bad(lambda: guidance.dmd_grad(x, x, x, x, 3.5, prediction="epsilon", x_t=x, alpha_bar=0.0),
            ValueError, r"'alpha_bar' must be in \(0.0, 1.0\]"),
        raw_bad(lambda: ops.dmd_grad(x, x, x, x, 3.5, None, "epsilon", None, None),
                "ddg.dmd_grad: prediction='epsilon' needs"),
        raw_bad(lambda: ops.dmd_grad(x, x, x, x, 3.5, None, "score", None, None),
                "'prediction' must be 'velocity' or 'epsilon'"),
        raw_bad(lambda: ops.dmd_grad_backward(torch.ones(2), x, torch.float32), "'grad_loss' must be a 0-D tensor"),
        raw_bad(lambda: ops.dmd_grad_backward(torch.ones(()), x, torch.float64), "'grad' must be Double for dtype Double"),
    ]


ROWS = (
    OpInfo("cfg_combine", "guidance", ("cfg_combine", "cfg_combine_backward"), guidance.cfg_combine,
           reference.cfg_combine,
           {"odd": ((3, 5, 37, 41), (1,), (2, 1001)), "large": (_LARGE, (8, 16, 128, 128)), "empty": _EMPTY},
           ALL_LAYOUTS, ("scale", "per_sample", "scale+rescale", "per_sample+rescale"), _build_cfg_combine,
           _opcheck_cfg_combine, _gradcheck_cfg_combine, _bad_cfg_combine,
           BenchRef("guidance", ("cfg_combine", "cfg_combine_rescale"))),
    OpInfo("cfg_step", "guidance", ("cfg_step", "cfg_step_backward"), guidance.cfg_step, reference.cfg_step,
           {"odd": ((3, 5, 37, 41), (5,)), "large": (_LARGE, (4, 16, 128, 128)), "empty": _EMPTY},
           ALL_LAYOUTS, tuple(_STEPS), _build_cfg_step, _opcheck_cfg_step, _gradcheck_cfg_step, _bad_cfg_step,
           BenchRef("guidance", ("cfg_step_ddim", "cfg_step_euler"))),
    OpInfo("dmd_grad", "guidance", ("dmd_grad", "dmd_grad_backward"), guidance.dmd_grad, reference.dmd_grad,
           {"odd": ((3, 5, 37, 41), (3,)), "large": (_LARGE, (4, 16, 128, 128)), "empty": _EMPTY},
           ALL_LAYOUTS, ("velocity", "velocity+per_sample", "epsilon", "epsilon+per_sample"), _build_dmd_grad,
           _opcheck_dmd_grad, lambda: (), _bad_dmd_grad, BenchRef("guidance", ("dmd_grad",)),
           large_variants=("velocity", "epsilon+per_sample"),
           # tests/ops/test_guidance.py checks its backward against the MSE trick instead.
           no_gradcheck="its loss is a stop-gradient surrogate: the numerical derivative in x is not g / numel "
                        "by design"),
)
