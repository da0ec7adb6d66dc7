"""Precision of guidance rescale's per-sample statistics when the values sit far from zero with a
small spread (docs/guidance_kernels.md, "Rescale statistics"), and the kernels' vector/scalar
paths on long and misaligned samples. Runs against whichever kernel backs the CPU dispatch key,
so the same cases check the emulated CUDA kernels."""
import pytest
import torch

import ddg_ops
from ddg_ops import reference

pytestmark = pytest.mark.requires_ext

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
