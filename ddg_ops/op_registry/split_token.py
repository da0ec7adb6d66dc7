"""Registry rows of the split-token family: split_token_prepare, adaln_modulate (with cond_rows_sum,
the gradient of condition rows shared through cond_index), gated_residual, diffusion_loss."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .. import reference, split_token as family
from ..diffusion_schedule import GaussianDiffusionSchedule
from ..testing import make
from .core import (LAYOUTS, ROW_LAYOUTS, BenchRef, Call, GradSample, OpInfo, Sample, as_tuple, bad, fp64_leaves,
                   randn, raw_bad)

ops = torch.ops.ddg


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
                lambda x, shift, scale, weight, bias, cond_index: as_tuple(family.adaln_modulate(
                    x, shift, scale, weight, bias, eps=eps, cond_index=cond_index)),
                lambda x, shift, scale, weight, bias, cond_index: as_tuple(reference.adaln_modulate(
                    x, weight, bias, shift, scale, cond_index, eps)),
                _adaln_x_scale(eps))


def _build_gated_residual(shape, dtype, layout, variant, device) -> Call:
    rows, _ = shape
    ci, cond_rows = _cond_index(rows, device) if variant == "cond_index" else (None, rows)
    (gate,) = _projection_slices(cond_rows, shape[1], dtype, layout, device, 1)
    x, h = (make(shape, dtype, LAYOUTS[layout], i, device) for i in range(2))
    return Call(dict(x=x, gate=gate, h=h, cond_index=ci), ("x", "gate", "h"),
                lambda x, gate, h, cond_index: as_tuple(family.gated_residual(x, gate, h, cond_index=cond_index)),
                lambda x, gate, h, cond_index: as_tuple(reference.gated_residual(x, gate, h, cond_index)))


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
        return as_tuple(family.diffusion_loss(model_output, noise, t, loss_coefs, x0, learned_variance=learned,
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
        return as_tuple(family.split_token_prepare(features, t, noise, sqrt_ab, sqrt_1mab, token_size,
                                                     prototypes=prototypes, contraction=0.9,
                                                     permutation=permutation, mix=0.35))

    def ref(features, noise, prototypes):
        return as_tuple(reference.split_token_prepare(features, prototypes, 0.9, 0.35, permutation, t, noise,
                                                    sqrt_ab, sqrt_1mab, token_size))

    return Call(dict(features=features, noise=noise, prototypes=prototypes), (), run, ref)


# ------------------------------------------------------------------------------ opcheck samples
# noise, x0, timesteps and the tables are constants of every op; split_token_prepare has no
# gradient (its outputs are targets), so it is checked without requires_grad.

def _tables():
    return GaussianDiffusionSchedule.named("cosine")


def _forward_samples(dtype, rg) -> list:
    M, W, U, C = 6, 7, 3, 4
    ci = torch.tensor([0, 2, 1, 2, 0, 0])
    x = randn((M, W), dtype, rg)
    proj_rows, proj_u = torch.randn(M, 11 * W).to(dtype), torch.randn(U, 11 * W).to(dtype)
    shift, scale, gate = (proj_rows[:, i * W:(i + 1) * W].detach().requires_grad_(rg) for i in range(3))
    shift_u, scale_u, gate_u = (proj_u[:, i * W:(i + 1) * W].detach().requires_grad_(rg) for i in range(3))
    weight, bias, h = randn((W,), dtype, rg), randn((W,), dtype, rg), randn((W, M), dtype).t().requires_grad_(rg)
    noise, t = randn((M, C), dtype), torch.tensor([0, 5, 999, 0, 500, 1])
    x0, coefs = randn((M // 2, C), dtype), _tables().loss_coefs()
    samples = [
        ("adaln_affine", "adaln_modulate", (x, weight, bias, shift, scale, None, 1e-6)),
        ("adaln_weight_cond", "adaln_modulate", (x, weight, None, shift_u, scale_u, ci, 1e-5)),
        ("adaln_plain_cond", "adaln_modulate", (x, None, None, shift_u, scale_u, ci, 1e-6)),
        ("gated", "gated_residual", (x, gate, h, None)),
        ("gated_cond", "gated_residual", (x, gate_u, h, ci)),
        ("loss_epsilon", "diffusion_loss", (randn((M, C), dtype, rg), noise, t, None, coefs, False)),
        ("loss_learned", "diffusion_loss", (randn((M, 2 * C), dtype, rg), noise, t, x0, coefs, True)),
        ("cond_rows_sum", "cond_rows_sum", (randn((M, W), dtype, rg), ci, U + 1)),
    ]
    tag = f"{str(dtype)[6:]}-{'grad' if rg else 'nograd'}"
    return [Sample(f"{name}-{tag}", op, args) for name, op, args in samples]


def _prepare_samples(dtype):
    B, N, C, R = 2, 3, 4, 2
    sab, s1m = _tables().noising_tables()
    f, mu, noise = randn((B, N * C), dtype), randn((N * C, B), dtype).t(), randn((B * N * R, C), dtype)
    t = torch.arange(B * N * R) * 97 % 1000
    tag = str(dtype)[6:]
    return [Sample(f"prepare-{tag}", "split_token_prepare",
                   (f, mu, 0.9, torch.tensor([1, 0]), 0.3, t, noise, sab, s1m, C)),
            Sample(f"prepare_plain-{tag}", "split_token_prepare", (f, None, 0.0, None, 1.0, t, noise, sab, s1m, C))]


def _backward_samples(dtype):
    M, W, U, C = 6, 7, 3, 4
    ci = torch.tensor([0, 2, 1, 2, 0, 0])
    go, x, h = randn((M, W), dtype), randn((M, W), dtype), randn((M, W), dtype)
    weight, bias = randn((W,), dtype), randn((W,), dtype)
    scale_u, shift_u, gate_u = randn((U, W), dtype), randn((U, W), dtype), randn((U, W), dtype)
    _, mean, rstd = ops.adaln_modulate(x, weight, bias, shift_u, scale_u, ci, 1e-6)
    _, mean_plain, rstd_plain = ops.adaln_modulate(x, None, None, x, x, None, 1e-6)
    noise, t, x0 = randn((M, C), dtype), torch.tensor([0, 5, 999, 0, 500, 1]), randn((M // 2, C), dtype)
    coefs = _tables().loss_coefs()
    mo_eps, mo_learned = randn((M, C), dtype), randn((M, 2 * C), dtype)
    loss, _ = ops.diffusion_loss(mo_learned, noise, t, x0, coefs, True)
    grad_loss = torch.randn(M, dtype=loss.dtype)
    samples = [
        ("adaln_bw_affine_cond", "adaln_modulate_backward", (go, x, weight, bias, scale_u, ci, mean, rstd)),
        ("adaln_bw_plain", "adaln_modulate_backward", (go, x, None, None, x, None, mean_plain, rstd_plain)),
        ("gated_bw", "gated_residual_backward", (go, h, x, None)),
        ("gated_bw_cond", "gated_residual_backward", (go, gate_u, h, ci)),
        ("loss_bw_epsilon", "diffusion_loss_backward", (grad_loss, mo_eps, noise, t, None, coefs, False)),
        ("loss_bw_learned", "diffusion_loss_backward", (grad_loss, mo_learned, noise, t, x0, coefs, True)),
    ]
    return [Sample(f"{name}-{str(dtype)[6:]}", op, args) for name, op, args in samples]


def _opcheck(schemas: Tuple[str, ...]):
    def samples():
        out = []
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for rg in (False, True):
                out += _forward_samples(dtype, rg)
        for dtype in (torch.float32, torch.float16, torch.float64):
            out += _prepare_samples(dtype) + _backward_samples(dtype)
        return [s for s in out if s.op in schemas]
    return samples


# ------------------------------------------------------------------------------ gradcheck samples

def _cond(cond, M=5):
    """cond_index with U = 4 < M = 5 condition rows (row 3 unused), or per-row operands."""
    return (torch.tensor([0, 2, 0, 1, 2])[:M], 4) if cond else (None, M)


def _gradcheck_adaln():
    M, W = 5, 7
    samples = []
    for affine in ("affine", "weight_only", "none"):
        n_params = 2 if affine == "affine" else 1 if affine == "weight_only" else 0
        for cond in (False, True):
            ci, U = _cond(cond)

            def fn(x_cols, proj, *params, ci=ci):
                weight, bias = (list(params) + [None, None])[:2]
                return family.adaln_modulate(x_cols.t(), proj[:, W:2 * W], proj[:, 2 * W:], weight, bias, eps=1e-5,
                                             cond_index=ci)

            # x is passed transposed (column-major rows); shift/scale are column slices of one projection.
            samples.append(GradSample(f"{affine}-{'cond_index' if cond else 'per_row'}", fn,
                                      lambda U=U, n=n_params: (fp64_leaves(1, (W, M))[0], fp64_leaves(1, (U, 3 * W))[0],
                                                               *fp64_leaves(n, (W,)))))
    ci, U = _cond(True)
    samples.append(GradSample("cond_rows_sum", lambda r: ops.cond_rows_sum(r, ci, U),
                              lambda: tuple(fp64_leaves(1, (5, 6)))))
    return samples


def _gradcheck_gated():
    samples = []
    for cond in (False, True):
        ci, U = _cond(cond)
        samples.append(GradSample(
            "cond_index" if cond else "per_row",
            lambda x, proj, h, ci=ci: family.gated_residual(x, proj[:, 6:12], h, cond_index=ci),
            lambda U=U: (*fp64_leaves(1, (5, 6)), fp64_leaves(1, (U, 18))[0], *fp64_leaves(1, (5, 6)))))
    return samples


def _gradcheck_diffusion_loss():
    """Epsilon prediction w.r.t. eps_hat; learned variance w.r.t. the variance channels v. (With learned
    variance the loss's gradient in eps_hat is by design the MSE's only -- the vb term sees sg(eps_hat) --
    so its numerical derivative in eps_hat is not the op's gradient; tests/ops/test_split_token.py checks
    that part.) At t = 0 the decoder NLL runs with its clamps inactive: |x0 - mu_theta| is within a few
    bins and x0 stays clear of the +-0.999 bin edges (x0 is a constant anyway)."""
    M, C = 6, 5
    coefs = _tables().loss_coefs()
    samples = []
    for reduction in ("mean", "none"):
        noise = torch.randn(M, C, dtype=torch.float64)
        t = torch.tensor([0, 1, 17, 500, 998, 999])
        samples.append(GradSample(
            f"epsilon-{reduction}",
            lambda mo, noise=noise, t=t, r=reduction: family.diffusion_loss(mo, noise, t, coefs, reduction=r).loss,
            lambda noise=noise: ((noise + 0.5 * torch.randn(M, C, dtype=torch.float64)).requires_grad_(),)))
        for name, steps in (("kl", [3, 1, 17, 500, 998, 999]), ("decoder_nll", [0, 0, 0, 0, 0, 0]),
                            ("mixed", [0, 1, 0, 999, 0, 500])):
            noise = torch.randn(M, C, dtype=torch.float64)
            eps_hat = noise + 0.3 * torch.randn(M, C, dtype=torch.float64)
            x0 = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.0], dtype=torch.float64).repeat(M // 2, 1)  # [M0, C]
            t = torch.tensor(steps)

            def fn(v, noise=noise, eps_hat=eps_hat, x0=x0, t=t, r=reduction):
                return family.diffusion_loss(torch.cat([eps_hat, v], 1), noise, t, coefs, x0, reduction=r).loss

            samples.append(GradSample(f"learned_variance-{name}-{reduction}", fn,
                                      lambda: ((0.5 * torch.randn(M, C, dtype=torch.float64)).requires_grad_(),)))
    return samples


# ------------------------------------------------------------------------------ bad inputs

def _bad_operands():
    sched = GaussianDiffusionSchedule.named("cosine")
    sab, s1m = sched.noising_tables()
    return dict(SAB=sab, S1M=s1m, COEFS=sched.loss_coefs(), f=torch.randn(2, 12),  # B = 2, D = 12: N = 3 tokens of C = 4
                t6=torch.arange(6) * 100, eps6=torch.randn(6, 4), rows=torch.randn(5, 7),  # M = 5 rows of W = 7
                ci=torch.tensor([0, 1, 1, 0, 2]))


def _bad_prepare():
    o = _bad_operands()
    SAB, S1M, f, t6, eps6 = o["SAB"], o["S1M"], o["f"], o["t6"], o["eps6"]

    def _prepare(**kw):
        args = dict(features=f, timesteps=t6, noise=eps6, sqrt_alpha_bar=SAB, sqrt_one_minus_alpha_bar=S1M,
                    token_size=4)
        args.update(kw)
        return family.split_token_prepare(**args)

    return [
    bad(lambda: _prepare(features=f.numpy()), TypeError, "split_token_prepare: 'features' must be a torch.Tensor"),
    bad(lambda: _prepare(features=f.long()), TypeError, "split_token_prepare: 'features' must be float32"),
    bad(lambda: _prepare(features=f.reshape(2, 3, 4)), ValueError, "split_token_prepare: 'features' must be 2-D"),
    bad(lambda: _prepare(token_size=0), ValueError, "split_token_prepare: 'token_size' must be a positive int"),
    bad(lambda: _prepare(token_size=4.0), ValueError, "'token_size' must be a positive int"),
    bad(lambda: _prepare(token_size=True), ValueError, "'token_size' must be a positive int"),
    bad(lambda: _prepare(token_size=5), ValueError, "split_token_prepare: the feature dim 12 of 'features' must be a "
                                                 "multiple of token_size=5"),
    bad(lambda: _prepare(timesteps=[0] * 6), TypeError, "split_token_prepare: 'timesteps' must be a torch.Tensor"),
    bad(lambda: _prepare(timesteps=t6.int()), ValueError, "split_token_prepare: 'timesteps' must be a 1-D int64"),
    bad(lambda: _prepare(timesteps=t6[None]), ValueError, "'timesteps' must be a 1-D int64"),
    bad(lambda: _prepare(timesteps=t6.to("meta")), ValueError, "'timesteps' must be a 1-D int64 tensor on cpu"),
    bad(lambda: _prepare(timesteps=t6[:5], noise=eps6[:5]), ValueError,
     r"split_token_prepare: len\(timesteps\)=5 must be a positive multiple of B\*N = 2\*3"),
    bad(lambda: _prepare(features=f[:0], timesteps=t6[:0], noise=eps6[:0]), ValueError, r"multiple of B\*N = 0\*3"),
    bad(lambda: _prepare(noise=eps6.double()), TypeError, "split_token_prepare: 'noise' must have dtype"),
    bad(lambda: _prepare(noise=eps6[:, :3]), ValueError, r"split_token_prepare: 'noise' must have shape \(6, 4\)"),
    bad(lambda: _prepare(noise=eps6.to("meta")), ValueError, "split_token_prepare: 'noise' must be on cpu"),
    bad(lambda: _prepare(noise=eps6.reshape(-1)), ValueError, "'noise' must be 2-D"),
    bad(lambda: _prepare(sqrt_alpha_bar=SAB[None]), ValueError, "split_token_prepare: 'sqrt_alpha_bar' must be 1-D"),
    bad(lambda: _prepare(sqrt_alpha_bar=SAB.long()), TypeError, "'sqrt_alpha_bar' must be float32"),
    bad(lambda: _prepare(sqrt_one_minus_alpha_bar=S1M[:10]), ValueError,
     r"split_token_prepare: 'sqrt_one_minus_alpha_bar' must have shape \(1000,\)"),
    bad(lambda: _prepare(sqrt_one_minus_alpha_bar=S1M.to("meta")), ValueError, "'sqrt_one_minus_alpha_bar' must be on"),
    bad(lambda: _prepare(contraction="0.9"), TypeError, "split_token_prepare: 'contraction' must be a number"),
    bad(lambda: _prepare(contraction=float("nan")), ValueError, "split_token_prepare: 'contraction' must be finite"),
    bad(lambda: _prepare(mix=float("inf")), ValueError, "split_token_prepare: 'mix' must be finite"),
    bad(lambda: _prepare(mix=torch.tensor(0.5)), TypeError, "'mix' must be a number"),
    bad(lambda: _prepare(prototypes=torch.randn(2, 8)), ValueError,
     r"split_token_prepare: 'prototypes' must have shape \(2, 12\)"),
    bad(lambda: _prepare(prototypes=f.half()), TypeError, "split_token_prepare: 'prototypes' must have dtype"),
    bad(lambda: _prepare(permutation=torch.tensor([1, 0, 2])), ValueError,
     r"split_token_prepare: 'permutation' must be an int64 tensor of shape \[2\]"),
    bad(lambda: _prepare(permutation=torch.tensor([1, 0], dtype=torch.int32)), ValueError,
     "'permutation' must be an int64"),
    bad(lambda: _prepare(permutation=torch.tensor([1, 0], device="meta")), ValueError, "'permutation' must be on"),
    bad(lambda: _prepare(features=f.clone().requires_grad_()), ValueError,
     "split_token_prepare: 'features' is treated as a constant"),
    bad(lambda: _prepare(noise=eps6.clone().requires_grad_()), ValueError, "'noise' is treated as a constant"),
    bad(lambda: _prepare(prototypes=f.clone().requires_grad_()), ValueError, "'prototypes' is treated as a constant"),
    raw_bad(lambda: ops.split_token_prepare(f, None, 0.0, None, 1.0, t6, eps6[:, :3], SAB, S1M, 4),
     r"ddg\.split_token_prepare: .*'noise'"),
    raw_bad(lambda: ops.split_token_prepare(f, torch.randn(2, 8), 0.9, None, 1.0, t6, eps6, SAB, S1M, 4),
     r"ddg\.split_token_prepare: .*'prototypes'"),
    raw_bad(lambda: ops.split_token_prepare(f, None, 0.0, torch.tensor([0, 1, 2]), 0.5, t6, eps6, SAB, S1M, 4),
     r"ddg\.split_token_prepare: .*'permutation'"),
    raw_bad(lambda: ops.split_token_prepare(f, None, 0.0, None, 1.0, t6.int(), eps6, SAB, S1M, 4),
     r"ddg\.split_token_prepare: .*'timesteps'"),
    raw_bad(lambda: ops.split_token_prepare(f, None, 0.0, None, 1.0, t6 + 500, eps6, SAB, S1M, 4),
                 r"ddg\.split_token_prepare: 'timesteps' .*out of range",
            device_assert=("prepare_kernel", "step >= 0 && step < p.steps")),
    raw_bad(lambda: ops.split_token_prepare(f, None, 0.0, torch.tensor([0, -1]), 0.5, t6, eps6, SAB, S1M, 4),
                 r"ddg\.split_token_prepare: 'permutation' .*out of range",
            device_assert=("prepare_kernel", "partner >= 0 && partner < p.batch")),
    ]


def _bad_adaln():
    o = _bad_operands()
    rows, ci = o["rows"], o["ci"]
    return [
    bad(lambda: family.adaln_modulate(rows[None], rows, rows), ValueError, "adaln_modulate: 'x' must be 2-D"),
    bad(lambda: family.adaln_modulate(rows.long(), rows, rows), TypeError, "adaln_modulate: 'x' must be float32"),
    bad(lambda: family.adaln_modulate(rows, rows.half(), rows), TypeError, "adaln_modulate: 'shift' must have dtype"),
    bad(lambda: family.adaln_modulate(rows, rows, rows.to("meta")), ValueError, "adaln_modulate: 'scale' must be on"),
    bad(lambda: family.adaln_modulate(rows, rows[:4], rows), ValueError,
     r"adaln_modulate: 'shift' must be \[5, 7\] like 'x', got \(4, 7\)"),
    bad(lambda: family.adaln_modulate(rows, rows, rows[:, :6]), ValueError, r"adaln_modulate: 'scale' must be \[5, 7\]"),
    bad(lambda: family.adaln_modulate(rows, rows, rows[0]), ValueError, "adaln_modulate: 'scale' must be 2-D"),
    bad(lambda: family.adaln_modulate(rows, rows[:3, :6], rows[:3], cond_index=ci), ValueError,
     r"adaln_modulate: 'shift' must be \[U, 7\] rows picked by 'cond_index'"),
    bad(lambda: family.adaln_modulate(rows, rows[:3], rows[:3], cond_index=ci.int()), ValueError,
     r"adaln_modulate: 'cond_index' must be an int64 tensor of shape \[5\]"),
    bad(lambda: family.adaln_modulate(rows, rows[:3], rows[:3], cond_index=ci[:4]), ValueError,
     r"'cond_index' must be an int64 tensor of shape \[5\]"),
    bad(lambda: family.adaln_modulate(rows, rows[:3], rows[:3], cond_index=ci.tolist()), TypeError,
     "adaln_modulate: 'cond_index' must be a torch.Tensor"),
    bad(lambda: family.adaln_modulate(rows, rows[:3], rows[:3], cond_index=ci.to("meta")), ValueError,
     "adaln_modulate: 'cond_index' must be on cpu"),
    bad(lambda: family.adaln_modulate(rows, rows, rows, torch.ones(6)), ValueError,
     r"adaln_modulate: 'weight' must have shape \(7,\)"),
    bad(lambda: family.adaln_modulate(rows, rows, rows, torch.ones(7), torch.zeros(7).double()), TypeError,
     "adaln_modulate: 'bias' must have dtype"),
    bad(lambda: family.adaln_modulate(rows, rows, rows, torch.ones(1, 7)), ValueError, "'weight' must be 1-D"),
    bad(lambda: family.adaln_modulate(rows, rows, rows, eps=0.0), ValueError, "adaln_modulate: 'eps' must be positive"),
    bad(lambda: family.adaln_modulate(rows, rows, rows, eps=float("nan")), ValueError, "'eps' must be finite"),
    bad(lambda: family.adaln_modulate(rows, rows, rows, eps="1e-6"), TypeError, "adaln_modulate: 'eps' must be a number"),
    raw_bad(lambda: ops.adaln_modulate(rows, None, None, rows[:4], rows, None, 1e-6), r"ddg\.adaln_modulate: .*'shift'"),
    raw_bad(lambda: ops.adaln_modulate(rows, torch.ones(7).double(), None, rows, rows, None, 1e-6),
     r"ddg\.adaln_modulate: .*'weight'"),
    raw_bad(lambda: ops.adaln_modulate(rows, None, None, rows[:3], rows[:3], ci.int(), 1e-6),
     r"ddg\.adaln_modulate: .*'cond_index'"),
    raw_bad(lambda: ops.adaln_modulate_backward(rows, rows, None, None, rows, None, torch.zeros(4), torch.ones(4)),
     r"ddg\.adaln_modulate_backward: .*'(mean|rstd)'"),
    raw_bad(lambda: ops.adaln_modulate(rows, None, None, rows[:2], rows[:2], ci, 1e-6),
                 r"ddg(\.adaln_modulate)?: 'cond_index' .*out of range",
            device_assert=("modulate_kernel", "ci >= 0 && ci < cond_rows")),
    raw_bad(lambda: ops.cond_rows_sum(rows, ci, 2), r"ddg\.cond_rows_sum: 'cond_index' has values outside \[0, 2\)",
            device_assert=("segment_column_sum_kernel", "offsets[0] == 0 && offsets[segments] == rows")),
    raw_bad(lambda: ops.cond_rows_sum(rows, ci.int(), 3), r"ddg\.cond_rows_sum: 'cond_index' must be an int64 tensor"),
    raw_bad(lambda: ops.cond_rows_sum(rows[0], ci, 3), r"ddg\.cond_rows_sum: 'rows' must be 2-D"),
    raw_bad(lambda: ops.cond_rows_sum(rows, ci, 0), r"ddg\.cond_rows_sum: 'cond_rows' is 0"),
    ]


def _bad_gated():
    o = _bad_operands()
    rows, ci = o["rows"], o["ci"]
    return [
    bad(lambda: family.gated_residual(rows, rows, rows[:4]), ValueError,
     r"gated_residual: 'h' must have shape \(5, 7\) \(like 'x'\)"),
    bad(lambda: family.gated_residual(rows, rows, rows.double()), TypeError, "gated_residual: 'h' must have dtype"),
    bad(lambda: family.gated_residual(rows.int(), rows, rows), TypeError, "gated_residual: 'x' must be float32"),
    bad(lambda: family.gated_residual(rows, rows[:3], rows), ValueError, r"gated_residual: 'gate' must be \[5, 7\]"),
    bad(lambda: family.gated_residual(rows, rows.bfloat16(), rows), TypeError, "gated_residual: 'gate' must have dtype"),
    bad(lambda: family.gated_residual(rows, rows[:3, :2], rows, cond_index=ci), ValueError,
     r"gated_residual: 'gate' must be \[U, 7\] rows picked by 'cond_index'"),
    bad(lambda: family.gated_residual(rows, rows[:3], rows, cond_index=ci[None]), ValueError,
     "gated_residual: 'cond_index' must be an int64 tensor"),
    raw_bad(lambda: ops.gated_residual(rows, rows, rows[:, :6], None), r"ddg\.gated_residual: .*'h'"),
    raw_bad(lambda: ops.gated_residual(rows, rows[:3, :6], rows, ci), r"ddg\.gated_residual: .*'gate'"),
    raw_bad(lambda: ops.gated_residual_backward(rows, rows.double(), rows, None), r"ddg\.gated_residual_backward: .*'gate'"),
    raw_bad(lambda: ops.gated_residual(rows, rows[:2], rows, ci),
                 r"ddg(\.gated_residual)?: 'cond_index' .*out of range",
            device_assert=("gated_kernel", "ci >= 0 && ci < cond_rows")),
    ]


def _bad_loss():
    o = _bad_operands()
    COEFS, t6, eps6 = o["COEFS"], o["t6"], o["eps6"]

    def _loss(**kw):
        args = dict(model_output=torch.randn(6, 8), noise=eps6, timesteps=t6, loss_coefs=COEFS, x0=torch.randn(3, 4))
        args.update(kw)
        return family.diffusion_loss(**args)

    return [
    bad(lambda: _loss(noise=eps6[0]), ValueError, "diffusion_loss: 'noise' must be 2-D"),
    bad(lambda: _loss(noise=eps6.long()), TypeError, "diffusion_loss: 'noise' must be float32"),
    bad(lambda: _loss(model_output=torch.randn(6, 8).double()), TypeError,
     "diffusion_loss: 'model_output' must have dtype"),
    bad(lambda: _loss(model_output=torch.randn(6, 8, device="meta")), ValueError, "'model_output' must be on cpu"),
    bad(lambda: _loss(model_output=torch.randn(6, 5)), ValueError,
     r"diffusion_loss: 'model_output' must have shape \(6, 4\) \(eps_hat per row\)"),
    bad(lambda: _loss(model_output=torch.randn(6, 4), learned_variance=True), ValueError,
     r"diffusion_loss: 'model_output' must have shape \(6, 8\) \(\[eps_hat, v\] per row\)"),
    bad(lambda: _loss(model_output=torch.randn(5, 8)), ValueError, r"'model_output' must have shape \(6, 8\)"),
    bad(lambda: _loss(timesteps=t6[:5]), ValueError,
     r"diffusion_loss: 'timesteps' must be an int64 tensor of shape \[6\]"),
    bad(lambda: _loss(timesteps=t6.float()), ValueError, "diffusion_loss: 'timesteps' must be an int64"),
    bad(lambda: _loss(timesteps=t6.to("meta")), ValueError, "diffusion_loss: 'timesteps' must be on cpu"),
    bad(lambda: _loss(loss_coefs=COEFS[:, :2]), ValueError, r"diffusion_loss: 'loss_coefs' must be \[T, 3\]"),
    bad(lambda: _loss(loss_coefs=COEFS[:0]), ValueError, r"'loss_coefs' must be \[T, 3\]"),
    bad(lambda: _loss(loss_coefs=COEFS[:, 0]), ValueError, "diffusion_loss: 'loss_coefs' must be 2-D"),
    bad(lambda: _loss(loss_coefs=COEFS.long()), TypeError, "diffusion_loss: 'loss_coefs' must be float32"),
    bad(lambda: _loss(loss_coefs=COEFS.to("meta")), ValueError, "diffusion_loss: 'loss_coefs' must be on cpu"),
    bad(lambda: _loss(x0=None), ValueError, "diffusion_loss: learned_variance needs 'x0'"),
    bad(lambda: _loss(x0=torch.randn(4, 4)), ValueError, r"diffusion_loss: 'x0' must be \[M0, 4\] with M = 6 a multiple"),
    bad(lambda: _loss(x0=torch.randn(3, 5)), ValueError, r"'x0' must be \[M0, 4\]"),
    bad(lambda: _loss(x0=torch.randn(0, 4)), ValueError, r"'x0' must be \[M0, 4\]"),
    bad(lambda: _loss(x0=torch.randn(3, 4).half()), TypeError, "diffusion_loss: 'x0' must have dtype"),
    bad(lambda: _loss(x0=torch.randn(3)), ValueError, "diffusion_loss: 'x0' must be 2-D"),
    bad(lambda: _loss(reduction="sum"), ValueError, "diffusion_loss: 'reduction' must be 'mean' or 'none'"),
    bad(lambda: _loss(noise=eps6.clone().requires_grad_()), ValueError,
     "diffusion_loss: 'noise' is treated as a constant"),
    bad(lambda: _loss(x0=torch.randn(3, 4, requires_grad=True)), ValueError, "diffusion_loss: 'x0' is treated as"),
    raw_bad(lambda: ops.diffusion_loss(torch.randn(6, 8), eps6, t6, None, COEFS[:, :2], True),
     r"ddg\.diffusion_loss: .*'(loss_coefs|x0)'"),
    raw_bad(lambda: ops.diffusion_loss(torch.randn(6, 8), eps6, t6, torch.randn(3, 4), COEFS[:, :2], True),
     r"ddg\.diffusion_loss: .*'loss_coefs'"),
    raw_bad(lambda: ops.diffusion_loss(torch.randn(6, 5), eps6, t6, None, COEFS, False),
     r"ddg\.diffusion_loss: .*'model_output'"),
    raw_bad(lambda: ops.diffusion_loss_backward(torch.ones(5), torch.randn(6, 4), eps6, t6, None, COEFS, False),
     r"ddg\.diffusion_loss_backward: .*'grad_loss'"),
    raw_bad(lambda: ops.diffusion_loss(torch.randn(6, 8), eps6, t6 - 1, torch.randn(3, 4), COEFS, True),
                 r"ddg\.diffusion_loss: 'timesteps' .*out of range",
            device_assert=("loss_kernel", "step >= 0 && step < a.steps")),
    ]


# ------------------------------------------------------------------------------ the rows

_ADALN = ("adaln_modulate", "adaln_modulate_backward", "cond_rows_sum")
_GATED = ("gated_residual", "gated_residual_backward")
_LOSS = ("diffusion_loss", "diffusion_loss_backward")

ROWS = (
    # The cond_index variants' shift/scale gradients go through cond_rows_sum (rows sharing a condition).
    OpInfo("adaln_modulate", "split_token", _ADALN, family.adaln_modulate, reference.adaln_modulate,
           {"odd": ((33, 1025), (5, 63), (1, 1)), "large": ((128, 1024), (2048, 1024)), "empty": ((0, 7),)},
           ROW_LAYOUTS, ("affine", "none+cond_index", "affine+cond_index"), _build_adaln_modulate,
           _opcheck(_ADALN), _gradcheck_adaln, _bad_adaln, BenchRef("split_token", ("adaln_modulate",))),
    OpInfo("gated_residual", "split_token", _GATED, family.gated_residual, reference.gated_residual,
           {"odd": ((33, 1025), (5, 63)), "large": ((128, 1024), (2048, 1024)), "empty": ((0, 9),)},
           ROW_LAYOUTS, ("per_row", "cond_index"), _build_gated_residual, _opcheck(_GATED), _gradcheck_gated,
           _bad_gated, BenchRef("split_token", ("gated_residual",))),
    OpInfo("diffusion_loss", "split_token", _LOSS, family.diffusion_loss, reference.diffusion_loss,
           {"odd": ((33, 64), (5, 7), (33, 1)), "large": ((2048, 64), (16384, 64)), "empty": ((0, 4),)},
           ROW_LAYOUTS, ("epsilon+mean", "learned+none", "learned+mean"), _build_diffusion_loss, _opcheck(_LOSS),
           _gradcheck_diffusion_loss, _bad_loss, BenchRef("split_token", ("diffusion_loss_learned",))),
    # (B, N, C, R): batch, tokens per sample, token size, replicas; empty = no rows (R = 0).
    OpInfo("split_token_prepare", "split_token", ("split_token_prepare",), family.split_token_prepare,
           reference.split_token_prepare,
           {"odd": ((3, 5, 7, 2), (4, 1, 1, 1)), "large": ((8, 8, 64, 4), (64, 32, 64, 8)), "empty": ((2, 3, 4, 0),)},
           ROW_LAYOUTS, ("plain", "contraction+mixup"), _build_split_token_prepare, _opcheck(("split_token_prepare",)),
           lambda: (), _bad_prepare, BenchRef("split_token", ("split_token_prepare",)),
           no_gradcheck="its outputs are diffusion targets, constants without a gradient (autograd raises)"),
)
