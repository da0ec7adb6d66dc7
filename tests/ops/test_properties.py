"""Hypothesis property tests of the guidance ops over shapes and values."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ddg_ops
from ddg_ops import reference
from tests._utils import assert_close, magnitude

pytestmark = pytest.mark.requires_ext

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
