"""The split-token ops (GenDD's diffusion head, docs/methods/gendd.md §2.8 and §3) against the reference.

The functional API (the kernel path when the extension is loaded) is compared with the
pure-PyTorch reference evaluated in fp64 on the same (already rounded) inputs, forward and
backward with a random grad_output on every differentiable input. The semantics the
reference encodes (token split, replica tiling, x_t, cond_index, the stop-gradient on the
mean, the t = 0 decoder NLL) are checked by hand as well. The last section runs the CUDA kernels
(on a GPU, or on CPU tensors under the CUDA emulator). Opcheck, gradcheck, compile, bad inputs and
the kernel-vs-reference grid come from the op registry (ddg_ops/op_registry/split_token.py).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import ddg_ops
from ddg_ops import GaussianDiffusionSchedule, reference
from ddg_ops.testing import leaves
from tests._utils import DTYPES, KERNEL_DEVICE, assert_close, emulator_size_limit, magnitude

T = 1000
SCHEDULE = GaussianDiffusionSchedule.named("cosine", T)
LOSS_COEFS = SCHEDULE.loss_coefs()
SQRT_AB, SQRT_1MAB = SCHEDULE.noising_tables()

# W = 1, 7, 63, 1023, 4096, 1025 (odd, prime-ish, one past the vector width) against M = 1, 5, 33.
ROWS_WIDTHS = [(1, 1), (5, 1), (33, 7), (1, 63), (5, 63), (33, 1023), (1, 4096), (33, 4096), (5, 1025), (33, 1025)]
AFFINE = ["affine", "weight_only", "none"]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ helpers

def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _compare(fn, ref_fn, inputs, differentiable, msg="", grad_scales=None):
    """fn(**inputs) against ref_fn(**fp64 copies): every output, and the gradients w.r.t. every
    differentiable input for a random grad_output on every differentiable output. Tolerances are
    those of each result's dtype, atol scaled by the magnitude of the expected values, or by
    grad_scales(fp64 inputs, grad_outputs)[name] where a gradient is a cancellation of larger terms."""
    got_in, ref_in = leaves(inputs, differentiable, False), leaves(inputs, differentiable, True)
    got, ref = _as_list(fn(**got_in)), _as_list(ref_fn(**ref_in))
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape, f"{msg} output {i}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert_close(g, r, g.dtype, scale=magnitude(r), msg=f"{msg} output {i}")
    names = [n for n in differentiable if got_in.get(n) is not None]
    pairs = [(g, r) for g, r in zip(got, ref) if r.requires_grad]
    assert [g.requires_grad for g, _ in pairs] == [True] * len(pairs), f"{msg}: output lost its grad_fn"
    if not names or not pairs or all(g.numel() == 0 for g, _ in pairs):
        return got, ref
    grad_outs = [torch.randn(g.shape, dtype=torch.float64).to(g.dtype) for g, _ in pairs]
    g_got = torch.autograd.grad([g for g, _ in pairs], [got_in[n] for n in names], grad_outs, allow_unused=True)
    g_ref = torch.autograd.grad([r for _, r in pairs], [ref_in[n] for n in names],
                                [go.double() for go in grad_outs], allow_unused=True)
    extra = grad_scales(ref_in, [go.double() for go in grad_outs]) if grad_scales else {}
    for name, a, b in zip(names, g_got, g_ref):
        if b is None:
            assert a is None or not a.any(), f"{msg} grad {name}: expected none"
            continue
        assert a is not None, f"{msg} grad {name}: missing"
        assert a.shape == got_in[name].shape and a.dtype == got_in[name].dtype, f"{msg} grad {name}"
        assert_close(a, b, a.dtype, scale=max(magnitude(b), extra.get(name, 0.0)), msg=f"{msg} grad {name}")
    return got, ref


def _adaln_projection(rows, W, dtype, scale=0.7):
    """shift, scale, gate as column slices of one adaLN projection [rows, 11 W] (row stride 11 W,
    nonzero storage offset), as the concatenated adaLN GEMM of the head gives them."""
    proj = (torch.randn(rows, 11 * W) * scale).to(dtype)
    return proj[:, 3 * W:4 * W], proj[:, 4 * W:5 * W], proj[:, 5 * W:6 * W]


def _rows(M, W, dtype, layout="contiguous", offset=0.5, spread=2.0):
    if layout == "transposed":  # dense, column-major
        return (torch.randn(W, M) * spread + offset).to(dtype).t()
    if layout == "sliced":  # non-dense: every other column, storage offset 1
        return (torch.randn(M, 2 * W + 1) * spread + offset).to(dtype)[:, 1::2]
    return (torch.randn(M, W) * spread + offset).to(dtype)


def _cond_index(M):
    """U < M condition rows (for M > 1); the last condition row is never used (its grads are 0)."""
    U = M // 3 + 2
    return torch.randint(0, U - 1, (M,)), U


def _affine_params(W, dtype, affine):
    weight = (torch.randn(W) * 0.5 + 1.0).to(dtype) if affine in ("affine", "weight_only") else None
    bias = (torch.randn(W) * 0.3).to(dtype) if affine == "affine" else None
    return weight, bias


def _adaln_inputs(M, W, dtype, affine, cond, layout="contiguous"):
    ci, U = _cond_index(M) if cond else (None, M)
    shift, scale, _ = _adaln_projection(U, W, dtype) if layout != "contiguous" else \
        [(torch.randn(U, W) * 0.7).to(dtype) for _ in range(3)]
    weight, bias = _affine_params(W, dtype, affine)
    return dict(x=_rows(M, W, dtype, layout), shift=shift, scale=scale, weight=weight, bias=bias, cond_index=ci)


def _adaln(eps=1e-6):
    return lambda x, shift, scale, weight, bias, cond_index: ddg_ops.adaln_modulate(
        x, shift, scale, weight, bias, eps=eps, cond_index=cond_index)


def _adaln_ref(eps=1e-6):
    return lambda x, shift, scale, weight, bias, cond_index: reference.adaln_modulate(
        x, weight, bias, shift, scale, cond_index, eps)


ADALN_GRADS = ("x", "shift", "scale", "weight", "bias")


def _adaln_grad_scales(eps=1e-6):
    """d/dx of a LayerNorm row is rstd * (g - mean(g) - xhat mean(g xhat)), g = grad_out (1 + scale) w:
    its rounding error scales with rstd * |g|, which a row of (nearly) zero variance -- W = 1 --
    makes up to 1 / sqrt(eps) times larger than the (exactly zero) result."""
    def fn(ref_in, grad_outs):
        x = ref_in["x"].detach()
        rstd = (x.var(1, correction=0, keepdim=True) + eps).rsqrt()
        scale, ci, weight = ref_in["scale"].detach(), ref_in["cond_index"], ref_in["weight"]
        g = grad_outs[0] * (1 + (scale if ci is None else scale[ci]))
        if weight is not None:
            g = g * weight.detach()
        return {"x": float((rstd * g.abs()).max()) if g.numel() else 0.0}
    return fn


# ------------------------------------------------------------------------------ adaln_modulate

@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("M,W", ROWS_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_modulate_matches_fp64_reference(dtype, M, W, affine, cond):
    inputs = _adaln_inputs(M, W, dtype, affine, cond, layout="column_slices")
    (out,), _ = _compare(_adaln(), _adaln_ref(), inputs, ADALN_GRADS, msg="adaln_modulate",
                         grad_scales=_adaln_grad_scales())
    assert out.dtype == dtype and out.shape == (M, W)


@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("W", [7, 1025])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_modulate_strided_inputs(dtype, W, layout, cond):
    """x transposed or sliced; shift/scale column slices of a [U, 11 W] projection."""
    inputs = _adaln_inputs(33, W, dtype, "affine", cond, layout=layout)
    if layout != "contiguous":
        assert not inputs["x"].is_contiguous() and not inputs["shift"].is_contiguous()
    _compare(_adaln(), _adaln_ref(), inputs, ADALN_GRADS, msg=f"adaln_modulate {layout}",
             grad_scales=_adaln_grad_scales())


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_adaln_modulate_eps_is_used(eps):
    """Rows of tiny variance: the LayerNorm's eps changes the result; it must reach the kernel."""
    x = 1e-3 * torch.randn(5, 63)  # var ~ 1e-6: eps 1e-6 halves rstd^2, eps 1e-2 dominates
    shift, scale, _ = _adaln_projection(5, 63, torch.float32)
    inputs = dict(x=x, shift=shift, scale=scale, weight=None, bias=None, cond_index=None)
    (out,), _ = _compare(_adaln(eps), _adaln_ref(eps), inputs, ADALN_GRADS, grad_scales=_adaln_grad_scales(eps))
    other = ddg_ops.adaln_modulate(x, shift, scale, eps=1e-2 if eps == 1e-6 else 1e-6)
    assert (out - other).abs().max() > 0.1


