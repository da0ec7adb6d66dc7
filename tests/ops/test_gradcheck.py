"""fp64 gradcheck of the differentiable guidance ops (kernel path).

dmd_grad is not gradchecked: its loss is a stop-gradient surrogate (its numerical derivative
in x is not g/N by design); test_guidance.py checks its backward against the MSE trick.
"""
import pytest
import torch
from torch.autograd import gradcheck

import ddg_ops

pytestmark = pytest.mark.requires_ext


def _leaves(n, shape=(2, 3, 4, 5)):
    return [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(n)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("scale", [7.5, -1.0, "per_sample"])
def test_cfg_combine_gradcheck(scale, rescale, seed):
    torch.manual_seed(seed)
    s = torch.tensor([0.5, 7.5], dtype=torch.float64) if scale == "per_sample" else scale
    assert gradcheck(lambda u, c: ddg_ops.cfg_combine(u, c, s, rescale), _leaves(2))


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("update,coef_t,coef_next", [("ddim_epsilon", 0.2, 0.5), ("ddim_v_prediction", 0.4, 0.8),
                                                     ("euler", 0.9, 0.7)])
def test_cfg_step_gradcheck(update, coef_t, coef_next, rescale):
    kw = dict(update=update, coef_t=coef_t, coef_next=coef_next, rescale=rescale)
    assert gradcheck(lambda x, u, c: ddg_ops.cfg_step(x, u, c, 4.0, **kw), _leaves(3))


def test_cfg_step_gradcheck_channels_last_per_sample():
    x, u, c = (t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in _leaves(3))
    ab = torch.tensor([0.3, 0.6], dtype=torch.float64)
    assert gradcheck(lambda x, u, c: ddg_ops.cfg_step(x, u, c, torch.tensor([2.0, 5.0], dtype=torch.float64),
                                                      update="ddim_epsilon", coef_t=ab, coef_next=ab + 0.2,
                                                      rescale=0.5), (x, u, c))


def test_backward_ops_raise_on_double_backward():
    u, c = _leaves(2)
    out = ddg_ops.cfg_combine(u, c, 7.5, 0.5)
    gu, _ = torch.autograd.grad(out.sum(), (u, c), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gu.sum().backward()


# ------------------------------------------------------------------------------ split-token ops

T_LOSS = ddg_ops.GaussianDiffusionSchedule.named("cosine").loss_coefs()


def _cond(cond, M=5):
    """cond_index with U = 4 < M = 5 condition rows (row 3 unused), or per-row operands."""
    return (torch.tensor([0, 2, 0, 1, 2])[:M], 4) if cond else (None, M)


@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
@pytest.mark.parametrize("affine", ["affine", "weight_only", "none"])
def test_adaln_modulate_gradcheck(affine, cond):
    M, W = 5, 7
    ci, U = _cond(cond)
    x_cols = _leaves(1, (W, M))[0]      # x is passed transposed (column-major rows)
    proj = _leaves(1, (U, 3 * W))[0]    # shift/scale: column slices of one projection
    params = _leaves(2 if affine == "affine" else 1 if affine == "weight_only" else 0, (W,))

    def fn(x_cols, proj, *params):
        weight, bias = (list(params) + [None, None])[:2]
        return ddg_ops.adaln_modulate(x_cols.t(), proj[:, W:2 * W], proj[:, 2 * W:], weight, bias, eps=1e-5,
                                      cond_index=ci)

    assert gradcheck(fn, (x_cols, proj, *params))


@pytest.mark.parametrize("cond", [False, True], ids=["per_row", "cond_index"])
def test_gated_residual_gradcheck(cond):
    ci, U = _cond(cond)
    x, h = _leaves(2, (5, 6))
    proj = _leaves(1, (U, 18))[0]
    assert gradcheck(lambda x, proj, h: ddg_ops.gated_residual(x, proj[:, 6:12], h, cond_index=ci), (x, proj, h))


def test_cond_rows_sum_gradcheck():
    ci, U = _cond(True)
    (rows,) = _leaves(1, (5, 6))
    assert gradcheck(lambda r: torch.ops.ddg.cond_rows_sum(r, ci, U), (rows,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_diffusion_loss_epsilon_gradcheck(reduction):
    M, C = 6, 5
    noise = torch.randn(M, C, dtype=torch.float64)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    mo = (noise + 0.5 * torch.randn(M, C, dtype=torch.float64)).requires_grad_()
    assert gradcheck(lambda mo: ddg_ops.diffusion_loss(mo, noise, t, T_LOSS, reduction=reduction).loss, (mo,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("timesteps", [[3, 1, 17, 500, 998, 999], [0, 0, 0, 0, 0, 0], [0, 1, 0, 999, 0, 500]],
                         ids=["kl", "decoder_nll", "mixed"])
def test_diffusion_loss_learned_variance_gradcheck(timesteps, reduction):
    """Learned variance, w.r.t. the variance channels v. (The loss is a function of eps_hat whose
    gradient is by design the MSE's only -- the vb term sees sg(eps_hat) -- so its numerical
    derivative in eps_hat is not the op's gradient; test_split_token.py checks that part.)
    At t = 0 the decoder NLL runs with its clamps inactive: |x0 - mu_theta| is within a few bins
    and x0 stays clear of the +-0.999 bin edges (x0 is a constant anyway)."""
    M, C = 6, 5
    noise = torch.randn(M, C, dtype=torch.float64)
    eps_hat = noise + 0.3 * torch.randn(M, C, dtype=torch.float64)
    x0 = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.0], dtype=torch.float64).repeat(M // 2, 1)  # [M0, C], M0 = M / 2
    t = torch.tensor(timesteps)
    v = (0.5 * torch.randn(M, C, dtype=torch.float64)).requires_grad_()

    def fn(v):
        return ddg_ops.diffusion_loss(torch.cat([eps_hat, v], 1), noise, t, T_LOSS, x0,
                                      reduction=reduction).loss

    assert gradcheck(fn, (v,))
