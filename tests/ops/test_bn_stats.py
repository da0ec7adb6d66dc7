"""bn_stats / bn_stats_loss (kernel path) against the DeepInversion-style reference and fp64."""
import pytest
import torch

import ddg_ops
from ddg_ops import reference
from tests._utils import DTYPES, EMULATED, EMULATOR_FULL_DTYPE_NUMEL, KERNEL_DEVICE, assert_close, magnitude

pytestmark = pytest.mark.requires_ext

SHAPES = [(1, 3, 1, 1), (2, 5), (3, 6, 11), (2, 7, 5, 9), (5, 3, 13, 17), (2, 64, 56, 56), (1, 4, 200, 200),
          (64, 24, 3, 3)]
LAYOUTS = ["contiguous", "channels_last", "sliced", "permuted", "offset", "offset_channels_last"]


def _feature_map(shape, dtype, layout, scale=3.0, offset=1.5):
    x = torch.randn(shape) * scale + offset
    if layout == "channels_last" and len(shape) == 4:
        return x.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return torch.cat([x, x], dim=-1).to(dtype)[..., ::2]
    if layout == "permuted" and len(shape) >= 3:  # dense, channels neither leading-contiguous nor last
        return x.transpose(-1, -2).contiguous().transpose(-1, -2).to(dtype)
    if layout.startswith("offset"):  # the kernels' own layouts, starting one element past a 16-byte boundary
        return _one_element_in(x.to(dtype), channels_last=layout == "offset_channels_last" and len(shape) == 4)
    return x.to(dtype)


def _one_element_in(x, channels_last=False):
    """x stored from element 1 of a fresh buffer: dense (NCHW or channels-last) and misaligned for 16-byte packs."""
    dense = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    out = buf[1:].as_strided(x.shape, dense.stride())
    out.copy_(x)
    assert out.data_ptr() % 16 != 0
    return out


def _stats_tol(dtype):
    # The statistics are fp32 (fp64) on both sides; inputs are rounded to dtype once.
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_stats_matches_reference(dtype, shape, layout):
    x = _feature_map(shape, dtype, layout).requires_grad_()
    mean, var = ddg_ops.bn_stats(x)
    ref_mean, ref_var = reference.bn_stats(x)
    tol = _stats_tol(dtype)
    assert mean.dtype == ref_mean.dtype and mean.shape == (shape[1],)
    assert_close(mean, ref_mean, tol, scale=magnitude(ref_mean) * 10)
    assert_close(var, ref_var, tol, scale=magnitude(ref_var) * 10)
    gm, gv = torch.randn_like(mean), torch.randn_like(var)
    (grad,) = torch.autograd.grad((mean * gm).sum() + (var * gv).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref_mean * gm).sum() + (ref_var * gv).sum(), x)
    assert grad.dtype == dtype and grad.stride() == torch.empty_like(x).stride()
    assert_close(grad, ref_grad, dtype, scale=magnitude(ref_grad))


@pytest.mark.parametrize("form", ["unsquared", "squared"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_stats_loss_matches_reference(dtype, form):
    x = _feature_map((4, 16, 9, 9), dtype, "channels_last").requires_grad_()
    tm, tv = torch.randn(16), torch.rand(16) + 0.5
    out = ddg_ops.bn_stats_loss(x, tm, tv, form=form, weight=0.37)
    expected = reference.bn_stats_loss(x, tm, tv, form=form, weight=0.37)
    assert_close(out.loss, expected.loss, _stats_tol(dtype), scale=magnitude(expected.loss) * 10)
    (grad,) = torch.autograd.grad(out.loss * 2.7, x)
    (ref_grad,) = torch.autograd.grad(expected.loss * 2.7, x)
    assert_close(grad, ref_grad, dtype, scale=magnitude(ref_grad))


# std at mean 50 large enough that dtype's rounding keeps distinct values (bf16's ulp there is 0.25).
@pytest.mark.parametrize("dtype,std", [(torch.float32, 0.01), (torch.float16, 0.05), (torch.bfloat16, 1.0)])
def test_large_mean_small_variance_against_fp64(dtype, std):
    """docs/methods/ddis.md §4: mean 50, std 0.01 over 112x112 breaks E[x^2] - E[x]^2; Welford keeps it."""
    base = torch.randn(2, 4, 112, 112, dtype=torch.float64) * std + 50
    x = base.to(dtype)
    mean, var = ddg_ops.bn_stats(x)
    ref_mean, ref_var = reference.bn_stats(x.double())  # the same rounded inputs, exact statistics
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, atol=0, rtol=1e-3)
    naive = (x.float().square().mean(dim=(0, 2, 3)) - x.float().mean(dim=(0, 2, 3)).square()).double()
    assert (naive - ref_var).abs().max() > 10 * (var.double() - ref_var).abs().max()


def _exact_stats(x):
    """Per-channel mean and biased variance of x's (already rounded) values, in fp64."""
    return reference.bn_stats(x.double())


# Every channel far from zero (|offset| up to ~300, where fp32's ulp is 3e-5) with a spread of 1e-2:
# sums of x, or Welford means updated element by element, lose the variance here; statistics built from
# differences to a value of the same data keep it. Seeds swept so the pass is not one lucky draw.
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("shape,channels_last", [((4, 6, 64, 64), False), ((2, 3, 96, 128), False),
                                                 ((8, 5, 48, 48), True), ((4, 16, 40, 40), True),
                                                 ((3, 7, 13, 17), False)])
def test_large_channel_offsets_tiny_spread_against_fp64(seed, shape, channels_last):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    offset = (torch.rand(C, generator=g, dtype=torch.float64) - 0.5) * 600
    spread = 1e-2 * (1 + torch.rand(C, generator=g, dtype=torch.float64))
    base = torch.randn(shape, generator=g, dtype=torch.float64) * spread.view(1, C, 1, 1) + offset.view(1, C, 1, 1)
    x = base.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = ddg_ops.bn_stats(x)
    ref_mean, ref_var = _exact_stats(x)
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-2 * spread.min().item(), rtol=0)  # 1% of a std
    torch.testing.assert_close(var.double(), ref_var, atol=0, rtol=2e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "offset", "offset_channels_last"])
