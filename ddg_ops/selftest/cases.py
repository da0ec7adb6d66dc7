"""The self-test's grid: for every ddg op, how to build its inputs at one (dtype, layout, shape,
variant) point, the functional call that runs the kernel, and the reference call it must match.

An ``OpCase`` names the ``torch.ops.ddg`` operators it exercises (a forward op and, through
autograd, its backward op); ``checks.uncovered_ops`` fails the run when a registered operator is
named by no case. Shapes come in three size classes: ``odd`` (tails, widths one past a vector,
tiny batches), ``large`` (millions of elements; ``--quick``: about 10^5) and ``empty``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch

from .. import functional, reference
from ..diffusion_schedule import GaussianDiffusionSchedule
from ..testing import make

# The layouts of the grid, as ddg_ops.testing.make names them; "transposed" is make's
# batch_not_outer (dims 0 and 1 swapped: dense but not row-major, column-major for [M, W] rows).
LAYOUTS = {"contiguous": "contiguous", "channels_last": "channels_last", "sliced": "sliced",
           "transposed": "batch_not_outer"}
SIZES = ("odd", "large", "empty")


@dataclass
class Call:
    """One grid point, ready to run: ``run(**inputs)`` is the functional API (the kernel),
    ``reference(**fp64 copies of inputs)`` the oracle; both return a tuple of tensors. Gradients
    are checked for the inputs named in ``differentiable`` through every output the reference
    makes differentiable. ``scales`` widens atol per result ('out0', 'grad_x', ...) where the
    error grows with something other than the result's magnitude."""
    inputs: Dict[str, object]
    differentiable: Tuple[str, ...]
    run: Callable[..., tuple]
    reference: Callable[..., tuple]
    scales: Callable[[Dict[str, object], Sequence[torch.Tensor]], Dict[str, float]] = lambda inputs, grads: {}


@dataclass(frozen=True)
class OpCase:
    name: str
    covers: Tuple[str, ...]          # torch.ops.ddg operators this case runs
    shapes: Dict[str, Tuple[tuple, ...]]  # size class -> shapes; "large" is (quick, full)
    layouts: Tuple[str, ...]
    variants: Tuple[str, ...]
    build: Callable[[tuple, torch.dtype, str, str, torch.device], Call]
    # Variants run at the large shapes (all would multiply the slowest part of the grid).
    large_variants: Tuple[str, ...] = ()
    notes: str = ""

    def grid_shapes(self, size: str, quick: bool) -> Tuple[tuple, ...]:
        if size == "large":
            quick_shape, full_shape = self.shapes["large"]
            return (quick_shape if quick else full_shape,)
        return self.shapes.get(size, ())

    def layouts_for(self, shape: tuple, size: str = "odd") -> Tuple[str, ...]:
        """channels_last needs a 4-D tensor, a transposed layout at least 2 dims; an empty tensor has
        no elements to lay out (its strides are checked by the odd shapes), so it runs contiguous."""
        if size == "empty":
            return self.layouts[:1]
        ndim = len(shape)
        return tuple(l for l in self.layouts
                     if not (l == "channels_last" and ndim != 4) and not (l == "transposed" and ndim < 2))

    def variants_for(self, size: str) -> Tuple[str, ...]:
        return (self.large_variants or self.variants[-1:]) if size == "large" else self.variants


def _tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _per_sample(batch: int, low: float, high: float, device) -> torch.Tensor:
    return torch.linspace(low, high, batch, device=device)


# ------------------------------------------------------------------------------ guidance

def _build_cfg_combine(shape, dtype, layout, variant, device) -> Call:
    u, c = (make(shape, dtype, LAYOUTS[layout], i, device) for i in range(2))
    scale = _per_sample(shape[0], -1.0, 7.5, device) if "per_sample" in variant else 7.5
    rescale = 0.7 if "rescale" in variant else 0.0
    return Call(dict(uncond=u, cond=c), ("uncond", "cond"),
                lambda uncond, cond: _tuple(functional.cfg_combine(uncond, cond, scale, rescale)),
                lambda uncond, cond: _tuple(reference.cfg_combine(uncond, cond, scale, rescale)))


_STEPS = {  # variant -> (update, coef_t, coef_next, rescale, per-sample scale and coefficients)
    "ddim_epsilon": ("ddim_epsilon", 0.05, 0.3, 0.0, False),
    "ddim_v_prediction+rescale": ("ddim_v_prediction", 0.6, 0.9, 0.7, False),
    "euler": ("euler", 0.8, 0.75, 0.0, False),
    "ddim_epsilon+per_sample+rescale": ("ddim_epsilon", (0.1, 0.7), (0.2, 1.0), 0.7, True),
}


