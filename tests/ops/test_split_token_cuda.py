"""CUDA kernels of the split-token ops against the reference on the CPU in fp64 (on a GPU, or on CPU
tensors under the CUDA emulator, DDG_CUDA_EMULATOR): odd and realistic sizes (W = 4096, M = 20480 rows), cond_index, strided operands
(column slices of the adaLN projection at unaligned offsets), every dtype including bf16."""
import pytest
import torch
import torch.nn.functional as F

import ddg_ops
from ddg_ops import GaussianDiffusionSchedule, reference
from tests._utils import DTYPES, KERNEL_DEVICE, assert_close, emulator_size_limit, magnitude

pytestmark = [pytest.mark.requires_ext, pytest.mark.cuda_kernels]

DEVICE = KERNEL_DEVICE or "cuda"
T = 1000
SCHEDULE = GaussianDiffusionSchedule.named("cosine", T)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _on(t, dtype=None):
    """A CPU-generated tensor on the device (values independent of the device)."""
    return t.to(dtype or t.dtype).to(DEVICE)


def _rows(M, W, dtype, layout="contiguous", offset=0.5, spread=2.0):
    """Views are taken on the device: moving a strided CPU view would make it contiguous."""
    if layout == "transposed":
        return _on(torch.randn(W, M) * spread + offset, dtype).t()
    if layout == "sliced":
        return _on(torch.randn(M, 2 * W + 1) * spread + offset, dtype)[:, 1::2]
    return _on(torch.randn(M, W) * spread + offset, dtype)


def _projection(rows, W, dtype):
    proj = _on(torch.randn(rows, 11 * W) * 0.7, dtype)
    return proj[:, 3 * W:4 * W], proj[:, 4 * W:5 * W], proj[:, 5 * W:6 * W]


def _cond_index(M):
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


ROWS_WIDTHS = [(1, 1), (33, 7), (5, 1023), (33, 1025), (64, 4096), (5120, 1024)]


def _adaln_x_grad_scale(ref_in, grad_outs, eps=1e-6):
    """d/dx of a LayerNorm row rounds like rstd * |grad_out (1 + scale) w|, which exceeds the result
    by up to 1 / sqrt(eps) in a row of (nearly) zero variance (W = 1)."""
    x, scale, ci, weight = ref_in["x"].detach(), ref_in["scale"].detach(), ref_in["cond_index"], ref_in["weight"]
    rstd = (x.var(1, correction=0, keepdim=True) + eps).rsqrt()
    g = grad_outs[0] * (1 + (scale if ci is None else scale[ci]))
    if weight is not None:
        g = g * weight.detach()
    return {"x": float((rstd * g.abs()).max())}