def test_same_bits_every_run(layout):
    x = _feature_map((6, 24, 37, 41), torch.float32, layout)
    gm, gv = torch.randn(24), torch.randn(24)
    first = ddg_ops.bn_stats(x)
    first_dx = torch.ops.ddg.bn_stats_backward(gm, gv, x, first[0])
    for _ in range(2):
        again = ddg_ops.bn_stats(x)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert torch.equal(torch.ops.ddg.bn_stats_backward(gm, gv, x, again[0]), first_dx)


# Channels-last with more channel packs than a block has threads (several passes per block), with C a
# multiple of every pack width and C a multiple of none; wide planes split into several pieces; and a
# large map that starts off a 16-byte boundary (scalar head and tail around the packs of every plane).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", [((2, 1040, 3, 3), "channels_last"), ((3, 1030, 2, 3), "channels_last"),
                                          ((2, 1040, 3, 3), "offset_channels_last"), ((1, 3, 5, 9000), "contiguous"),
                                          ((2, 2, 3, 17000), "offset"), ((8, 64, 56, 56), "offset"),
                                          ((8, 64, 56, 56), "offset_channels_last")])
def test_wide_channel_rows_and_long_planes(dtype, shape, layout):
    x = _feature_map(shape, dtype, layout).requires_grad_()
    mean, var = ddg_ops.bn_stats(x)
    ref_mean, ref_var = reference.bn_stats(x)
    tol = _stats_tol(dtype)
    assert_close(mean, ref_mean, tol, scale=magnitude(ref_mean) * 10)
    assert_close(var, ref_var, tol, scale=magnitude(ref_var) * 10)
    gm, gv = torch.randn_like(mean), torch.randn_like(var)
    (grad,) = torch.autograd.grad((mean * gm).sum() + (var * gv).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref_mean * gm).sum() + (ref_var * gv).sum(), x)
    assert_close(grad, ref_grad, dtype, scale=magnitude(ref_grad))


def test_millions_of_elements_channels_last():
    x = (torch.randn(4, 16, 256, 256) * 0.5 + 3.0).contiguous(memory_format=torch.channels_last)  # 4.2e6 elements
    mean, var = ddg_ops.bn_stats(x)
    ref_mean, ref_var = _exact_stats(x)
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, atol=0, rtol=1e-5)
    gm, gv = torch.randn(16), torch.randn(16)
    dx = torch.ops.ddg.bn_stats_backward(gm, gv, x, mean)
    M = x.numel() // 16
    expected = (gm / M).view(1, 16, 1, 1) + (2 * gv / M).view(1, 16, 1, 1) * (x - mean.view(1, 16, 1, 1))
    torch.testing.assert_close(dx, expected, atol=1e-9, rtol=1e-5)
    assert dx.stride() == x.stride()


def test_millions_of_elements_per_channel():
    x = torch.randn(4, 2, 1024, 1024) * 0.5 + 3.0  # M = 4.2e6 per channel
    mean, var = ddg_ops.bn_stats(x)
    ref_mean, ref_var = reference.bn_stats(x.double())
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, atol=0, rtol=1e-5)


def test_deterministic_across_thread_counts():
    x = torch.randn(8, 16, 40, 40).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ddg_ops.bn_stats(x)
        torch.set_num_threads(max(2, threads))
        many = ddg_ops.bn_stats(x)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_unsquared_loss_at_zero_distance_has_finite_gradient():
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    mean, var = reference.bn_stats(x.detach())
    out = ddg_ops.bn_stats_loss(x, mean, var)  # both norms are (numerically) ~0
    (grad,) = torch.autograd.grad(out.loss, x)
    assert torch.isfinite(grad).all()


@pytest.mark.cuda_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype, layout):
    for shape in [(2, 7, 5, 9), (8, 64, 56, 56), (2, 3), (1, 32, 512, 512)]:
        if EMULATED and dtype != torch.float32 and torch.Size(shape).numel() > EMULATOR_FULL_DTYPE_NUMEL:
            continue  # large shapes under the CUDA emulator: fp32 only (CI time)
        x = _feature_map(shape, dtype, layout).to(KERNEL_DEVICE or "cuda").requires_grad_()
        mean, var = ddg_ops.bn_stats(x)
        ref_mean, ref_var = reference.bn_stats(x)
        tol = _stats_tol(dtype)
        assert_close(mean, ref_mean, tol, scale=magnitude(ref_mean) * 10)
        assert_close(var, ref_var, tol, scale=magnitude(ref_var) * 10)
        (grad,) = torch.autograd.grad((mean * 1.3).sum() + (var * -0.7).sum(), x)
        (ref_grad,) = torch.autograd.grad((ref_mean * 1.3).sum() + (ref_var * -0.7).sum(), x)
        assert_close(grad, ref_grad, dtype, scale=magnitude(ref_grad))