def _build_cfg_step(shape, dtype, layout, variant, device) -> Call:
    x, u, c = (make(shape, dtype, LAYOUTS[layout], i, device) for i in range(3))
    update, coef_t, coef_next, rescale, per_sample = _STEPS[variant]
    batch = shape[0]
    if per_sample:
        coef_t, coef_next = _per_sample(batch, *coef_t, device), _per_sample(batch, *coef_next, device)
    scale = _per_sample(batch, -1.0, 7.5, device) if per_sample else 7.5
    kw = dict(update=update, coef_t=coef_t, coef_next=coef_next, rescale=rescale)
    return Call(dict(sample=x, uncond=u, cond=c), ("sample", "uncond", "cond"),
                lambda sample, uncond, cond: _tuple(functional.cfg_step(sample, uncond, cond, scale, **kw)),
                lambda sample, uncond, cond: _tuple(reference.cfg_step(sample, uncond, cond, scale, **kw)))


def _build_dmd_grad(shape, dtype, layout, variant, device) -> Call:
    x, u, c, f, xt = (make(shape, dtype, LAYOUTS[layout], i, device) for i in range(5))
    batch = shape[0]
    scale = _per_sample(batch, 1.0, 4.5, device) if "per_sample" in variant else 3.5
    if variant.startswith("epsilon"):
        ab = _per_sample(batch, 0.05, 0.95, device) if "per_sample" in variant else 0.35
        inputs = dict(x=x, uncond=u, cond=c, fake=f, x_t=xt)
        kw = dict(prediction="epsilon", alpha_bar=ab)
    else:
        inputs = dict(x=x, uncond=u, cond=c, fake=f)
        kw = dict(prediction="velocity")
    # Only x (the generator output) receives a gradient: the scores are stop-gradient constants.
    return Call(inputs, ("x",),
                lambda x, uncond, cond, fake, **o: _tuple(functional.dmd_grad(x, uncond, cond, fake, scale, **kw, **o)),
                lambda x, uncond, cond, fake, **o: _tuple(reference.dmd_grad(x, uncond, cond, fake, scale, **kw, **o)))


# ------------------------------------------------------------------------------ BN statistics

def _build_bn_stats(shape, dtype, layout, variant, device) -> Call:
    # Mean 1.5, std 3: away from zero so a merge that drops the offset shows.
    x = make(shape, dtype, LAYOUTS[layout], 0, device, scale=3.0, offset=1.5)
    # Mean and variance are sums over N*H*W elements: their rounding error grows with that count.
    return Call(dict(x=x), ("x",), lambda x: _tuple(functional.bn_stats(x)),
                lambda x: _tuple(reference.bn_stats(x)), lambda inputs, grads: {"out0": 10.0, "out1": 10.0})


# ------------------------------------------------------------------------------ split-token ops

def _cond_index(rows: int, device) -> Tuple[torch.Tensor, int]:
    """U < M shared condition rows (M > 1); the last one is never used, so its gradient must be 0."""
    cond_rows = rows // 3 + 2
    return torch.randint(0, cond_rows - 1, (rows,), device=device), cond_rows


def _projection_slices(rows: int, width: int, dtype, layout: str, device, count: int):
    """Per-row adaLN operands: contiguous [U, W] tensors, or (any other layout) column slices of one
    [U, 11 W] projection, as the head's concatenated adaLN GEMM hands them over."""
    if layout == "contiguous":
        return [make((rows, width), dtype, "contiguous", 0, device, scale=0.7) for _ in range(count)]
    proj = make((rows, 11 * width), dtype, "contiguous", 0, device, scale=0.7)
    return [proj[:, (3 + i) * width:(4 + i) * width] for i in range(count)]


def _adaln_x_scale(eps: float):
    """d/dx of a LayerNorm row is rstd * (g - mean(g) - xhat mean(g xhat)), g = grad_out (1 + scale) w:
    its rounding error scales with rstd * |g|, up to 1/sqrt(eps) times the result for flat rows."""
    def scales(inputs, grad_outs):
        x = inputs["x"].detach()
        if not x.numel():
            return {}
        rstd = (x.var(1, correction=0, keepdim=True) + eps).rsqrt()
        scale, ci, weight = inputs["scale"].detach(), inputs["cond_index"], inputs["weight"]
        g = grad_outs[0] * (1 + (scale if ci is None else scale[ci]))
        if weight is not None:
            g = g * weight.detach()
        return {"grad_x": float((rstd * g.abs()).max())}
    return scales


