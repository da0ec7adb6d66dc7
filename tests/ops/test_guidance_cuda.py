"""CUDA kernels of the guidance ops against the reference: on a GPU, or on CPU tensors under the CUDA
emulator (DDG_CUDA_EMULATOR, tests/cuda_emu)."""
import pytest
import torch

import ddg_ops
from ddg_ops import reference
from tests._utils import DTYPES, KERNEL_DEVICE, LAYOUTS, assert_close, emulator_size_limit, grads, magnitude, make

pytestmark = [pytest.mark.requires_ext, pytest.mark.cuda_kernels]

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


def test_misaligned_pointers_take_the_scalar_path():
    base = torch.randn(2 * 4097 + 1, device=DEVICE)
    u, c = base[1:4098].view(1, -1), base[4098:].view(1, -1)  # offsets not 16-byte aligned
    torch.testing.assert_close(ddg_ops.cfg_combine(u, c, 7.5, 0.3), reference.cfg_combine(u, c, 7.5, 0.3))


@pytest.mark.requires_cuda
def test_matches_cpu_kernel_bitwise_for_plain_cfg():
    u, c = torch.randn(3, 4, 33, 33), torch.randn(3, 4, 33, 33)
    gpu = ddg_ops.cfg_combine(u.cuda(), c.cuda(), 7.5).cpu()
    torch.testing.assert_close(gpu, ddg_ops.cfg_combine(u, c, 7.5), atol=1e-6, rtol=1e-6)


def test_opcheck_cuda():
    u, c, x, f = (torch.randn(2, 4, 16, 16, device=DEVICE, requires_grad=True) for _ in range(4))
    torch.library.opcheck(torch.ops.ddg.cfg_combine.default, (u, c, 7.5, None, 0.7))
    torch.library.opcheck(torch.ops.ddg.cfg_step.default, (x, u, c, 7.5, None, 0.5, "ddim_epsilon", 0.3, 0.5, None))
    torch.library.opcheck(torch.ops.ddg.dmd_grad.default,
                          (x, u.detach(), c.detach(), f.detach(), 3.5, None, "velocity", None, None))


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