@pytest.mark.parametrize("affine", AFFINE)
def test_adaln_modulate_equals_layer_norm_by_hand(affine):
    """LN(x) * (1 + scale) + shift with torch's LayerNorm (independent of the reference)."""
    x = _rows(33, 1025, torch.float64, "transposed")
    weight, bias = _affine_params(1025, torch.float64, affine)
    ci, U = _cond_index(33)
    shift, scale, _ = _adaln_projection(U, 1025, torch.float64)
    out = ddg_ops.adaln_modulate(x, shift, scale, weight, bias, cond_index=ci)
    expected = F.layer_norm(x, (1025,), weight, bias, eps=1e-6) * (1 + scale[ci]) + shift[ci]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adaln_modulate_cond_index_gradients_by_hand(dtype):
    """cond_index rows: the output equals the materialized rows; d/d shift is a segment-sum of
    grad_output, d/d scale a segment-sum of grad_output * LN(x); unused rows get zero."""
    M, W = 33, 63
    ci, U = _cond_index(M)
    x = _rows(M, W, dtype)
    shift_u, scale_u, _ = (t.detach().requires_grad_() for t in _adaln_projection(U, W, dtype))
    weight, bias = (p.requires_grad_() for p in _affine_params(W, dtype, "affine"))
    out = ddg_ops.adaln_modulate(x, shift_u, scale_u, weight, bias, cond_index=ci)
    rows = ddg_ops.adaln_modulate(x, shift_u[ci].detach(), scale_u[ci].detach(), weight.detach(), bias.detach())
    assert_close(out, rows, dtype, scale=magnitude(rows))
    grad_out = torch.randn(M, W, dtype=dtype)
    g_shift, g_scale, g_weight, g_bias = torch.autograd.grad(out, (shift_u, scale_u, weight, bias), grad_out)
    xhat = F.layer_norm(x.double(), (W,), eps=1e-6)
    y = xhat * weight.detach().double() + bias.detach().double()
    go = grad_out.double()
    exp_shift = torch.zeros(U, W, dtype=torch.float64).index_add_(0, ci, go)
    exp_scale = torch.zeros(U, W, dtype=torch.float64).index_add_(0, ci, go * y)
    exp_weight = (go * (1 + scale_u.detach().double()[ci]) * xhat).sum(0)
    exp_bias = (go * (1 + scale_u.detach().double()[ci])).sum(0)
    for name, got, exp in [("shift", g_shift, exp_shift), ("scale", g_scale, exp_scale),
                           ("weight", g_weight, exp_weight), ("bias", g_bias, exp_bias)]:
        assert_close(got, exp, dtype, scale=magnitude(exp), msg=name)
    assert not g_shift[U - 1].any() and not g_scale[U - 1].any()


@pytest.mark.parametrize("W", [1023, 4097])
@pytest.mark.parametrize("seed", range(20))
def test_adaln_modulate_large_offset_keeps_small_variance(seed, W):
    """Rows of mean 100 and std 0.01 in fp32: a plain fp32 sum of the row rounds at the magnitude of
    the sum and misplaces the mean by a good part of the std, and a one-pass E[x^2] - E[x]^2 loses
    every digit of the variance. With the mean taken from shifted sums only its final rounding to
    fp32 remains: |mean error| <= ulp(100) / 2 = 3.8e-6, i.e. <= 3.8e-4 / (std / 0.01) in x-hat,
    times |1 + scale| <= ~4 here, inside atol 2e-3 for every seed (a lucky seed is not enough)."""
    gen = torch.Generator().manual_seed(seed)
    x = (100.0 + 0.01 * torch.randn(5, W, dtype=torch.float64, generator=gen)).float()
    proj = (torch.randn(5, 3 * W, generator=gen) * 0.7)
    shift, scale = proj[:, W:2 * W], proj[:, 2 * W:]
    out = ddg_ops.adaln_modulate(x, shift, scale)
    expected = reference.adaln_modulate(x.double(), None, None, shift.double(), scale.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=1e-3)
    naive_var = x.square().mean(1) - x.mean(1).square()
    assert ((naive_var.double() - x.double().var(1, correction=0)).abs() > 1e-5).any()  # the trap is real


@pytest.mark.filterwarnings("ignore:var_mean.*degrees of freedom")  # the reference's var_mean of no rows
@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_modulate_empty_rows(dtype, cond):
    W = 7
    x = torch.randn(0, W).to(dtype).requires_grad_()
    ci = torch.zeros(0, dtype=torch.long) if cond else None
    U = 3 if cond else 0
    shift, scale = (torch.randn(U, W).to(dtype).requires_grad_() for _ in range(2))
    weight, bias = (p.requires_grad_() for p in _affine_params(W, dtype, "affine"))
    out = ddg_ops.adaln_modulate(x, shift, scale, weight, bias, cond_index=ci)
    assert out.shape == (0, W) and out.dtype == dtype
    grads = torch.autograd.grad(out.sum(), (x, shift, scale, weight, bias), allow_unused=True)
    for g, t in zip(grads, (x, shift, scale, weight, bias)):
        assert g is None or (g.shape == t.shape and not g.any())


# ------------------------------------------------------------------------------ gated_residual

def _gated(x, gate, h, cond_index):
    return ddg_ops.gated_residual(x, gate, h, cond_index=cond_index)


def _gated_ref(x, gate, h, cond_index):
    return reference.gated_residual(x, gate, h, cond_index)


