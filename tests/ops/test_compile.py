"""torch.compile(fullgraph=True) of code that uses the ops equals eager (forward and backward)."""
import pytest
import torch
import torch.nn.functional as F

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


# ------------------------------------------------------------------------------ split-token ops

def _head_step(features, mu, perm, t, noise, w_in, proj, ln_w, ln_b, w_mid, w_out, ci, sab, s1m, coefs):
    """GenDD's training step through a one-block SimpleMLPAdaLN head: targets, adaLN block with a
    gated residual, final adaLN layer, hybrid loss (specs/gendd.md §2-3)."""
    C, W = noise.shape[1], w_in.shape[1]
    x_t, x0 = ddg_ops.split_token_prepare(features, t, noise, sab, s1m, C, prototypes=mu, contraction=0.9,
                                          permutation=perm, mix=0.4)
    x = x_t @ w_in
    h = ddg_ops.adaln_modulate(x, proj[:, :W], proj[:, W:2 * W], ln_w, ln_b, cond_index=ci)
    x = ddg_ops.gated_residual(x, proj[:, 2 * W:3 * W], F.silu(h @ w_mid), cond_index=ci)
    f = ddg_ops.adaln_modulate(x, proj[:, 3 * W:4 * W], proj[:, 4 * W:5 * W], cond_index=ci)
    out = ddg_ops.diffusion_loss(f @ w_out, noise, t, coefs, x0)
    return out.loss, out.mse, x_t


def _head_inputs(cond):
    B, N, C, R, W = 2, 3, 4, 2, 16
    M = B * N * R
    sched = ddg_ops.GaussianDiffusionSchedule.named("cosine")
    ci = torch.arange(M) % (B * N) if cond else None  # per (sample, token) conditioning, shared by replicas
    U = B * N if cond else M
    data = dict(features=torch.randn(B, N * C), mu=torch.randn(B, N * C), perm=torch.tensor([1, 0]),
                t=torch.tensor([0, 999, 1, 500, 0, 17, 3, 0, 998, 250, 0, 42]), noise=torch.randn(M, C),
                ci=ci, sab=sched.noising_tables()[0], s1m=sched.noising_tables()[1], coefs=sched.loss_coefs())
    params = dict(w_in=torch.randn(C, W) / 2, proj=torch.randn(U, 11 * W) * 0.5, ln_w=torch.rand(W) + 0.5,
                  ln_b=torch.randn(W) * 0.1, w_mid=torch.randn(W, W) / 4, w_out=torch.randn(W, 2 * C) / 4)
    return data, {k: v.requires_grad_() for k, v in params.items()}


@pytest.mark.parametrize("backend,cond", [("aot_eager", True), pytest.param("inductor", False, marks=pytest.mark.slow)])
def test_compile_split_token_head_matches_eager(backend, cond):
    torch._dynamo.reset()
    data, params = _head_inputs(cond)
    eager = _head_step(**data, **params)
    g_eager = torch.autograd.grad(eager[0], list(params.values()))
    compiled = torch.compile(_head_step, fullgraph=True, backend=backend)
    out = compiled(**data, **params)
    g_out = torch.autograd.grad(out[0], list(params.values()))
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(params, g_out, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_compile_cond_rows_sum_and_its_gradient():
    """The segment sum of shared-condition gradients as an op of its own, forward and backward."""
    torch._dynamo.reset()
    ci = torch.tensor([2, 0, 2, 1, 0, 2, 4])  # condition 3 unused

    def fn(rows):
        return torch.ops.ddg.cond_rows_sum(rows, ci, 5) * torch.arange(1.0, 6.0)[:, None]

    rows = torch.randn(7, 9, requires_grad=True)
    eager = fn(rows)
    (g_eager,) = torch.autograd.grad(eager.sum(), rows)
    rows2 = rows.detach().clone().requires_grad_()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(rows2)
    (g_out,) = torch.autograd.grad(out.sum(), rows2)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_out, g_eager)
    assert torch.equal(g_out, (ci.float() + 1)[:, None].expand(7, 9))  # d/d row r = weight of its condition
