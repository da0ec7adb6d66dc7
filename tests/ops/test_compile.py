"""torch.compile(fullgraph=True) of code that uses the ops equals eager (forward and backward)."""
import pytest
import torch

import ddg_ops

pytestmark = pytest.mark.requires_ext


def _step(x, u, c, f, w):
    # A small training-like graph around the ops: a linear layer upstream, all three ops.
    u = u @ w
    guided = ddg_ops.cfg_combine(u, c, 7.5, 0.5)
    stepped = ddg_ops.cfg_step(x, u, guided, 3.0, update="ddim_epsilon", coef_t=0.3, coef_next=0.5, rescale=0.3)
    out = ddg_ops.dmd_grad(stepped, u.detach(), c, f, 3.5)
    return stepped.square().mean() + out.loss


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    x, u, c, f = (torch.randn(2, 3, 6, 6) for _ in range(4))
    w = torch.randn(6, 6, requires_grad=True)
    xs = x.clone().requires_grad_()
    eager = _step(xs, u, c, f, w)
    g_eager = torch.autograd.grad(eager, (xs, w))
    compiled = torch.compile(_step, fullgraph=True, backend=backend)
    xs2 = x.clone().requires_grad_()
    out = compiled(xs2, u, c, f, w)
    g_out = torch.autograd.grad(out, (xs2, w))
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_out, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compile_per_sample_and_epsilon_dmd():
    torch._dynamo.reset()

    def fn(x, u, c, f, xt, ab, s):
        out = ddg_ops.dmd_grad(x, u, c, f, s, prediction="epsilon", x_t=xt, alpha_bar=ab)
        return out.loss, out.grad, ddg_ops.cfg_step(x, u, c, s, update="euler", coef_t=ab, coef_next=ab * 0.5)

    args = [torch.randn(3, 4, 5) for _ in range(5)] + [torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1.0, 2.0, 7.5])]
    expected = fn(*args)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
