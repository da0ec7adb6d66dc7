"""torch.compile(fullgraph=True) of code that uses the ops equals eager (forward and backward): every
registry row at one odd, non-contiguous point of each variant, then training-like graphs."""
import pytest
import torch
import torch.nn.functional as F

import ddg_ops
from ddg_ops.op_registry import REGISTRY
from ddg_ops.testing import leaves

pytestmark = pytest.mark.requires_ext


def _row_points():
    for row in REGISTRY:
        shape = row.shapes["odd"][0]
        layout = row.layouts_for(shape)[-1]  # the last layout: sliced or transposed, never plain
        for variant in row.variants:
            yield pytest.param(row, shape, layout, variant, id=f"{row.name}-{layout}-{variant}")


@pytest.mark.parametrize("row,shape,layout,variant", list(_row_points()))
def test_compile_fullgraph_row_matches_eager(row, shape, layout, variant):
    torch._dynamo.reset()
    torch.manual_seed(0)
    call = row.build(shape, torch.float32, layout, variant, torch.device("cpu"))
    eager_in = leaves(call.inputs, call.differentiable, False)
    compiled_in = {k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                   and v.is_floating_point() else v for k, v in eager_in.items()}
    eager = call.run(**eager_in)
    got = torch.compile(call.run, fullgraph=True, backend="aot_eager")(**compiled_in)
    assert len(got) == len(eager)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    names = [n for n in call.differentiable if isinstance(eager_in.get(n), torch.Tensor)]
    outs = [(a, b) for a, b in zip(got, eager) if b.requires_grad]
    if not names or not outs:
        return
    grad_outs = [torch.randn_like(b) for _, b in outs]
    g_eager = torch.autograd.grad([b for _, b in outs], [eager_in[n] for n in names], grad_outs, allow_unused=True)
    g_got = torch.autograd.grad([a for a, _ in outs], [compiled_in[n] for n in names], grad_outs, allow_unused=True)
    for name, a, b in zip(names, g_got, g_eager):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"grad_{name}: {m}")


# ------------------------------------------------------------------------------ training-like graphs


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
    gated residual, final adaLN layer, hybrid loss (docs/methods/gendd.md §2-3)."""
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


def test_compile_bn_stats_loss_behind_a_conv():
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 8, 3)
    tm, tv = torch.randn(8), torch.rand(8) + 0.5

    def fn(img):
        return ddg_ops.bn_stats_loss(conv(img), tm, tv).loss

    img = torch.randn(2, 3, 12, 12, requires_grad=True)
    eager = fn(img)
    (g_eager,) = torch.autograd.grad(eager, img)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(img)
    (g_out,) = torch.autograd.grad(out, img)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_out, g_eager)