@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("M,W", ROWS_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_matches_fp64_reference(dtype, M, W, cond):
    ci, U = _cond_index(M) if cond else (None, M)
    _, _, gate = _adaln_projection(U, W, dtype)
    inputs = dict(x=_rows(M, W, dtype), gate=gate, h=_rows(M, W, dtype, offset=0.0), cond_index=ci)
    (out,), _ = _compare(_gated, _gated_ref, inputs, ("x", "gate", "h"), msg="gated_residual")
    assert out.dtype == dtype and out.shape == (M, W)


@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_strided_inputs(dtype, layout, cond):
    M, W = 33, 1025
    ci, U = _cond_index(M) if cond else (None, M)
    _, _, gate = _adaln_projection(U, W, dtype)
    h_layout = {"contiguous": "contiguous", "transposed": "sliced", "sliced": "transposed"}[layout]
    inputs = dict(x=_rows(M, W, dtype, layout), gate=gate, h=_rows(M, W, dtype, h_layout), cond_index=ci)
    _compare(_gated, _gated_ref, inputs, ("x", "gate", "h"), msg=f"gated_residual {layout}")


def test_gated_residual_by_hand():
    M, W = 5, 7
    ci, U = _cond_index(M)
    x, h = torch.randn(M, W, dtype=torch.float64), torch.randn(M, W, dtype=torch.float64)
    gate = torch.randn(U, W, dtype=torch.float64, requires_grad=True)
    out = ddg_ops.gated_residual(x, gate, h, cond_index=ci)
    torch.testing.assert_close(out, x + gate.detach()[ci] * h, atol=1e-14, rtol=1e-14)
    grad_out = torch.randn(M, W, dtype=torch.float64)
    (g_gate,) = torch.autograd.grad(out, gate, grad_out)
    torch.testing.assert_close(g_gate, torch.zeros(U, W, dtype=torch.float64).index_add_(0, ci, grad_out * h))
    assert not g_gate[U - 1].any()
    zero = ddg_ops.gated_residual(x, torch.zeros(U, W, dtype=torch.float64), h, cond_index=ci)
    assert torch.equal(zero, x)  # zero-initialized gates: every block is the identity


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_empty_rows(dtype):
    x, h = (torch.randn(0, 9).to(dtype).requires_grad_() for _ in range(2))
    gate = torch.randn(4, 9).to(dtype).requires_grad_()
    out = ddg_ops.gated_residual(x, gate, h, cond_index=torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 9) and out.dtype == dtype
    g = torch.autograd.grad(out.sum(), gate, allow_unused=True)[0]
    assert g is None or (g.shape == (4, 9) and not g.any())
    assert ddg_ops.gated_residual(x, gate[:0], h).shape == (0, 9)


# ------------------------------------------------------------------------------ diffusion_loss

def _timesteps(M, mode):
    if mode == "zero":
        return torch.zeros(M, dtype=torch.long)
    if mode == "last":
        return torch.full((M,), T - 1, dtype=torch.long)
    t = torch.randint(0, T, (M,))
    t[0] = 0
    t[-1] = T - 1
    if M > 3:
        t[1:3] = torch.tensor([1, T // 2])
    return t


def _targets(M0, C, dtype):
    """Clean targets both inside [-1, 1] and beyond +-0.999 (the end bins of the decoder NLL)."""
    x0 = torch.randn(M0, C, dtype=torch.float64) * 1.5
    special = torch.tensor([0.9995, -0.9995, 0.5, -0.5, 2.0, -2.0, 0.0], dtype=torch.float64)
    flat = x0.view(-1)
    flat[:min(flat.numel(), special.numel())] = special[:flat.numel()]
    return x0.to(dtype)


def _loss_inputs(M, C, dtype, learned, tmode, replicas=1):
    noise = torch.randn(M, C).to(dtype)
    eps_hat = noise.float() + 0.5 * torch.randn(M, C)
    parts = [eps_hat] + ([torch.randn(M, C) * 0.7] if learned else [])
    return dict(model_output=torch.cat(parts, 1).to(dtype), noise=noise, timesteps=_timesteps(M, tmode),
                loss_coefs=LOSS_COEFS, x0=_targets(max(M // replicas, 1), C, dtype) if learned else None)


def _loss(learned, reduction):
    def fn(model_output, noise, timesteps, loss_coefs, x0):
        return tuple(ddg_ops.diffusion_loss(model_output, noise, timesteps, loss_coefs, x0,
                                            learned_variance=learned, reduction=reduction))
    return fn


def _loss_ref(learned, reduction):
    def fn(model_output, noise, timesteps, loss_coefs, x0):
        loss, mse = reference.diffusion_loss(model_output, noise, timesteps, x0, loss_coefs, learned)
        return (loss.mean(), mse.mean()) if reduction == "mean" else (loss, mse)
    return fn


@pytest.mark.parametrize("tmode,reduction", [("mixed", "mean"), ("mixed", "none"), ("zero", "none"), ("last", "mean")])
@pytest.mark.parametrize("learned", [False, True], ids=["epsilon", "learned_variance"])
@pytest.mark.parametrize("M,C", [(1, 64), (5, 64), (33, 64), (5, 7), (33, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_loss_matches_fp64_reference(dtype, M, C, learned, tmode, reduction):
    replicas = 3 if M % 3 == 0 else 1
    inputs = _loss_inputs(M, C, dtype, learned, tmode, replicas)
    (loss, mse), _ = _compare(_loss(learned, reduction), _loss_ref(learned, reduction), inputs,
                              ("model_output",), msg="diffusion_loss")
    acc = _acc(dtype)
    assert loss.dtype == acc and mse.dtype == acc and not mse.requires_grad
    assert loss.shape == mse.shape == (() if reduction == "mean" else (M,))
    if not learned:
        assert torch.equal(loss.detach(), mse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diffusion_loss_epsilon_by_hand(dtype):
    inputs = _loss_inputs(33, 64, dtype, False, "mixed")
    mo = inputs["model_output"].requires_grad_()
    out = ddg_ops.diffusion_loss(mo, inputs["noise"], inputs["timesteps"], LOSS_COEFS, reduction="none")
    diff = mo.detach().double() - inputs["noise"].double()
    assert_close(out.loss, diff.square().mean(1), dtype)
    grad_out = torch.randn(33, dtype=out.loss.dtype)
    (g,) = torch.autograd.grad(out.loss, mo, grad_out)
    assert_close(g, 2 * diff / 64 * grad_out.double()[:, None], dtype)
    mean = ddg_ops.diffusion_loss(mo, inputs["noise"], inputs["timesteps"], LOSS_COEFS)
    assert_close(mean.loss, diff.square().mean(), dtype)
    (g,) = torch.autograd.grad(mean.loss * 2.5, mo)
    assert_close(g, 2 * diff / (64 * 33) * 2.5, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_loss_stop_gradient_on_the_mean(dtype):
    """Learned variance: d loss / d eps_hat is the MSE's gradient alone (the vb term sees
    sg(eps_hat)); d loss / d v is nonzero."""
    M, C = 33, 64
    inputs = _loss_inputs(M, C, dtype, True, "mixed", replicas=3)
    mo = inputs["model_output"].requires_grad_()
    eps_only = inputs["model_output"][:, :C].detach().requires_grad_()
    out = ddg_ops.diffusion_loss(mo, inputs["noise"], inputs["timesteps"], LOSS_COEFS, inputs["x0"], reduction="none")
    mse = ddg_ops.diffusion_loss(eps_only, inputs["noise"], inputs["timesteps"], LOSS_COEFS, reduction="none")
    grad_out = torch.randn(M, dtype=out.loss.dtype)
    (g,) = torch.autograd.grad(out.loss, mo, grad_out)
    (g_mse,) = torch.autograd.grad(mse.loss, eps_only, grad_out)
    assert_close(g[:, :C], g_mse, dtype, scale=magnitude(g_mse))
    assert g[:, C:].abs().sum() > 0
    assert_close(out.mse, mse.mse, _acc(dtype))
    assert (out.loss.detach() > out.mse).any()  # vb > 0 somewhere


def test_diffusion_loss_x0_rows_are_tiled_replica_outer():
    """Row r of M reads x0[r % M0]: a short x0 equals its explicit R-fold repeat."""
    M, C, R = 30, 8, 3
    inputs = _loss_inputs(M, C, torch.float32, True, "zero", replicas=R)
    x0 = inputs["x0"]
    assert x0.shape == (M // R, C)
    args = (inputs["model_output"], inputs["noise"], inputs["timesteps"], LOSS_COEFS)
    short = ddg_ops.diffusion_loss(*args, x0, reduction="none")
    tiled = ddg_ops.diffusion_loss(*args, x0.repeat(R, 1), reduction="none")
    torch.testing.assert_close(short.loss, tiled.loss, atol=0, rtol=0)
    other = ddg_ops.diffusion_loss(*args, x0.repeat_interleave(R, 0), reduction="none")
    assert not torch.allclose(other.loss, short.loss)  # the mapping matters at t = 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_loss_decoder_nll_clamps_at_t0(dtype):
    """At t = 0 with |x0 - mu_theta| far beyond a bin, every bin probability is below 1e-12 in
    any precision: the NLL is -log(1e-12) / ln 2 per element and d loss / d v is 0."""
    M, C = 6, 5
    noise = torch.randn(M, C).to(dtype)
    x0 = torch.tensor([0.3, 0.9995, -0.9995, 1.5, -1.5, 0.0], dtype=torch.float64)[:, None].expand(M, C)
    # d = mean_coef(0) (eps_hat - eps) has the sign that pushes each end bin away too.
    sign = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0])[:, None]
    mo = torch.cat([noise.float() + 40.0 * sign, torch.full((M, C), 0.3)], 1).to(dtype).requires_grad_()
    out = ddg_ops.diffusion_loss(mo, noise, torch.zeros(M, dtype=torch.long), LOSS_COEFS, x0.to(dtype),
                                 reduction="none")
    diff = mo.detach()[:, :C].double() - noise.double()
    expected = diff.square().mean(1) - math.log(1e-12) / math.log(2.0)
    assert_close(out.loss, expected, _acc(dtype), scale=magnitude(expected))
    (g,) = torch.autograd.grad(out.loss, mo, torch.linspace(0.5, 2.0, M, dtype=out.loss.dtype))
    assert not g[:, C:].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_loss_empty_rows(dtype):
    mo = torch.randn(0, 8).to(dtype).requires_grad_()
    out = ddg_ops.diffusion_loss(mo, torch.randn(0, 4).to(dtype), torch.zeros(0, dtype=torch.long), LOSS_COEFS,
                                 torch.randn(2, 4).to(dtype), reduction="none")
    assert out.loss.shape == out.mse.shape == (0,) and out.loss.dtype == _acc(dtype)
    g = torch.autograd.grad(out.loss.sum(), mo, allow_unused=True)[0]
    assert g is None or g.shape == (0, 8)


def test_diffusion_loss_learned_variance_is_inferred_from_the_width():
    inputs = _loss_inputs(6, 4, torch.float32, True, "mixed")
    args = (inputs["model_output"], inputs["noise"], inputs["timesteps"], LOSS_COEFS, inputs["x0"])
    assert torch.equal(ddg_ops.diffusion_loss(*args).loss, ddg_ops.diffusion_loss(*args, learned_variance=True).loss)
    eps = ddg_ops.diffusion_loss(inputs["model_output"][:, :4], *args[1:4])
    torch.testing.assert_close(eps.loss, ddg_ops.diffusion_loss(*args).mse)


# ------------------------------------------------------------------------------ split_token_prepare

def _prepare_by_hand(features, prototypes, contraction, permutation, mix, timesteps, noise, C):
    """GenDD's target path written out element by element in fp64 (docs/methods/gendd.md §2.4-2.8)."""
    f = features.double()
    B, D = f.shape
    N = D // C
    x0 = f.clone()
    if prototypes is not None:
        x0 = (1 - contraction) * f + contraction * prototypes.double()
    if permutation is not None:
        x0 = torch.stack([mix * x0[b] + (1 - mix) * x0[int(permutation[b])] for b in range(B)]) if B else x0
    tokens = torch.empty(B * N, C, dtype=torch.float64)
    for b in range(B):
        for k in range(N):
            tokens[b * N + k] = x0[b, k * C:(k + 1) * C]  # token k = dims [kC, kC + C)
    M = timesteps.shape[0]
    x_t = torch.empty(M, C, dtype=torch.float64)
    ab = SCHEDULE.alphas_cumprod
    for r in range(M):
        b, k = (r % (B * N)) // N, r % N  # replica-outer tiling
        t = int(timesteps[r])
        x_t[r] = ab[t].sqrt() * x0[b, k * C:(k + 1) * C] + (1 - ab[t]).sqrt() * noise[r].double()
    return x_t, tokens


def _prepare_inputs(B, N, C, R, dtype, prototypes, permutation, layout="contiguous"):
    D = N * C
    features = _rows(B, D, dtype, "transposed" if layout == "strided" else "contiguous", offset=0.2, spread=1.0)
    M = B * N * R
    noise = _rows(M, C, dtype, "sliced" if layout == "strided" else "contiguous", offset=0.0, spread=1.0)
    t = _timesteps(M, "mixed") if M else torch.zeros(0, dtype=torch.long)
    return dict(features=features, timesteps=t, noise=noise, sqrt_alpha_bar=SQRT_AB,
                sqrt_one_minus_alpha_bar=SQRT_1MAB, token_size=C,
                prototypes=_rows(B, D, dtype, "sliced" if layout == "strided" else "contiguous")
                if prototypes else None,
                contraction=0.9, permutation=torch.randperm(B) if permutation else None, mix=0.35)


def _prepare_ref(features, timesteps, noise, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, token_size, prototypes,
                 contraction, permutation, mix):
    return reference.split_token_prepare(features, prototypes, contraction, mix, permutation, timesteps, noise,
                                         sqrt_alpha_bar, sqrt_one_minus_alpha_bar, token_size)


PREPARE_SHAPES = [(1, 1, 64, 1), (2, 2, 64, 3), (3, 5, 7, 2), (4, 1, 1, 1), (2, 3, 1, 5), (5, 8, 64, 2)]


@pytest.mark.parametrize("permutation", [False, True], ids=["no_mixup", "mixup"])
@pytest.mark.parametrize("prototypes", [False, True], ids=["no_contraction", "contraction"])
@pytest.mark.parametrize("B,N,C,R", PREPARE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_token_prepare_matches_reference_and_hand(dtype, B, N, C, R, prototypes, permutation):
    inputs = _prepare_inputs(B, N, C, R, dtype, prototypes, permutation)
    (x_t, tokens), _ = _compare(lambda **kw: ddg_ops.split_token_prepare(**kw), _prepare_ref, inputs, (),
                                msg="split_token_prepare")
    assert x_t.dtype == tokens.dtype == dtype and x_t.shape == (B * N * R, C) and tokens.shape == (B * N, C)
    hand_xt, hand_tokens = _prepare_by_hand(inputs["features"], inputs["prototypes"], 0.9, inputs["permutation"],
                                            0.35, inputs["timesteps"], inputs["noise"], C)
    assert_close(tokens, hand_tokens, dtype, scale=magnitude(hand_tokens), msg="x0 tokens by hand")
    # x_t by hand uses the fp64 schedule, the op its fp32 tables: fp32 tolerance at best.
    assert_close(x_t, hand_xt, dtype if dtype != torch.float64 else torch.float32, scale=magnitude(hand_xt),
                 msg="x_t by hand")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_token_prepare_strided_inputs(dtype):
    inputs = _prepare_inputs(3, 4, 16, 2, dtype, True, True, layout="strided")
    assert not inputs["features"].is_contiguous() and not inputs["noise"].is_contiguous()
    _compare(lambda **kw: ddg_ops.split_token_prepare(**kw), _prepare_ref, inputs, (), msg="strided")


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_token_prepare_identities(dtype):
    """Without prototypes and permutation, x0 is the features split into tokens, exactly, whatever
    contraction and mix are; contraction 1 gives the prototypes; mix 1 ignores the partner."""
    B, N, C, R = 3, 4, 8, 2
    inputs = _prepare_inputs(B, N, C, R, dtype, False, False)
    f = inputs["features"]
    _, tokens = ddg_ops.split_token_prepare(**{**inputs, "contraction": 0.7, "mix": 0.2})
    assert torch.equal(tokens, f.reshape(B * N, C))
    mu = torch.randn(B, N * C).to(dtype)
    _, tokens = ddg_ops.split_token_prepare(**{**inputs, "prototypes": mu, "contraction": 1.0})
    assert_close(tokens, mu.reshape(B * N, C), dtype)
    _, tokens = ddg_ops.split_token_prepare(**{**inputs, "permutation": torch.tensor([2, 0, 1]), "mix": 1.0})
    assert_close(tokens, f.reshape(B * N, C), dtype)
    # t = 0 rows are almost x0; t = T-1 rows are almost pure noise (cosine schedule).
    t = torch.tensor([0] * (B * N) + [T - 1] * (B * N))
    x_t, tokens = ddg_ops.split_token_prepare(**{**inputs, "timesteps": t})
    assert_close(x_t[:B * N], tokens.double() * SQRT_AB[0].double() + inputs["noise"][:B * N].double() *
                 SQRT_1MAB[0].double(), dtype, scale=magnitude(tokens))
    assert (x_t[B * N:].double() - inputs["noise"][B * N:].double()).abs().max() < 1e-2


def test_split_token_rows_map():
    b, k = ddg_ops.split_token_rows(2, 3, 2)
    assert b.tolist() == [0, 0, 0, 1, 1, 1] * 2 and k.tolist() == [0, 1, 2] * 4
    # x_t row r is built from token (b_r, k_r).
    inputs = _prepare_inputs(2, 3, 4, 2, torch.float64, True, True)
    inputs["timesteps"] = torch.zeros(12, dtype=torch.long)
    inputs["noise"] = torch.zeros(12, 4, dtype=torch.float64)
    x_t, tokens = ddg_ops.split_token_prepare(**inputs)
    torch.testing.assert_close(x_t, tokens[b * 3 + k] * SQRT_AB[0].double())


def test_split_token_prepare_no_rows():
    inputs = _prepare_inputs(2, 3, 4, 0, torch.float32, True, True)
    assert inputs["timesteps"].shape == (0,)
    x_t, tokens = ddg_ops.split_token_prepare(**inputs)
    assert x_t.shape == (0, 4) and tokens.shape == (6, 4)


# ------------------------------------------------------------------------------ raw ops

@pytest.mark.requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_raw_adaln_modulate_saves_row_statistics(dtype):
    """The forward op's mean and rstd are the rows' mean and 1 / sqrt(var + eps)."""
    x = _rows(5, 63, dtype)
    shift, scale, _ = _adaln_projection(5, 63, dtype)
    out, mean, rstd = torch.ops.ddg.adaln_modulate(x, None, None, shift, scale, None, 1e-5)
    xd = x.double()
    var, m = torch.var_mean(xd, dim=1, correction=0)
    tol = _acc(dtype)
    assert mean.numel() == rstd.numel() == 5
    assert_close(mean.reshape(5).double(), m, tol, scale=magnitude(m))
    assert_close(rstd.reshape(5).double(), (var + 1e-5).rsqrt(), tol, scale=magnitude((var + 1e-5).rsqrt()))


@pytest.mark.requires_ext
@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_raw_backward_ops_by_hand(dtype, cond):
    M, W, C = 9, 33, 8
    ci, U = _cond_index(M) if cond else (None, M)
    x = _rows(M, W, dtype)
    shift, scale, gate = _adaln_projection(U, W, dtype)
    weight, bias = _affine_params(W, dtype, "affine")
    go = torch.randn(M, W, dtype=dtype)
    tol = dtype
    _, mean, rstd = torch.ops.ddg.adaln_modulate(x, weight, bias, shift, scale, ci, 1e-6)
    gx, gw, gb, g_scale_rows = torch.ops.ddg.adaln_modulate_backward(go, x, weight, bias, scale, ci, mean, rstd)
    x64 = x.double().requires_grad_()
    w64, b64, s64 = (t.double().requires_grad_() for t in (weight, bias, scale))
    y = F.layer_norm(x64, (W,), w64, b64, eps=1e-6)
    rows = s64 if ci is None else s64[ci]
    out = y * (1 + rows) + shift.double()[ci if ci is not None else slice(None)]
    ex, ew, eb = torch.autograd.grad(out, (x64, w64, b64), go.double())
    for name, got, exp in [("grad_x", gx, ex), ("grad_weight", gw, ew), ("grad_bias", gb, eb),
                           ("grad_scale_rows", g_scale_rows, go.double() * y.detach())]:
        assert got.shape == exp.shape, name
        assert_close(got.double(), exp, tol, scale=magnitude(exp), msg=name)
    h = _rows(M, W, dtype)
    grad_h, grad_gate_rows = torch.ops.ddg.gated_residual_backward(go, gate, h, ci)
    gate_rows = gate if ci is None else gate[ci]
    assert_close(grad_h, (go * gate_rows).to(dtype), tol)
    assert_close(grad_gate_rows.double(), go.double() * h.double(), tol)
    inputs = _loss_inputs(M, C, dtype, True, "mixed", replicas=3)
    args = (inputs["model_output"], inputs["noise"], inputs["timesteps"], inputs["x0"], LOSS_COEFS, True)
    loss, _ = torch.ops.ddg.diffusion_loss(*args)
    grad_loss = torch.randn(M, dtype=loss.dtype)
    g_mo = torch.ops.ddg.diffusion_loss_backward(grad_loss, *args)
    mo64 = inputs["model_output"].double().requires_grad_()
    ref_loss, _ = reference.diffusion_loss(mo64, inputs["noise"].double(), inputs["timesteps"],
                                           inputs["x0"].double(), LOSS_COEFS, True)
    (expected,) = torch.autograd.grad(ref_loss, mo64, grad_loss.double())
    assert g_mo.shape == (M, 2 * C)
    assert_close(g_mo.double(), expected, tol, scale=magnitude(expected))


# ------------------------------------------------------------------------------ condition-row sums

@pytest.mark.requires_ext
@pytest.mark.parametrize("M,W,U", [(1, 1, 1), (33, 7, 13), (5, 1025, 7), (2000, 63, 3), (0, 5, 4), (4, 0, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cond_rows_sum_matches_reference(dtype, M, W, U):
    """Rows summed per condition (unused conditions give zero rows); sliced rows are read as values."""
    rows = _rows(M, W, dtype, "sliced" if M and W else "contiguous")
    ci = torch.randint(0, max(U - 1, 1), (M,))
    got = torch.ops.ddg.cond_rows_sum(rows, ci, U)
    expected = reference.cond_rows_sum(rows.double(), ci, U)
    assert got.shape == (U, W) and got.dtype == dtype
    assert_close(got, expected, dtype, scale=magnitude(expected) * max(1.0, math.sqrt(M / U)))
    if U > 1 and M:
        assert not got[U - 1].any()


@pytest.mark.requires_ext
def test_shared_condition_gradients_are_deterministic():
    """4096 rows share 3 conditions (a segment of ~1365 rows each): the gradients of shift, scale
    and gate, summed per condition, have the same bits on every run (no atomics: the summation order
    is fixed) and match the fp64 reference."""
    M, W, U = 4096, 63, 3
    torch.manual_seed(0)
    ci = torch.randint(0, U, (M,))
    x, h = _rows(M, W, torch.float32), _rows(M, W, torch.float32)
    proj = torch.randn(U, 3 * W)
    weight, bias = _affine_params(W, torch.float32, "affine")
    grad_out = torch.randn(M, W)

    def grads(dtype):
        p = proj.to(dtype).requires_grad_()
        w, b = weight.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()
        fn = ddg_ops if dtype == torch.float32 else reference
        if fn is ddg_ops:
            out = ddg_ops.adaln_modulate(x, p[:, :W], p[:, W:2 * W], w, b, cond_index=ci)
            out = ddg_ops.gated_residual(out, p[:, 2 * W:], h, cond_index=ci)
        else:
            out = reference.adaln_modulate(x.double(), w, b, p[:, :W], p[:, W:2 * W], ci)
            out = reference.gated_residual(out, p[:, 2 * W:], h.double(), ci)
        return torch.autograd.grad(out, (p, w, b), grad_out.to(dtype))

    first, second = grads(torch.float32), grads(torch.float32)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for name, got, exp in zip(("proj", "weight", "bias"), first, grads(torch.float64)):
        assert_close(got, exp, torch.float32, scale=magnitude(exp), msg=name)


@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
def test_adaln_modulate_rows_wider_than_a_panel(cond):
    """W = 16411 is wider than the CUDA backward keeps in registers (8192 columns): the row is taken
    panel by panel; the results must not change."""
    inputs = _adaln_inputs(3, 16411, torch.float32, "affine", cond, layout="column_slices")
    _compare(_adaln(), _adaln_ref(), inputs, ADALN_GRADS, msg="adaln_modulate wide",
             grad_scales=_adaln_grad_scales())


# ----------------------------------------------- CUDA kernels (a GPU or the CUDA emulator)
# CUDA kernels of the split-token ops against the reference on the CPU in fp64 (on a GPU, or on CPU
# tensors under the CUDA emulator, DDG_CUDA_EMULATOR): odd and realistic sizes (W = 4096, M = 20480
# rows), cond_index, strided operands (column slices of the adaLN projection at unaligned offsets),
# every dtype including bf16.

DEVICE = KERNEL_DEVICE or "cuda"


def _on(t, dtype=None):
    """A CPU-generated tensor on the device (values independent of the device)."""
    return t.to(dtype or t.dtype).to(DEVICE)


def _cuda_rows(M, W, dtype, layout="contiguous", offset=0.5, spread=2.0):
    """Views are taken on the device: moving a strided CPU view would make it contiguous."""
    if layout == "transposed":
        return _on(torch.randn(W, M) * spread + offset, dtype).t()
    if layout == "sliced":
        return _on(torch.randn(M, 2 * W + 1) * spread + offset, dtype)[:, 1::2]
    return _on(torch.randn(M, W) * spread + offset, dtype)


def _projection(rows, W, dtype):
    proj = _on(torch.randn(rows, 11 * W) * 0.7, dtype)
    return proj[:, 3 * W:4 * W], proj[:, 4 * W:5 * W], proj[:, 5 * W:6 * W]


def _cuda_cond_index(M):
    U = M // 3 + 2
    return _on(torch.randint(0, U - 1, (M,))), U


def _check(fn, ref_fn, inputs, differentiable, msg="", grad_scales=None):
    """fn on the device inputs against ref_fn on fp64 CPU copies: outputs, and gradients for a
    random grad_output w.r.t. every differentiable input (atol scaled by the expected magnitude,
    or by grad_scales(fp64 inputs, grad_outputs)[name] for a cancellation of larger terms)."""
    got_in, ref_in = {}, {}
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor):
            r = v.detach().cpu()
            if v.is_floating_point():
                v, r = v.detach(), r.to(torch.float64, copy=True)
                if name in differentiable:
                    v.requires_grad_()
                    r.requires_grad_()
            got_in[name], ref_in[name] = v, r
        else:
            got_in[name] = ref_in[name] = v
    got, ref = fn(**got_in), ref_fn(**ref_in)
    got, ref = (list(o) if isinstance(o, (tuple, list)) else [o] for o in (got, ref))
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.device.type == DEVICE and g.shape == r.shape, f"{msg} output {i}"
        assert_close(g.cpu(), r, g.dtype, scale=magnitude(r), msg=f"{msg} output {i}")
    names = [n for n in differentiable if got_in.get(n) is not None]
    pairs = [(g, r) for g, r in zip(got, ref) if r.requires_grad and r.numel()]
    if not names or not pairs:
        return got
    grad_outs = [torch.randn(r.shape, dtype=torch.float64) for _, r in pairs]
    g_got = torch.autograd.grad([g for g, _ in pairs], [got_in[n] for n in names],
                                [_on(go, g.dtype) for go, (g, _) in zip(grad_outs, pairs)], allow_unused=True)
    g_ref = torch.autograd.grad([r for _, r in pairs], [ref_in[n] for n in names],
                                [go.to(g.dtype).double() for go, (g, _) in zip(grad_outs, pairs)], allow_unused=True)
    extra = grad_scales(ref_in, [go.to(g.dtype).double() for go, (g, _) in zip(grad_outs, pairs)]) \
        if grad_scales else {}
    for name, a, b in zip(names, g_got, g_ref):
        if b is None:
            assert a is None or not a.any(), f"{msg} grad {name}"
            continue
        assert a is not None and a.dtype == got_in[name].dtype, f"{msg} grad {name}"
        assert_close(a.cpu(), b, a.dtype, scale=max(magnitude(b), extra.get(name, 0.0)), msg=f"{msg} grad {name}")
    return got


CUDA_ROWS_WIDTHS = [(1, 1), (33, 7), (5, 1023), (33, 1025), (64, 4096), (5120, 1024)]


def _adaln_x_grad_scale(ref_in, grad_outs, eps=1e-6):
    """d/dx of a LayerNorm row rounds like rstd * |grad_out (1 + scale) w|, which exceeds the result
    by up to 1 / sqrt(eps) in a row of (nearly) zero variance (W = 1)."""
    x, scale, ci, weight = ref_in["x"].detach(), ref_in["scale"].detach(), ref_in["cond_index"], ref_in["weight"]
    rstd = (x.var(1, correction=0, keepdim=True) + eps).rsqrt()
    g = grad_outs[0] * (1 + (scale if ci is None else scale[ci]))
    if weight is not None:
        g = g * weight.detach()
    return {"x": float((rstd * g.abs()).max())}


@pytest.mark.requires_ext
@pytest.mark.cuda_kernels
@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("affine", ["affine", "weight_only", "none"])
@pytest.mark.parametrize("M,W", CUDA_ROWS_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_modulate_cuda(dtype, M, W, affine, cond):
    emulator_size_limit(dtype, M * W)
    ci, U = _cuda_cond_index(M) if cond else (None, M)
    shift, scale, _ = _projection(U, W, dtype)
    weight = _on(torch.randn(W) * 0.5 + 1, dtype) if affine != "none" else None
    bias = _on(torch.randn(W) * 0.3, dtype) if affine == "affine" else None
    inputs = dict(x=_cuda_rows(M, W, dtype, "transposed" if M % 2 else "contiguous"), shift=shift, scale=scale,
                  weight=weight, bias=bias, cond_index=ci)
    _check(lambda x, shift, scale, weight, bias, cond_index:
           ddg_ops.adaln_modulate(x, shift, scale, weight, bias, cond_index=cond_index),
           lambda x, shift, scale, weight, bias, cond_index:
           reference.adaln_modulate(x, weight, bias, shift, scale, cond_index, 1e-6),
           inputs, ("x", "shift", "scale", "weight", "bias"), msg="adaln_modulate", grad_scales=_adaln_x_grad_scale)


@pytest.mark.requires_ext
@pytest.mark.cuda_kernels
@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("M,W", CUDA_ROWS_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_cuda(dtype, M, W, cond):
    emulator_size_limit(dtype, M * W)
    ci, U = _cuda_cond_index(M) if cond else (None, M)
    _, _, gate = _projection(U, W, dtype)
    inputs = dict(x=_cuda_rows(M, W, dtype), gate=gate, h=_cuda_rows(M, W, dtype, "sliced", offset=0.0), cond_index=ci)
    _check(lambda x, gate, h, cond_index: ddg_ops.gated_residual(x, gate, h, cond_index=cond_index),
           lambda x, gate, h, cond_index: reference.gated_residual(x, gate, h, cond_index),
           inputs, ("x", "gate", "h"), msg="gated_residual")


def _cuda_timesteps(M):
    t = torch.randint(0, T, (M,))
    t[:: 7] = 0
    t[-1] = T - 1
    return t


@pytest.mark.requires_ext
@pytest.mark.cuda_kernels
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("learned", [False, True], ids=["epsilon", "learned_variance"])
@pytest.mark.parametrize("M,C", [(1, 64), (33, 7), (30, 64), (20480, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_loss_cuda(dtype, M, C, learned, reduction):
    emulator_size_limit(dtype, M * C * (2 if learned else 1))
    noise = torch.randn(M, C)
    parts = [noise + 0.5 * torch.randn(M, C)] + ([torch.randn(M, C) * 0.7] if learned else [])
    M0 = M // 10 if M % 10 == 0 else M
    x0 = torch.randn(M0, C) * 1.5
    x0.view(-1)[:2] = torch.tensor([0.9995, -0.9995])[:x0.numel()]
    inputs = dict(model_output=_on(torch.cat(parts, 1), dtype), noise=_on(noise, dtype), timesteps=_on(_cuda_timesteps(M)),
                  loss_coefs=_on(SCHEDULE.loss_coefs()), x0=_on(x0, dtype) if learned else None)

    def fn(model_output, noise, timesteps, loss_coefs, x0):
        return tuple(ddg_ops.diffusion_loss(model_output, noise, timesteps, loss_coefs, x0, learned_variance=learned,
                                            reduction=reduction))

    def ref_fn(model_output, noise, timesteps, loss_coefs, x0):
        loss, mse = reference.diffusion_loss(model_output, noise, timesteps, x0, loss_coefs, learned)
        return (loss.mean(), mse.mean()) if reduction == "mean" else (loss, mse)

    loss, mse = _check(fn, ref_fn, inputs, ("model_output",), msg="diffusion_loss")
    assert loss.dtype == mse.dtype == _acc(dtype)


@pytest.mark.requires_ext
@pytest.mark.cuda_kernels
@pytest.mark.parametrize("mixup", [False, True])
@pytest.mark.parametrize("B,N,C,R", [(1, 1, 64, 1), (3, 5, 7, 2), (64, 8, 64, 10), (64, 32, 64, 10)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_token_prepare_cuda(dtype, B, N, C, R, mixup):
    M = B * N * R
    emulator_size_limit(dtype, (B * N + M) * C)
    sab, s1m = SCHEDULE.noising_tables(DEVICE)
    inputs = dict(features=_cuda_rows(B, N * C, dtype, "transposed", 0.2, 1.0), timesteps=_on(_cuda_timesteps(M)),
                  noise=_cuda_rows(M, C, dtype, "sliced", 0.0, 1.0), sqrt_alpha_bar=sab, sqrt_one_minus_alpha_bar=s1m,
                  token_size=C, prototypes=_cuda_rows(B, N * C, dtype) if mixup else None, contraction=0.9,
                  permutation=_on(torch.randperm(B)) if mixup else None, mix=0.35)

    def ref_fn(features, timesteps, noise, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, token_size, prototypes,
               contraction, permutation, mix):
        return reference.split_token_prepare(features, prototypes, contraction, mix, permutation, timesteps, noise,
                                             sqrt_alpha_bar, sqrt_one_minus_alpha_bar, token_size)

    x_t, tokens = _check(lambda **kw: ddg_ops.split_token_prepare(**kw), ref_fn, inputs, (), msg="prepare")
    assert x_t.shape == (M, C) and tokens.shape == (B * N, C) and x_t.dtype == dtype


@pytest.mark.requires_ext
@pytest.mark.cuda_kernels
@pytest.mark.requires_cuda
def test_cuda_matches_cpu_kernels():
    """The same fp32 inputs through the CPU and the CUDA kernels (no reference in between)."""
    M, W, C = 96, 1024, 64
    ci = torch.arange(M) % 32
    x, h = torch.randn(M, W), torch.randn(M, W)
    proj = torch.randn(32, 11 * W) * 0.5
    w, b = torch.rand(W) + 0.5, torch.randn(W) * 0.1
    t = _cuda_timesteps(M)
    noise = torch.randn(M, C)
    mo = torch.cat([noise + 0.5 * torch.randn(M, C), torch.randn(M, C) * 0.7], 1)
    x0 = torch.randn(M // 3, C)
    coefs = SCHEDULE.loss_coefs()

    def run(device):
        d = lambda v: v.to(device)  # noqa: E731
        pj = d(proj)
        a = ddg_ops.adaln_modulate(d(x), pj[:, :W], pj[:, W:2 * W], d(w), d(b), cond_index=d(ci))
        g = ddg_ops.gated_residual(d(x), pj[:, 2 * W:3 * W], d(h), cond_index=d(ci))
        loss = ddg_ops.diffusion_loss(d(mo), d(noise), d(t), d(coefs), d(x0), reduction="none")
        return a.cpu(), g.cpu(), loss.loss.cpu()

    for name, a, b in zip(["adaln", "gated", "loss"], run("cpu"), run(DEVICE)):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.requires_ext
@pytest.mark.cuda_kernels
@pytest.mark.parametrize("W", [1023, 4097])
def test_adaln_modulate_large_offset_cuda(W):
    """Rows of mean 100, std 0.01 in fp32, 20 seeds: the CUDA kernel's mean comes from shifted sums
    (test_split_token.py's test of the same name explains the bound)."""
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        x = (100.0 + 0.01 * torch.randn(5, W, dtype=torch.float64, generator=gen)).float()
        proj = torch.randn(5, 3 * W, generator=gen) * 0.7
        shift, scale = proj[:, W:2 * W], proj[:, 2 * W:]
        out = ddg_ops.adaln_modulate(_on(x), _on(shift), _on(scale)).cpu()
        expected = reference.adaln_modulate(x.double(), None, None, shift.double(), scale.double())
        torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=1e-3, msg=f"seed {seed}")


@pytest.mark.requires_ext
@pytest.mark.cuda_kernels
def test_shared_condition_gradients_are_deterministic_cuda():
    """20480 rows sharing 3 conditions: the summed gradients of shift/scale/gate have the same bits
    on every run (a fixed summation order, no atomics) and match the fp64 reference."""
    M, W, U = 20480, 1024, 3
    ci = _on(torch.randint(0, U, (M,)))
    x, h, grad_out = _cuda_rows(M, W, torch.float32), _cuda_rows(M, W, torch.float32), _on(torch.randn(M, W))

    def grads():
        proj = _on(torch.randn(U, 3 * W, generator=torch.Generator().manual_seed(1))).requires_grad_()
        out = ddg_ops.adaln_modulate(x, proj[:, :W], proj[:, W:2 * W], cond_index=ci)
        out = ddg_ops.gated_residual(out, proj[:, 2 * W:], h, cond_index=ci)
        return torch.autograd.grad(out, proj, grad_out)[0], proj.detach()

    first, proj = grads()
    assert torch.equal(first, grads()[0])
    p64 = proj.cpu().double().requires_grad_()
    ref = reference.adaln_modulate(x.cpu().double(), None, None, p64[:, :W], p64[:, W:2 * W], ci.cpu())
    ref = reference.gated_residual(ref, p64[:, 2 * W:], h.cpu().double(), ci.cpu())
    (expected,) = torch.autograd.grad(ref, p64, grad_out.cpu().double())
    assert_close(first.cpu(), expected, torch.float32, scale=magnitude(expected) * 10)


@pytest.mark.requires_ext
@pytest.mark.cuda_kernels
def test_opcheck_cuda():
    ops = torch.ops.ddg
    M, W, C = 6, 40, 8
    ci = _on(torch.tensor([0, 2, 1, 2, 0, 0]))
    x = _on(torch.randn(M, W)).requires_grad_()
    proj = _on(torch.randn(3, 11 * W))
    shift, scale, gate = (proj[:, i * W:(i + 1) * W].detach().requires_grad_() for i in range(3))
    weight, bias = _on(torch.rand(W) + 0.5).requires_grad_(), _on(torch.randn(W)).requires_grad_()
    torch.library.opcheck(ops.adaln_modulate.default, (x, weight, bias, shift, scale, ci, 1e-6))
    torch.library.opcheck(ops.gated_residual.default, (x, gate, _on(torch.randn(M, W)), ci))
    noise, t, coefs = _on(torch.randn(M, C)), _on(torch.tensor([0, 1, 500, 999, 0, 3])), _on(SCHEDULE.loss_coefs())
    mo = _on(torch.randn(M, 2 * C)).requires_grad_()
    torch.library.opcheck(ops.diffusion_loss.default, (mo, noise, t, _on(torch.randn(3, C)), coefs, True))
    sab, s1m = SCHEDULE.noising_tables(DEVICE)
    torch.library.opcheck(ops.split_token_prepare.default,
                          (_on(torch.randn(2, 3 * C)), _on(torch.randn(2, 3 * C)), 0.9, _on(torch.tensor([1, 0])),
                           0.3, _on(torch.arange(12) * 83 % 1000), _on(torch.randn(12, C)), sab, s1m, C))


@pytest.mark.requires_ext
@pytest.mark.cuda_kernels
@pytest.mark.requires_cuda
def test_compile_reduce_overhead_with_linear_upstream():
    """CUDA graphs replay on the current stream: launches must not use the default stream."""
    torch._dynamo.reset()
    W, C, M = 256, 16, 64
    lin_in, lin_ada = torch.nn.Linear(C, W).to(DEVICE), torch.nn.Linear(W, 5 * W).to(DEVICE)
    lin_out = torch.nn.Linear(W, 2 * C).to(DEVICE)
    coefs = SCHEDULE.loss_coefs(DEVICE)

    def fn(x_t, y, noise, t, x0):
        x = lin_in(x_t)
        shift, scale, gate, shift2, scale2 = lin_ada(F.silu(y)).chunk(5, dim=1)
        h = ddg_ops.adaln_modulate(x, shift, scale)
        x = ddg_ops.gated_residual(x, gate, F.silu(h))
        out = lin_out(ddg_ops.adaln_modulate(x, shift2, scale2))
        return ddg_ops.diffusion_loss(out, noise, t, coefs, x0, reduction="none").loss

    args = [_on(torch.randn(M, C)), _on(torch.randn(M, W)), _on(torch.randn(M, C)), _on(_cuda_timesteps(M)),
            _on(torch.randn(M // 2, C))]
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = compiled(*args)
    torch.testing.assert_close(out, fn(*args), atol=1e-5, rtol=1e-5)
