"""The guidance family (cfg_combine, cfg_step, dmd_grad; csrc/*/guidance.*, ddg_ops/guidance.py): what
the registry-driven tests (test_registry, test_opcheck, test_gradcheck, test_compile, test_bad_inputs)
do not cover. Kernel against reference on realistic latents, sampler-step coefficients and empty
inputs; Hypothesis properties over shapes and values; the precision of guidance rescale's per-sample
statistics far from zero (docs/guidance_kernels.md, "Rescale statistics"); and the CUDA kernels, on a
GPU or on CPU tensors under the CUDA emulator (tests/cuda_emu)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ddg_ops
from ddg_ops import reference
from tests._utils import DTYPES, KERNEL_DEVICE, LAYOUTS, assert_close, emulator_size_limit, grads, magnitude, make

pytestmark = pytest.mark.requires_ext


# ----------------------------------------------------- kernel against reference

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
    """docs/methods/dpdmd.md §2.5(d): p = x_sigma - x0 with x0 = x_sigma - sigma * v; sigma cancels."""
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


# ------------------------------------------------------ properties (Hypothesis)
# Hypothesis property tests of the guidance ops over shapes and values.

shapes = st.tuples(st.integers(1, 4), st.integers(1, 70), st.integers(1, 9))
scales = st.floats(-10.0, 10.0, allow_nan=False)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


def _tensors(shape, dtype, seed, n, spread=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * spread + offset).to(dtype) for _ in range(n)]


@settings(max_examples=150, deadline=None)
@given(shape=shapes, dtype=dtypes, scale=scales, rescale=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       spread=st.floats(1e-3, 1e3), offset=st.floats(-100.0, 100.0))
# Found by this test on the emulated CUDA kernel: per-sample rescale statistics of values far from
# zero with a tiny spread (1.6e-4 relative error where the CPU kernel is exact).
@example(shape=(1, 1, 3), dtype=torch.float32, scale=0.0, rescale=1.0, seed=0, spread=1e-3, offset=9.0)
def test_cfg_combine_property(shape, dtype, scale, rescale, seed, spread, offset):
    u, c = _tensors(shape, dtype, seed, 2, spread, offset)
    out = ddg_ops.cfg_combine(u, c, scale, rescale)
    expected = reference.cfg_combine(u, c, scale, rescale)
    assert_close(out, expected, dtype, scale=magnitude(expected) * 10)
    if rescale == 0.0 and scale == 0.0:
        assert torch.equal(out, u)  # u + 0 * (c - u) is exactly u


@settings(max_examples=150, deadline=None)
@given(shape=shapes, dtype=dtypes, scale=scales, seed=st.integers(0, 2**31 - 1),
       update=st.sampled_from(["ddim_epsilon", "ddim_v_prediction", "euler"]),
       coef_t=st.floats(0.01, 1.0), coef_next=st.floats(0.0, 1.0))
def test_cfg_step_property(shape, dtype, scale, seed, update, coef_t, coef_next):
    x, u, c = _tensors(shape, dtype, seed, 3)
    kw = dict(update=update, coef_t=coef_t, coef_next=coef_next)
    out = ddg_ops.cfg_step(x, u, c, scale, **kw)
    expected = reference.cfg_step(x, u, c, scale, **kw)
    # DDIM's 1/sqrt(alpha_bar) amplifies both sides' rounding: scale atol by it.
    amplification = 1.0 if update == "euler" else 1.0 / coef_t ** 0.5
    assert_close(out, expected, dtype, scale=magnitude(expected) * amplification * 10)


@settings(max_examples=100, deadline=None)
@given(shape=shapes, scale=scales, seed=st.integers(0, 2**31 - 1), eps=st.booleans(),
       alpha_bar=st.floats(0.01, 1.0))
def test_dmd_grad_property(shape, scale, seed, eps, alpha_bar):
    x, u, c, f, xt = _tensors(shape, torch.float32, seed, 5)
    kw = dict(prediction="epsilon", x_t=xt, alpha_bar=alpha_bar) if eps else {}
    out = ddg_ops.dmd_grad(x, u, c, f, scale, **kw)
    expected = reference.dmd_grad(x, u, c, f, scale, **kw)
    assert_close(out.grad, expected.grad, torch.float32, scale=magnitude(expected.grad) * 10)
    assert_close(out.loss, expected.loss, torch.float32, scale=magnitude(expected.loss) * 10)
    # The normalisation makes mean|g| per sample equal mean|p_real - p_fake| / mean|p_real|.
    assert torch.isfinite(out.grad).all()


# Values far from zero with a spread many orders of magnitude smaller: the per-sample statistics of
# guidance rescale must keep the spread's precision (docs/guidance_kernels.md, "Rescale statistics").
far_offsets = st.one_of(st.floats(-1e4, -1.0), st.floats(1.0, 1e4))
relative_spreads = st.floats(1e-5, 1e-1)  # spread / |offset|; 1e-5 is still ~170 fp32 ulps


@settings(max_examples=150, deadline=None)
@given(shape=shapes, scale=st.one_of(st.sampled_from([0.0, 1.0]), scales), rescale=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**31 - 1), offset=far_offsets, relative_spread=relative_spreads)
def test_rescale_statistics_far_from_zero_property(shape, scale, rescale, seed, offset, relative_spread):
    u, c = _tensors(shape, torch.float32, seed, 2, abs(offset) * relative_spread, offset)
    out, stats = torch.ops.ddg.cfg_combine(u, c, scale, None, rescale)
    # cond's statistics are exact functions of the inputs for any scale.
    rows = c.double().flatten(1)
    var = rows.var(dim=1, correction=0)
    ulp = torch.finfo(torch.float32).eps * abs(offset)
    torch.testing.assert_close(stats[:, 2].double(), rows.mean(dim=1), atol=4 * ulp, rtol=0)
    torch.testing.assert_close(stats[:, 3].double(), var, atol=1e-30, rtol=1e-5)
    if scale in (0.0, 1.0):  # the guided prediction is uncond / cond exactly: fp64 is the exact answer
        expected = reference.cfg_combine(u.double(), c.double(), scale, rescale)
        torch.testing.assert_close(out.double(), expected, atol=0, rtol=1e-5)


# --------------------------------------------- rescale statistics far from zero
# Precision of guidance rescale's per-sample statistics when the values sit far from zero with a
# small spread (docs/guidance_kernels.md, "Rescale statistics"), and the kernels' vector/scalar
# paths on long and misaligned samples. Runs against whichever kernel backs the CPU dispatch key,
# so the same cases check the emulated CUDA kernels.

SEEDS = range(20)


def _offset_inputs(shape, offset, spread, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * spread + offset).to(dtype) for _ in range(2)]


def _stats(u, c, scale, rescale):
    return torch.ops.ddg.cfg_combine(u, c, scale, None, rescale)


def _exact_cond_stats(c):
    rows = c.double().flatten(1)
    return rows.mean(dim=1), rows.var(dim=1, correction=0)


def _assert_cond_stats(stats, c, offset, rtol_var):
    mean, var = _exact_cond_stats(c)
    # The mean is stored as an fp32 value near the offset: a few of its ulps.
    ulp = torch.finfo(torch.float32).eps * abs(offset)
    torch.testing.assert_close(stats[:, 2].double(), mean, atol=4 * ulp, rtol=0)
    torch.testing.assert_close(stats[:, 3].double(), var, atol=0, rtol=rtol_var)


@pytest.mark.parametrize("seed", SEEDS)
def test_rescale_tiny_spread_three_elements(seed):
    """Shape (1, 1, 3), offset 9, spread 1e-3, scale 0, rescale 1: a mean kept as an absolute fp32
    value rounds to ulp(9) ~ 1e-6, a 1e-3 relative error on every deviation. With scale 0 the guided
    prediction is uncond exactly, so the fp64 reference of the same inputs is the exact answer."""
    u, c = _offset_inputs((1, 1, 3), 9.0, 1e-3, seed)
    out, stats = _stats(u, c, 0.0, 1.0)
    expected = reference.cfg_combine(u.double(), c.double(), 0.0, 1.0)
    torch.testing.assert_close(out.double(), expected, atol=0, rtol=2e-6)
    _assert_cond_stats(stats, c, 9.0, rtol_var=2e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset,spread", [(9.0, 1e-3), (-300.0, 1e-2), (1e4, 2.0)])
def test_rescale_far_from_zero_long_samples(seed, offset, spread):
    """Several chunks per sample (and an odd sample length, so samples start unaligned): the chunk
    states merge in the shifted frame, so the result does not depend on the chunking."""
    u, c = _offset_inputs((2, 3, 11_001), offset, spread, seed)
    for scale in (0.0, 1.0):  # the guided prediction is then exactly uncond / cond
        out, stats = _stats(u, c, scale, 1.0)
        expected = reference.cfg_combine(u.double(), c.double(), scale, 1.0)
        torch.testing.assert_close(out.double(), expected, atol=0, rtol=2e-6)
        _assert_cond_stats(stats, c, offset, rtol_var=2e-6)


@pytest.mark.parametrize("seed", range(5))
def test_rescale_per_channel_offsets(seed):
    """Latent-like data: each channel has its own large mean, the sample's first element is in
    channel 0, and the spread within a channel is small."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([50.0, -20.0, 80.0, 5.0], dtype=torch.float64).view(1, 4, 1, 1)
    u, c = ((torch.randn(2, 4, 40, 40, generator=g, dtype=torch.float64) * 0.01 + offsets).float() for _ in range(2))
    out, stats = _stats(u, c, 1.0, 0.7)
    expected = reference.cfg_combine(u.double(), c.double(), 1.0, 0.7)
    torch.testing.assert_close(out.double(), expected, atol=0, rtol=2e-6)
    _assert_cond_stats(stats, c, 80.0, rtol_var=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_misaligned_and_unaligned_samples(dtype):
    """Data pointers off 16-byte alignment (the scalar path) and sample lengths that are not a
    multiple of the pack width (vector path with unaligned sample starts), forward and backward,
    for every guidance op."""
    base = torch.randn(4 * 3 * 4099 + 3, dtype=torch.float64).to(dtype)
    shifted = [base[1 + k * 3 * 4099: 1 + (k + 1) * 3 * 4099].view(3, 4099) for k in range(4)]
    aligned = [t.clone() for t in shifted]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype != torch.bfloat16 else dict(atol=2e-2, rtol=2e-2)
    for x, u, c, f in (shifted, aligned):
        for rescale in (0.0, 0.6):
            leaves = [t.detach().requires_grad_() for t in (x, u, c)]
            kw = dict(update="ddim_epsilon", coef_t=0.3, coef_next=0.5, rescale=rescale)
            out = ddg_ops.cfg_step(*leaves, 7.5, **kw)
            ref_leaves = [t.detach().double().requires_grad_() for t in (x, u, c)]
            expected = reference.cfg_step(*ref_leaves, 7.5, **kw)
            scale = float(expected.detach().abs().max())
            torch.testing.assert_close(out.double(), expected.detach(), atol=tol["atol"] * scale, rtol=tol["rtol"])
            grad_out = torch.randn(out.shape, dtype=torch.float64)
            got = torch.autograd.grad(out, leaves, grad_out.to(dtype))
            want = torch.autograd.grad(expected, ref_leaves, grad_out)
            for a, b in zip(got, want):
                torch.testing.assert_close(a.double(), b, atol=tol["atol"] * float(b.abs().max()), rtol=tol["rtol"])
        dmd = ddg_ops.dmd_grad(x, u, c, f, 3.5)
        dmd_ref = reference.dmd_grad(x.double(), u.double(), c.double(), f.double(), 3.5)
        torch.testing.assert_close(dmd.grad.double(), dmd_ref.grad, atol=1e-5 * float(dmd_ref.grad.abs().max()),
                                   rtol=1e-5)


# ------------------------------------ CUDA kernels (a GPU or the CUDA emulator)
# CUDA kernels of the guidance ops against the reference: on a GPU, or on CPU tensors under the CUDA
# emulator (DDG_CUDA_EMULATOR, tests/cuda_emu).

DEVICE = KERNEL_DEVICE or "cuda"

SHAPES = [(5,), (2, 3, 5, 7), (3, 5, 37, 41), (2, 4, 64, 64), (4, 16, 128, 128)]


def _check(kernel_fn, reference_fn, inputs, dtype):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out, expected = kernel_fn(*leaves), reference_fn(*leaves)
    assert out.device.type == DEVICE
    assert_close(out, expected, dtype, scale=magnitude(expected))
    grad_out = torch.randn_like(out)
    for g, ge in zip(grads(out, leaves, grad_out), grads(expected, leaves, grad_out)):
        assert_close(g, ge, dtype, scale=magnitude(ge))


@pytest.mark.cuda_kernels
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cfg_combine_and_step_cuda(dtype, shape, layout, rescale):
    emulator_size_limit(dtype, torch.Size(shape).numel())
    x, u, c = (make(shape, dtype, layout, i, device=DEVICE) for i in range(3))
    _check(lambda a, b: ddg_ops.cfg_combine(a, b, 7.5, rescale),
           lambda a, b: reference.cfg_combine(a, b, 7.5, rescale), [u, c], dtype)
    for update, ct, cn in [("ddim_epsilon", 0.3, 0.5), ("ddim_v_prediction", 0.2, 0.6), ("euler", 0.8, 0.7)]:
        kw = dict(update=update, coef_t=ct, coef_next=cn, rescale=rescale)
        _check(lambda a, b, d: ddg_ops.cfg_step(a, b, d, 7.5, **kw),
               lambda a, b, d: reference.cfg_step(a, b, d, 7.5, **kw), [x, u, c], dtype)


@pytest.mark.cuda_kernels
@pytest.mark.parametrize("prediction", ["velocity", "epsilon"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dmd_grad_cuda(dtype, shape, prediction):
    emulator_size_limit(dtype, torch.Size(shape).numel())
    x, u, c, f, xt = (make(shape, dtype, "contiguous", i, device=DEVICE) for i in range(5))
    kw = dict(x_t=xt, alpha_bar=torch.linspace(0.1, 0.9, shape[0], device=DEVICE)) if prediction == "epsilon" else {}
    xg = x.detach().requires_grad_()
    out = ddg_ops.dmd_grad(xg, u, c, f, 3.5, prediction=prediction, **kw)
    expected = reference.dmd_grad(x, u, c, f, 3.5, prediction=prediction, **kw)
    tol = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(out.grad, expected.grad, tol, scale=magnitude(expected.grad))
    assert_close(out.loss, expected.loss, tol, scale=magnitude(expected.loss))
    (gx,) = torch.autograd.grad(out.loss * 3.0, xg)
    assert_close(gx, (expected.grad * 3.0 / x.numel()).to(dtype), dtype)


@pytest.mark.cuda_kernels
def test_misaligned_pointers_take_the_scalar_path():
    base = torch.randn(2 * 4097 + 1, device=DEVICE)
    u, c = base[1:4098].view(1, -1), base[4098:].view(1, -1)  # offsets not 16-byte aligned
    torch.testing.assert_close(ddg_ops.cfg_combine(u, c, 7.5, 0.3), reference.cfg_combine(u, c, 7.5, 0.3))


@pytest.mark.cuda_kernels
@pytest.mark.requires_cuda
def test_matches_cpu_kernel_bitwise_for_plain_cfg():
    u, c = torch.randn(3, 4, 33, 33), torch.randn(3, 4, 33, 33)
    gpu = ddg_ops.cfg_combine(u.cuda(), c.cuda(), 7.5).cpu()
    torch.testing.assert_close(gpu, ddg_ops.cfg_combine(u, c, 7.5), atol=1e-6, rtol=1e-6)


@pytest.mark.cuda_kernels
def test_opcheck_cuda():
    u, c, x, f = (torch.randn(2, 4, 16, 16, device=DEVICE, requires_grad=True) for _ in range(4))
    torch.library.opcheck(torch.ops.ddg.cfg_combine.default, (u, c, 7.5, None, 0.7))
    torch.library.opcheck(torch.ops.ddg.cfg_step.default, (x, u, c, 7.5, None, 0.5, "ddim_epsilon", 0.3, 0.5, None))
    torch.library.opcheck(torch.ops.ddg.dmd_grad.default,
                          (x, u.detach(), c.detach(), f.detach(), 3.5, None, "velocity", None, None))


@pytest.mark.cuda_kernels
@pytest.mark.requires_cuda
def test_compile_reduce_overhead_with_linear_upstream():
    """CUDA graphs replay on the current stream: launches must not use the default stream."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(64, 64).cuda()

    def fn(x, u, c):
        u = lin(u)
        return ddg_ops.cfg_step(x, u, c, 7.5, update="euler", coef_t=0.8, coef_next=0.7, rescale=0.5)

    args = [torch.randn(4, 8, 64, device=DEVICE) for _ in range(3)]
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = compiled(*args)
    torch.testing.assert_close(out, fn(*args))
