"""torch.library.opcheck on every ddg op, backward ops included (schema, fake kernel,
autograd registration, AOT dispatch)."""
import pytest
import torch

import ddg_ops  # registers fakes and autograd

pytestmark = pytest.mark.requires_ext
if not ddg_ops.HAS_EXT:  # the samples below call the ops while the tests are collected
    pytest.skip(f"compiled extension not loaded: {ddg_ops.EXTENSION.reason}", allow_module_level=True)

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


# ------------------------------------------------------------------------------ split-token ops
# Built when the test runs (not at collection), so a build without these ops fails these
# tests only. split_token_prepare has no gradient (its outputs are targets): it is checked
# without requires_grad; noise, x0, timesteps and the tables are constants of every op.

T_TABLES = ddg_ops.GaussianDiffusionSchedule.named("cosine")


def _split_token_forward(dtype, rg):
    M, W, U, C = 6, 7, 3, 4
    ci = torch.tensor([0, 2, 1, 2, 0, 0])
    x = _t((M, W), dtype, rg)
    proj_rows, proj_u = torch.randn(M, 11 * W).to(dtype), torch.randn(U, 11 * W).to(dtype)
    shift, scale, gate = (proj_rows[:, i * W:(i + 1) * W].detach().requires_grad_(rg) for i in range(3))
    shift_u, scale_u, gate_u = (proj_u[:, i * W:(i + 1) * W].detach().requires_grad_(rg) for i in range(3))
    weight, bias, h = _t((W,), dtype, rg), _t((W,), dtype, rg), _t((W, M), dtype).t().requires_grad_(rg)
    noise, t = _t((M, C), dtype), torch.tensor([0, 5, 999, 0, 500, 1])
    x0, coefs = _t((M // 2, C), dtype), T_TABLES.loss_coefs()
    return {
        "adaln_affine": (ops.adaln_modulate.default, (x, weight, bias, shift, scale, None, 1e-6)),
        "adaln_weight_cond": (ops.adaln_modulate.default, (x, weight, None, shift_u, scale_u, ci, 1e-5)),
        "adaln_plain_cond": (ops.adaln_modulate.default, (x, None, None, shift_u, scale_u, ci, 1e-6)),
        "gated": (ops.gated_residual.default, (x, gate, h, None)),
        "gated_cond": (ops.gated_residual.default, (x, gate_u, h, ci)),
        "loss_epsilon": (ops.diffusion_loss.default, (_t((M, C), dtype, rg), noise, t, None, coefs, False)),
        "loss_learned": (ops.diffusion_loss.default, (_t((M, 2 * C), dtype, rg), noise, t, x0, coefs, True)),
        "cond_rows_sum": (ops.cond_rows_sum.default, (_t((M, W), dtype, rg), ci, U + 1)),
    }


def _split_token_prepare_samples(dtype):
    B, N, C, R = 2, 3, 4, 2
    sab, s1m = T_TABLES.noising_tables()
    f, mu, noise = _t((B, N * C), dtype), _t((N * C, B), dtype).t(), _t((B * N * R, C), dtype)
    t = torch.arange(B * N * R) * 97 % 1000
    return {
        "prepare": (ops.split_token_prepare.default, (f, mu, 0.9, torch.tensor([1, 0]), 0.3, t, noise, sab, s1m, C)),
        "prepare_plain": (ops.split_token_prepare.default, (f, None, 0.0, None, 1.0, t, noise, sab, s1m, C)),
    }


def _split_token_backward(dtype):
    M, W, U, C = 6, 7, 3, 4
    ci = torch.tensor([0, 2, 1, 2, 0, 0])
    go, x, h = _t((M, W), dtype), _t((M, W), dtype), _t((M, W), dtype)
    weight, bias = _t((W,), dtype), _t((W,), dtype)
    scale_u, shift_u, gate_u = _t((U, W), dtype), _t((U, W), dtype), _t((U, W), dtype)
    _, mean, rstd = ops.adaln_modulate(x, weight, bias, shift_u, scale_u, ci, 1e-6)
    _, mean_plain, rstd_plain = ops.adaln_modulate(x, None, None, x, x, None, 1e-6)
    noise, t, x0 = _t((M, C), dtype), torch.tensor([0, 5, 999, 0, 500, 1]), _t((M // 2, C), dtype)
    coefs = T_TABLES.loss_coefs()
    mo_eps, mo_learned = _t((M, C), dtype), _t((M, 2 * C), dtype)
    loss, _ = ops.diffusion_loss(mo_learned, noise, t, x0, coefs, True)
    grad_loss = torch.randn(M, dtype=loss.dtype)
    return {
        "adaln_bw_affine_cond": (ops.adaln_modulate_backward.default,
                                 (go, x, weight, bias, scale_u, ci, mean, rstd)),
        "adaln_bw_plain": (ops.adaln_modulate_backward.default, (go, x, None, None, x, None, mean_plain, rstd_plain)),
        "gated_bw": (ops.gated_residual_backward.default, (go, h, x, None)),
        "gated_bw_cond": (ops.gated_residual_backward.default, (go, gate_u, h, ci)),
        "loss_bw_epsilon": (ops.diffusion_loss_backward.default, (grad_loss, mo_eps, noise, t, None, coefs, False)),
        "loss_bw_learned": (ops.diffusion_loss_backward.default, (grad_loss, mo_learned, noise, t, x0, coefs, True)),
    }


_FORWARD_NAMES = ["adaln_affine", "adaln_weight_cond", "adaln_plain_cond", "gated", "gated_cond", "loss_epsilon",
                  "loss_learned", "cond_rows_sum"]
_BACKWARD_NAMES = ["adaln_bw_affine_cond", "adaln_bw_plain", "gated_bw", "gated_bw_cond", "loss_bw_epsilon",
                   "loss_bw_learned"]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", _FORWARD_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_split_token(dtype, name, requires_grad):
    op, args = _split_token_forward(dtype, requires_grad)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["prepare", "prepare_plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_opcheck_split_token_prepare(dtype, name):
    op, args = _split_token_prepare_samples(dtype)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", _BACKWARD_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_opcheck_split_token_backward(dtype, name):
    op, args = _split_token_backward(dtype)[name]
    torch.library.opcheck(op, args)
