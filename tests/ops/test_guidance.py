"""The guidance ops (cfg_combine, cfg_step, dmd_grad) against their pure-PyTorch references."""
import pytest
import torch
import torch.nn.functional as F

import ddg_ops
from ddg_ops import reference
from tests._utils import DTYPES, LAYOUTS, assert_close, grads, magnitude, make

pytestmark = pytest.mark.requires_ext

SMALL_SHAPES = [(1,), (5,), (2, 1001), (2, 3, 5, 7), (3, 5, 37, 41), (1, 4, 1, 1)]
REALISTIC_SHAPES = [(2, 4, 64, 64), (1, 16, 128, 128)]  # SD1.5 CFG pair, SD3.5 latent
SCALES = [0.0, 1.0, -1.0, 7.5, "per_sample"]
STEPS = [("ddim_epsilon", 0.05, 0.3), ("ddim_v_prediction", 0.6, 0.9), ("ddim_epsilon", 0.9, 1.0),
         ("euler", 0.8, 0.75), ("euler", 0.1, 0.0)]


def _scale(scale, batch):
    return torch.linspace(-1.0, 7.5, batch) if scale == "per_sample" else scale


def _compare(kernel_fn, reference_fn, inputs, dtype):
    """Outputs and input gradients (random grad_output) of kernel and reference agree."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = kernel_fn(*leaves)
    expected = reference_fn(*leaves)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_close(out, expected, dtype, scale=magnitude(expected), msg="forward")
    if out.numel() == 0:
        return
    grad_out = torch.randn_like(out)
    for name, g, ge in zip("xyz", grads(out, leaves, grad_out), grads(expected, leaves, grad_out)):
        assert_close(g, ge, dtype, scale=magnitude(ge), msg=f"grad {name}")


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cfg_combine_matches_reference(dtype, shape, layout, scale, rescale):
    u, c = (make(shape, dtype, layout, i) for i in range(2))
    s = _scale(scale, shape[0])
    _compare(lambda a, b: ddg_ops.cfg_combine(a, b, s, rescale),
             lambda a, b: reference.cfg_combine(a, b, s, rescale), [u, c], dtype)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("shape", [(5,), (2, 3, 5, 7), (3, 5, 37, 41)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cfg_step_matches_reference(dtype, shape, layout, step, rescale):
    update, coef_t, coef_next = step
    x, u, c = (make(shape, dtype, layout, i) for i in range(3))
    kw = dict(update=update, coef_t=coef_t, coef_next=coef_next, rescale=rescale)
    _compare(lambda a, b, d: ddg_ops.cfg_step(a, b, d, 7.5, **kw),
             lambda a, b, d: reference.cfg_step(a, b, d, 7.5, **kw), [x, u, c], dtype)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("scale", [0.0, 1.0, -1.0, 7.5])
@pytest.mark.parametrize("shape", REALISTIC_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_realistic_latents(dtype, shape, scale, rescale):
    x, u, c = (make(shape, dtype, "channels_last", i) for i in range(3))
    _compare(lambda a, b: ddg_ops.cfg_combine(a, b, scale, rescale),
             lambda a, b: reference.cfg_combine(a, b, scale, rescale), [u, c], dtype)
    kw = dict(update="ddim_epsilon", coef_t=0.3, coef_next=0.45, rescale=rescale)
    _compare(lambda a, b, d: ddg_ops.cfg_step(a, b, d, scale, **kw),
             lambda a, b, d: reference.cfg_step(a, b, d, scale, **kw), [x, u, c], dtype)


def test_per_sample_step_coefficients():
    """Per-sample timesteps (DMD2's backward simulation): coefficient tensors of shape [B]."""
    x, u, c = (torch.randn(4, 3, 9, 9) for _ in range(3))
    ab_t, ab_prev = torch.tensor([0.1, 0.3, 0.5, 0.7]), torch.tensor([0.2, 0.5, 0.6, 1.0])
    for update in ("ddim_epsilon", "ddim_v_prediction", "euler"):
        _compare(lambda a, b, d: ddg_ops.cfg_step(a, b, d, 3.0, update=update, coef_t=ab_t, coef_next=ab_prev),
                 lambda a, b, d: reference.cfg_step(a, b, d, 3.0, update=update, coef_t=ab_t, coef_next=ab_prev),
                 [x, u, c], torch.float32)
    # A per-sample tensor and a number mix; the result equals four single-sample calls.
    out = ddg_ops.cfg_step(x, u, c, 3.0, update="euler", coef_t=ab_t, coef_next=0.05)
    for b in range(4):
        single = ddg_ops.cfg_step(x[b:b + 1], u[b:b + 1], c[b:b + 1], 3.0, update="euler",
                                  coef_t=float(ab_t[b]), coef_next=0.05)
        torch.testing.assert_close(out[b:b + 1], single, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_inputs(dtype):
    for shape in [(0, 4, 8, 8), (2, 0, 3)]:
        u, c, x = (torch.randn(shape).to(dtype) for _ in range(3))
        assert ddg_ops.cfg_combine(u, c, 7.5, 0.5).shape == shape
        assert ddg_ops.cfg_step(x, u, c, 7.5, update="euler", coef_t=1.0, coef_next=0.5).shape == shape
        out = ddg_ops.dmd_grad(x, u, c, x, 3.5)
        assert out.grad.shape == shape and out.denom.shape == (shape[0],)
        assert torch.isnan(out.loss)  # a mean over no elements, as torch.mean gives it


def test_rescale_is_deterministic_across_thread_counts():
    u, c = torch.randn(2, 300_001), torch.randn(2, 300_001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ddg_ops.cfg_combine(u, c, 7.5, 0.7)
        torch.set_num_threads(max(2, threads))
        many = ddg_ops.cfg_combine(u, c, 7.5, 0.7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_rescale_statistics_survive_large_offsets():
    """Welford/Chan statistics: a large common offset does not destroy the small spread."""
    base = torch.randn(2, 100_000, dtype=torch.float64)
    u, c = (base + 1e4).float(), (base * 1.5 + 1e4).float()
    out = ddg_ops.cfg_combine(u, c, 2.0, 1.0).double()
    expected = reference.cfg_combine(u.double(), c.double(), 2.0, 1.0)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=1e-5)


# ------------------------------------------------------------------------------ dmd_grad

def _dmd_inputs(shape, dtype, layout, prediction):
    x, u, c, f, xt = (make(shape, dtype, layout, i) for i in range(5))
    kw = {}
    if prediction == "epsilon":
        kw = dict(x_t=xt, alpha_bar=torch.linspace(0.05, 0.95, shape[0]))
    return x, u, c, f, kw


@pytest.mark.parametrize("scale", [1.0, 3.5, "per_sample"])
@pytest.mark.parametrize("prediction", ["velocity", "epsilon"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3,), (2, 3, 5, 7), (3, 5, 37, 41), (4, 16, 32, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dmd_grad_matches_reference(dtype, shape, layout, prediction, scale):
    x, u, c, f, kw = _dmd_inputs(shape, dtype, layout, prediction)
    s = _scale(scale, shape[0])
    out = ddg_ops.dmd_grad(x, u, c, f, s, prediction=prediction, **kw)
    expected = reference.dmd_grad(x, u, c, f, s, prediction=prediction, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.grad.dtype == acc and out.denom.dtype == acc and out.loss.dtype == acc
    # Inputs are rounded to `dtype` once; the math is fp32 on both sides.
    tol = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(out.grad, expected.grad, tol, scale=magnitude(expected.grad), msg="grad")
    assert_close(out.denom, expected.denom, tol, scale=magnitude(expected.denom), msg="denom")
    assert_close(out.loss, expected.loss, tol, scale=magnitude(expected.loss), msg="loss")


@pytest.mark.parametrize("prediction", ["velocity", "epsilon"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dmd_loss_backward_is_stop_gradient_mse(dtype, prediction):
    """d(loss)/dx equals the gradient of DMD2's 0.5*mse(x, sg(x - g)), times grad_output."""
    x, u, c, f, kw = _dmd_inputs((3, 4, 6, 6), dtype, "contiguous", prediction)
    x.requires_grad_()
    out = ddg_ops.dmd_grad(x, u, c, f, 3.5, prediction=prediction, **kw)
    weight = 2.7  # grad_output != 1
    (grad_x,) = torch.autograd.grad(out.loss * weight, x)
    assert grad_x.dtype == dtype
    xa = x.detach().to(out.grad.dtype).requires_grad_()
    (expected,) = torch.autograd.grad(0.5 * F.mse_loss(xa, (xa - out.grad).detach()) * weight, xa)
    # x - (x - g) re-rounds g in the MSE form, so compare with the accumulation dtype's tolerance.
    assert_close(grad_x, expected, torch.float32 if dtype != torch.float64 else dtype,
                 scale=magnitude(expected), msg="grad x")
    assert_close(grad_x, (out.grad * weight / out.grad.numel()).to(dtype), dtype, msg="g/N")


def test_dmd_grad_sends_no_gradient_to_scores():
    x = torch.randn(2, 8, requires_grad=True)
    u, c, f = (torch.randn(2, 8, requires_grad=True) for _ in range(3))
    out = ddg_ops.dmd_grad(x, u, c, f, 3.5)
    assert not out.grad.requires_grad and not out.denom.requires_grad
    gx, gu, gc, gf = torch.autograd.grad(out.loss, (x, u, c, f), allow_unused=True)
    assert gx is not None and gu is None and gc is None and gf is None


def test_dmd_velocity_form_equals_dpdmd_x0_form():
    """specs/dpdmd.md §2.5(d): p = x_sigma - x0 with x0 = x_sigma - sigma * v; sigma cancels."""
    x_hat, u, c, f, eps = (torch.randn(2, 4, 8, 8, dtype=torch.float64) for _ in range(5))
    sigma = 0.37
    x_sigma = (1 - sigma) * x_hat + sigma * eps
    v_real = u + 3.5 * (c - u)
    p_real = x_sigma - (x_sigma - sigma * v_real)
    p_fake = x_sigma - (x_sigma - sigma * f)
    g = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    out = ddg_ops.dmd_grad(x_hat, u, c, f, 3.5)
    torch.testing.assert_close(out.grad, g, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out.loss, 0.5 * (g ** 2).mean(), atol=1e-12, rtol=1e-10)


def test_dmd_grad_is_nan_safe():
    """Zero normaliser or non-finite inputs: g follows torch.nan_to_num, as in DMD2."""
    x = torch.randn(3, 16)
    u = torch.zeros(3, 16)
    c = torch.zeros(3, 16)
    f = torch.randn(3, 16)
    f[1] = 0.0          # 0/0 -> NaN -> 0
    u[2, 3] = float("nan")  # NaN normaliser -> every g of sample 2 is 0
    out = ddg_ops.dmd_grad(x, u, c, f, 3.5)
    expected = reference.dmd_grad(x, u, c, f, 3.5)
    assert torch.isfinite(out.grad).all()
    assert torch.equal(out.grad, expected.grad)
    assert torch.equal(out.grad[1], torch.zeros(16)) and torch.equal(out.grad[2], torch.zeros(16))
    assert out.grad[0].abs().max() == torch.finfo(torch.float32).max