def _build_adaln_modulate(shape, dtype, layout, variant, device) -> Call:
    rows, width = shape
    ci, cond_rows = _cond_index(rows, device) if "cond_index" in variant else (None, rows)
    shift, scale = _projection_slices(cond_rows, width, dtype, layout, device, 2)
    affine = variant.startswith("affine")
    weight = make((width,), dtype, "contiguous", 0, device, scale=0.5, offset=1.0) if affine else None
    bias = make((width,), dtype, "contiguous", 0, device, scale=0.3) if affine else None
    x = make(shape, dtype, LAYOUTS[layout], 0, device, scale=2.0, offset=0.5)
    eps = 1e-6
    return Call(dict(x=x, shift=shift, scale=scale, weight=weight, bias=bias, cond_index=ci),
                ("x", "shift", "scale", "weight", "bias"),
                lambda x, shift, scale, weight, bias, cond_index: _tuple(functional.adaln_modulate(
                    x, shift, scale, weight, bias, eps=eps, cond_index=cond_index)),
                lambda x, shift, scale, weight, bias, cond_index: _tuple(reference.adaln_modulate(
                    x, weight, bias, shift, scale, cond_index, eps)),
                _adaln_x_scale(eps))


def _build_gated_residual(shape, dtype, layout, variant, device) -> Call:
    rows, _ = shape
    ci, cond_rows = _cond_index(rows, device) if variant == "cond_index" else (None, rows)
    (gate,) = _projection_slices(cond_rows, shape[1], dtype, layout, device, 1)
    x, h = (make(shape, dtype, LAYOUTS[layout], i, device) for i in range(2))
    return Call(dict(x=x, gate=gate, h=h, cond_index=ci), ("x", "gate", "h"),
                lambda x, gate, h, cond_index: _tuple(functional.gated_residual(x, gate, h, cond_index=cond_index)),
                lambda x, gate, h, cond_index: _tuple(reference.gated_residual(x, gate, h, cond_index)))


_T = 1000
_SCHEDULE_CACHE: Dict[str, tuple] = {}


def _schedule(device) -> tuple:
    """(loss_coefs [T, 3], sqrt_alpha_bar [T], sqrt_one_minus_alpha_bar [T]) of the cosine schedule."""
    key = str(device)
    if key not in _SCHEDULE_CACHE:
        schedule = GaussianDiffusionSchedule.named("cosine", _T)
        _SCHEDULE_CACHE[key] = (schedule.loss_coefs(device), *(t.to(device) for t in schedule.noising_tables()))
    return _SCHEDULE_CACHE[key]


def _timesteps(rows: int, device) -> torch.Tensor:
    """Random steps with t = 0 (the decoder NLL) and t = T-1 present."""
    t = torch.randint(0, _T, (rows,), device=device)
    if rows:
        t[0], t[-1] = 0, _T - 1
    return t


