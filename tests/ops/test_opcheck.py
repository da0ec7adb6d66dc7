"""torch.library.opcheck on every ddg op, backward ops included (schema, fake kernel,
autograd registration, AOT dispatch)."""
import pytest
import torch

import ddg_ops  # noqa: F401  (registers fakes and autograd)

pytestmark = pytest.mark.requires_ext

ops = torch.ops.ddg


def _t(shape=(2, 3, 5, 7), dtype=torch.float32, requires_grad=False, channels_last=False):
    t = torch.randn(shape, dtype=dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def _cases():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for rg in (False, True):
            for cl in (False, True):
                kw = dict(dtype=dtype, requires_grad=rg, channels_last=cl)
                u, c, x, f, xt = (_t(**kw) for _ in range(5))
                ps = torch.tensor([0.5, 2.0])
                yield ops.cfg_combine.default, (u, c, 7.5, None, 0.0)
                yield ops.cfg_combine.default, (u, c, 0.0, ps, 0.7)
                yield ops.cfg_step.default, (x, u, c, 7.5, None, 0.0, "ddim_epsilon", 0.3, 0.5, None)
                yield ops.cfg_step.default, (x, u, c, 7.5, ps, 0.5, "euler", 0.0, 0.0, torch.rand(2, 2))
                yield ops.cfg_step.default, (x, u, c, 2.0, None, 0.0, "ddim_v_prediction", 0.3, 0.5, None)
                yield ops.dmd_grad.default, (x, u.detach(), c.detach(), f.detach(), 3.5, None, "velocity", None, None)
                yield ops.dmd_grad.default, (x, u.detach(), c.detach(), f.detach(), 3.5, ps, "epsilon", xt.detach(),
                                             torch.tensor([0.2, 0.7]))


def _backward_cases():
    for dtype in (torch.float32, torch.float16):
        go, u, c = (_t(dtype=dtype) for _ in range(3))
        _, stats = ops.cfg_combine(u, c, 7.5, None, 0.7)
        yield ops.cfg_combine_backward.default, (go, u, c, 7.5, None, 0.7, stats)
        yield ops.cfg_combine_backward.default, (go, u, c, 7.5, None, 0.0, torch.empty(0, 4))
        _, stats = ops.cfg_step(go, u, c, 7.5, None, 0.7, "ddim_epsilon", 0.3, 0.5, None)
        yield ops.cfg_step_backward.default, (go, u, c, 7.5, None, 0.7, "ddim_epsilon", 0.3, 0.5, None, stats)
        g, _, _ = ops.dmd_grad(go, u, c, go, 3.5, None, "velocity", None, None)
        yield ops.dmd_grad_backward.default, (torch.tensor(1.5), g, dtype)


@pytest.mark.parametrize("op,args", list(_cases()) + list(_backward_cases()),
                         ids=lambda v: getattr(v, "__name__", None) if callable(v) else "")
def test_opcheck(op, args):
    torch.library.opcheck(op, args)