@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("affine", ["affine", "weight_only", "none"])
@pytest.mark.parametrize("M,W", ROWS_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_modulate_cuda(dtype, M, W, affine, cond):
    emulator_size_limit(dtype, M * W)
    ci, U = _cond_index(M) if cond else (None, M)
    shift, scale, _ = _projection(U, W, dtype)
    weight = _on(torch.randn(W) * 0.5 + 1, dtype) if affine != "none" else None
    bias = _on(torch.randn(W) * 0.3, dtype) if affine == "affine" else None
    inputs = dict(x=_rows(M, W, dtype, "transposed" if M % 2 else "contiguous"), shift=shift, scale=scale,
                  weight=weight, bias=bias, cond_index=ci)
    _check(lambda x, shift, scale, weight, bias, cond_index:
           ddg_ops.adaln_modulate(x, shift, scale, weight, bias, cond_index=cond_index),
           lambda x, shift, scale, weight, bias, cond_index:
           reference.adaln_modulate(x, weight, bias, shift, scale, cond_index, 1e-6),
           inputs, ("x", "shift", "scale", "weight", "bias"), msg="adaln_modulate", grad_scales=_adaln_x_grad_scale)


@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("M,W", ROWS_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_cuda(dtype, M, W, cond):
    emulator_size_limit(dtype, M * W)
    ci, U = _cond_index(M) if cond else (None, M)
    _, _, gate = _projection(U, W, dtype)
    inputs = dict(x=_rows(M, W, dtype), gate=gate, h=_rows(M, W, dtype, "sliced", offset=0.0), cond_index=ci)
    _check(lambda x, gate, h, cond_index: ddg_ops.gated_residual(x, gate, h, cond_index=cond_index),
           lambda x, gate, h, cond_index: reference.gated_residual(x, gate, h, cond_index),
           inputs, ("x", "gate", "h"), msg="gated_residual")


def _timesteps(M):
    t = torch.randint(0, T, (M,))
    t[:: 7] = 0
    t[-1] = T - 1
    return t


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
    inputs = dict(model_output=_on(torch.cat(parts, 1), dtype), noise=_on(noise, dtype), timesteps=_on(_timesteps(M)),
                  loss_coefs=_on(SCHEDULE.loss_coefs()), x0=_on(x0, dtype) if learned else None)

    def fn(model_output, noise, timesteps, loss_coefs, x0):
        return tuple(ddg_ops.diffusion_loss(model_output, noise, timesteps, loss_coefs, x0, learned_variance=learned,
                                            reduction=reduction))

    def ref_fn(model_output, noise, timesteps, loss_coefs, x0):
        loss, mse = reference.diffusion_loss(model_output, noise, timesteps, x0, loss_coefs, learned)
        return (loss.mean(), mse.mean()) if reduction == "mean" else (loss, mse)

    loss, mse = _check(fn, ref_fn, inputs, ("model_output",), msg="diffusion_loss")
    assert loss.dtype == mse.dtype == _acc(dtype)


@pytest.mark.parametrize("mixup", [False, True])
@pytest.mark.parametrize("B,N,C,R", [(1, 1, 64, 1), (3, 5, 7, 2), (64, 8, 64, 10), (64, 32, 64, 10)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_token_prepare_cuda(dtype, B, N, C, R, mixup):
    M = B * N * R
    emulator_size_limit(dtype, (B * N + M) * C)
    sab, s1m = SCHEDULE.noising_tables(DEVICE)
    inputs = dict(features=_rows(B, N * C, dtype, "transposed", 0.2, 1.0), timesteps=_on(_timesteps(M)),
                  noise=_rows(M, C, dtype, "sliced", 0.0, 1.0), sqrt_alpha_bar=sab, sqrt_one_minus_alpha_bar=s1m,
                  token_size=C, prototypes=_rows(B, N * C, dtype) if mixup else None, contraction=0.9,
                  permutation=_on(torch.randperm(B)) if mixup else None, mix=0.35)

    def ref_fn(features, timesteps, noise, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, token_size, prototypes,
               contraction, permutation, mix):
        return reference.split_token_prepare(features, prototypes, contraction, mix, permutation, timesteps, noise,
                                             sqrt_alpha_bar, sqrt_one_minus_alpha_bar, token_size)

    x_t, tokens = _check(lambda **kw: ddg_ops.split_token_prepare(**kw), ref_fn, inputs, (), msg="prepare")
    assert x_t.shape == (M, C) and tokens.shape == (B * N, C) and x_t.dtype == dtype


@pytest.mark.requires_cuda
def test_cuda_matches_cpu_kernels():
    """The same fp32 inputs through the CPU and the CUDA kernels (no reference in between)."""
    M, W, C = 96, 1024, 64
    ci = torch.arange(M) % 32
    x, h = torch.randn(M, W), torch.randn(M, W)
    proj = torch.randn(32, 11 * W) * 0.5
    w, b = torch.rand(W) + 0.5, torch.randn(W) * 0.1
    t = _timesteps(M)
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


def test_shared_condition_gradients_are_deterministic_cuda():
    """20480 rows sharing 3 conditions: the summed gradients of shift/scale/gate have the same bits
    on every run (a fixed summation order, no atomics) and match the fp64 reference."""
    M, W, U = 20480, 1024, 3
    ci = _on(torch.randint(0, U, (M,)))
    x, h, grad_out = _rows(M, W, torch.float32), _rows(M, W, torch.float32), _on(torch.randn(M, W))

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

    args = [_on(torch.randn(M, C)), _on(torch.randn(M, W)), _on(torch.randn(M, C)), _on(_timesteps(M)),
            _on(torch.randn(M // 2, C))]
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = compiled(*args)
    torch.testing.assert_close(out, fn(*args), atol=1e-5, rtol=1e-5)