def _build_diffusion_loss(shape, dtype, layout, variant, device) -> Call:
    rows, channels = shape
    learned = variant.startswith("learned")
    reduction = "mean" if variant.endswith("mean") else "none"
    noise = make(shape, dtype, LAYOUTS[layout], 1, device)
    # A model near its target (eps_hat = eps + 0.5 N(0, 1), v ~ 0.7 N(0, 1)), as in training: far in the
    # tails the decoder NLL's bin probability is a difference of two CDFs near 1, which fp32 cannot
    # resolve against an fp64 reference (the formula's conditioning, not the kernel's).
    parts = [noise.double() + 0.5 * torch.randn(shape, dtype=torch.float64, device=device)]
    if learned:
        parts.append(0.7 * torch.randn(shape, dtype=torch.float64, device=device))
    model_output = make((rows, len(parts) * channels), dtype, LAYOUTS[layout], 0, device)
    model_output.copy_(torch.cat(parts, 1))  # the values into the layout's strides
    replicas = 3 if rows % 3 == 0 and rows else 1
    # x0 both inside [-1, 1] and past +-0.999 (the decoder's end bins).
    x0 = make((max(rows // replicas, 1), channels), dtype, "contiguous", 0, device, scale=1.5) if learned else None
    loss_coefs = _schedule(device)[0]
    t = _timesteps(rows, device)

    def run(model_output, noise, x0):
        return _tuple(functional.diffusion_loss(model_output, noise, t, loss_coefs, x0, learned_variance=learned,
                                                reduction=reduction))

    def ref(model_output, noise, x0):
        loss, mse = reference.diffusion_loss(model_output, noise, t, x0, loss_coefs, learned)
        return (loss.mean(), mse.mean()) if reduction == "mean" else (loss, mse)

    return Call(dict(model_output=model_output, noise=noise, x0=x0), ("model_output",), run, ref)


def _build_split_token_prepare(shape, dtype, layout, variant, device) -> Call:
    batch, tokens, token_size, replicas = shape
    dim = tokens * token_size
    rows = batch * tokens * replicas
    features = make((batch, dim), dtype, LAYOUTS[layout], 0, device, offset=0.2)
    noise = make((rows, token_size), dtype, LAYOUTS[layout], 1, device)
    mixed = variant == "contraction+mixup"
    prototypes = make((batch, dim), dtype, LAYOUTS[layout], 2, device) if mixed else None
    permutation = torch.randperm(batch, device=device) if mixed else None
    t = _timesteps(rows, device)
    _, sqrt_ab, sqrt_1mab = _schedule(device)

    def run(features, noise, prototypes):
        return _tuple(functional.split_token_prepare(features, t, noise, sqrt_ab, sqrt_1mab, token_size,
                                                     prototypes=prototypes, contraction=0.9,
                                                     permutation=permutation, mix=0.35))

    def ref(features, noise, prototypes):
        return _tuple(reference.split_token_prepare(features, prototypes, 0.9, 0.35, permutation, t, noise,
                                                    sqrt_ab, sqrt_1mab, token_size))

    return Call(dict(features=features, noise=noise, prototypes=prototypes), (), run, ref)


# ------------------------------------------------------------------------------ the grid

_ALL_LAYOUTS = tuple(LAYOUTS)
_ROW_LAYOUTS = ("contiguous", "sliced", "transposed")

CASES: Tuple[OpCase, ...] = (
    OpCase("cfg_combine", ("cfg_combine", "cfg_combine_backward"),
           {"odd": ((3, 5, 37, 41), (1,), (2, 1001)), "large": ((2, 4, 128, 128), (8, 16, 128, 128)),
            "empty": ((0, 4, 8, 8), (2, 0, 3, 3))},
           _ALL_LAYOUTS, ("scale", "per_sample", "scale+rescale", "per_sample+rescale"), _build_cfg_combine),
    OpCase("cfg_step", ("cfg_step", "cfg_step_backward"),
           {"odd": ((3, 5, 37, 41), (5,)), "large": ((2, 4, 128, 128), (4, 16, 128, 128)),
            "empty": ((0, 4, 8, 8), (2, 0, 3, 3))},
           _ALL_LAYOUTS, tuple(_STEPS), _build_cfg_step),
    OpCase("dmd_grad", ("dmd_grad", "dmd_grad_backward"),
           {"odd": ((3, 5, 37, 41), (3,)), "large": ((2, 4, 128, 128), (4, 16, 128, 128)),
            "empty": ((0, 4, 8, 8), (2, 0, 3, 3))},
           _ALL_LAYOUTS, ("velocity", "velocity+per_sample", "epsilon", "epsilon+per_sample"), _build_dmd_grad,
           large_variants=("velocity", "epsilon+per_sample")),
    # bn_stats rejects empty maps by design (no statistics to take).
    OpCase("bn_stats", ("bn_stats", "bn_stats_backward"),
           {"odd": ((5, 3, 13, 17), (2, 7, 5, 9), (33, 7)), "large": ((4, 64, 28, 28), (8, 64, 56, 56))},
           _ALL_LAYOUTS, ("stats",), _build_bn_stats),
    # The cond_index variants' shift/scale gradients go through cond_rows_sum (rows sharing a condition).
    OpCase("adaln_modulate", ("adaln_modulate", "adaln_modulate_backward", "cond_rows_sum"),
           {"odd": ((33, 1025), (5, 63), (1, 1)), "large": ((128, 1024), (2048, 1024)), "empty": ((0, 7),)},
           _ROW_LAYOUTS, ("affine", "none+cond_index", "affine+cond_index"), _build_adaln_modulate),
    OpCase("gated_residual", ("gated_residual", "gated_residual_backward"),
           {"odd": ((33, 1025), (5, 63)), "large": ((128, 1024), (2048, 1024)), "empty": ((0, 9),)},
           _ROW_LAYOUTS, ("per_row", "cond_index"), _build_gated_residual),
    OpCase("diffusion_loss", ("diffusion_loss", "diffusion_loss_backward"),
           {"odd": ((33, 64), (5, 7), (33, 1)), "large": ((2048, 64), (16384, 64)), "empty": ((0, 4),)},
           _ROW_LAYOUTS, ("epsilon+mean", "learned+none", "learned+mean"), _build_diffusion_loss),
    # (B, N, C, R): batch, tokens per sample, token size, replicas; empty = no rows (R = 0).
    OpCase("split_token_prepare", ("split_token_prepare",),
           {"odd": ((3, 5, 7, 2), (4, 1, 1, 1)), "large": ((8, 8, 64, 4), (64, 32, 64, 8)),
            "empty": ((2, 3, 4, 0),)},
           _ROW_LAYOUTS, ("plain", "contraction+mixup"), _build_split_token_prepare),
)
