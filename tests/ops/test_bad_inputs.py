"""Bad input fails with a message naming the op and the argument, on both the functional
API (either path) and the raw torch.ops (C++ checks)."""
import pytest
import torch

import ddg_ops

x = torch.randn(2, 3, 4)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ddg_ops.cfg_combine(x, torch.randn(2, 3, 5), 7.5), ValueError, "cfg_combine: 'cond' must have the shape"),
    (lambda: ddg_ops.cfg_combine(x, x.double(), 7.5), TypeError, "cfg_combine: 'cond' must have the dtype"),
    (lambda: ddg_ops.cfg_combine(x, x.to("meta"), 7.5), ValueError, "cfg_combine: 'cond' must be on the device"),
    (lambda: ddg_ops.cfg_combine(x.long(), x.long(), 7.5), TypeError, "cfg_combine: 'uncond' must be float32"),
    (lambda: ddg_ops.cfg_combine(torch.tensor(1.0), torch.tensor(1.0), 7.5), ValueError, "leading batch dimension"),
    (lambda: ddg_ops.cfg_combine(x.numpy(), x, 7.5), TypeError, "'uncond' must be a torch.Tensor"),
    (lambda: ddg_ops.cfg_combine(x, x, "7.5"), TypeError, "'scale' must be a number or a tensor"),
    (lambda: ddg_ops.cfg_combine(x, x, float("nan")), ValueError, "'scale' must be finite"),
    (lambda: ddg_ops.cfg_combine(x, x, torch.ones(3)), ValueError, r"'scale' must be .* shape \[2\]"),
    (lambda: ddg_ops.cfg_combine(x, x, torch.ones(2, dtype=torch.long)), TypeError, "'scale' must be a floating"),
    (lambda: ddg_ops.cfg_combine(x, x, 7.5, rescale=1.5), ValueError, r"'rescale' must be in \[0.0, 1.0\]"),
    (lambda: ddg_ops.cfg_step(x, x, x, 7.5, update="ddpm", coef_t=0.5, coef_next=0.6), ValueError,
     "cfg_step: 'update' must be one of"),
    (lambda: ddg_ops.cfg_step(x, x, x, 7.5, update="ddim_epsilon", coef_t=0.0, coef_next=0.6), ValueError,
     r"'coef_t' must be in \(0.0, 1.0\]"),
    (lambda: ddg_ops.cfg_step(x, x, x[:1], 7.5, update="euler", coef_t=1.0, coef_next=0.5), ValueError,
     "cfg_step: 'cond' must have the shape of 'sample'"),
    (lambda: ddg_ops.ddim_cfg_step(x, x, x, 7.5, 0.5, 0.6, prediction_type="sample"), ValueError,
     "'prediction_type' must be one of"),
    (lambda: ddg_ops.dmd_grad(x, x, x, x, 3.5, prediction="epsilon"), ValueError, "needs 'x_t'"),
    (lambda: ddg_ops.dmd_grad(x, x, x, x, 3.5, x_t=x), ValueError, "only used with prediction='epsilon'"),
    (lambda: ddg_ops.dmd_grad(x, x, x, x, 3.5, prediction="sample"), ValueError, "'prediction' must be one of"),
    (lambda: ddg_ops.dmd_grad(x, x, x, x.half(), 3.5), TypeError, "dmd_grad: 'fake' must have the dtype"),
    (lambda: ddg_ops.dmd_grad(x, x, x, x, 3.5, prediction="epsilon", x_t=x, alpha_bar=torch.ones(5)),
     ValueError, r"'alpha_bar' must be .* shape \[2\]"),
    (lambda: ddg_ops.dmd_grad(x, x, x, x, 3.5, prediction="epsilon", x_t=x, alpha_bar=0.0),
     ValueError, r"'alpha_bar' must be in \(0.0, 1.0\]"),
])
def test_functional_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


ops = torch.ops.ddg


@pytest.mark.requires_ext
@pytest.mark.parametrize("call,match", [
    (lambda: ops.cfg_combine(x, torch.randn(2, 3, 5), 7.5, None, 0.0), r"ddg.cfg_combine: 'cond' must have the shape"),
    (lambda: ops.cfg_combine(x, x.half(), 7.5, None, 0.0), "ddg.cfg_combine: 'cond' must have the dtype"),
    (lambda: ops.cfg_combine(x.int(), x.int(), 7.5, None, 0.0), "ddg.cfg_combine: 'uncond' must be float32"),
    (lambda: ops.cfg_combine(x, x, 7.5, torch.ones(3), 0.0), r"'scale_per_sample' must have shape \[2\]"),
    (lambda: ops.cfg_combine(x, x, 7.5, None, -0.1), r"'rescale' \(guidance rescale phi\) must be in \[0, 1\]"),
    (lambda: ops.cfg_combine(x, x, float("inf"), None, 0.0), "'scale' must be finite"),
    (lambda: ops.cfg_combine_backward(x, x, x, 7.5, None, 0.5, torch.empty(0, 4)), r"'stats' must have shape \[2, 4\]"),
    (lambda: ops.cfg_step(x, x, x, 7.5, None, 0.0, "heun", 0.5, 0.5, None), "ddg.cfg_step: 'update' must be"),
    (lambda: ops.cfg_step(x, x, x, 7.5, None, 0.0, "ddim_epsilon", 1.5, 0.5, None), r"'coef_t' \(alpha_bar at t\)"),
    (lambda: ops.cfg_step(x, x, x, 7.5, None, 0.0, "euler", 0.5, 0.5, torch.ones(2)), r"'coef_per_sample' must have shape \[2, 2\]"),
    (lambda: ops.dmd_grad(x, x, x, x, 3.5, None, "epsilon", None, None), "ddg.dmd_grad: prediction='epsilon' needs"),
    (lambda: ops.dmd_grad(x, x, x, x, 3.5, None, "score", None, None), "'prediction' must be 'velocity' or 'epsilon'"),
    (lambda: ops.dmd_grad_backward(torch.ones(2), x, torch.float32), "'grad_loss' must be a 0-D tensor"),
    (lambda: ops.dmd_grad_backward(torch.ones(()), x, torch.float64), "'grad' must be Double for dtype Double"),
])
def test_raw_ops_reject_bad_input(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ------------------------------------------------------------------------------ split-token ops

_sched = ddg_ops.GaussianDiffusionSchedule.named("cosine")
SAB, S1M = _sched.noising_tables()
COEFS = _sched.loss_coefs()
f = torch.randn(2, 12)  # B = 2, D = 12: N = 3 tokens of C = 4
t6 = torch.arange(6) * 100
eps6 = torch.randn(6, 4)
rows = torch.randn(5, 7)  # M = 5 rows of W = 7
ci = torch.tensor([0, 1, 1, 0, 2])


def _prepare(**kw):
    args = dict(features=f, timesteps=t6, noise=eps6, sqrt_alpha_bar=SAB, sqrt_one_minus_alpha_bar=S1M, token_size=4)
    args.update(kw)
    return ddg_ops.split_token_prepare(**args)


def _loss(**kw):
    args = dict(model_output=torch.randn(6, 8), noise=eps6, timesteps=t6, loss_coefs=COEFS, x0=torch.randn(3, 4))
    args.update(kw)
    return ddg_ops.diffusion_loss(**args)


@pytest.mark.parametrize("call,error,match", [
    # split_token_prepare
    (lambda: _prepare(features=f.numpy()), TypeError, "split_token_prepare: 'features' must be a torch.Tensor"),
    (lambda: _prepare(features=f.long()), TypeError, "split_token_prepare: 'features' must be float32"),
    (lambda: _prepare(features=f.reshape(2, 3, 4)), ValueError, "split_token_prepare: 'features' must be 2-D"),
    (lambda: _prepare(token_size=0), ValueError, "split_token_prepare: 'token_size' must be a positive int"),
    (lambda: _prepare(token_size=4.0), ValueError, "'token_size' must be a positive int"),
    (lambda: _prepare(token_size=True), ValueError, "'token_size' must be a positive int"),
    (lambda: _prepare(token_size=5), ValueError, "split_token_prepare: the feature dim 12 of 'features' must be a "
                                                 "multiple of token_size=5"),
    (lambda: _prepare(timesteps=[0] * 6), TypeError, "split_token_prepare: 'timesteps' must be a torch.Tensor"),
    (lambda: _prepare(timesteps=t6.int()), ValueError, "split_token_prepare: 'timesteps' must be a 1-D int64"),
    (lambda: _prepare(timesteps=t6[None]), ValueError, "'timesteps' must be a 1-D int64"),
    (lambda: _prepare(timesteps=t6.to("meta")), ValueError, "'timesteps' must be a 1-D int64 tensor on cpu"),
    (lambda: _prepare(timesteps=t6[:5], noise=eps6[:5]), ValueError,
     r"split_token_prepare: len\(timesteps\)=5 must be a positive multiple of B\*N = 2\*3"),
    (lambda: _prepare(features=f[:0], timesteps=t6[:0], noise=eps6[:0]), ValueError, r"multiple of B\*N = 0\*3"),
    (lambda: _prepare(noise=eps6.double()), TypeError, "split_token_prepare: 'noise' must have dtype"),
    (lambda: _prepare(noise=eps6[:, :3]), ValueError, r"split_token_prepare: 'noise' must have shape \(6, 4\)"),
    (lambda: _prepare(noise=eps6.to("meta")), ValueError, "split_token_prepare: 'noise' must be on cpu"),
    (lambda: _prepare(noise=eps6.reshape(-1)), ValueError, "'noise' must be 2-D"),
    (lambda: _prepare(sqrt_alpha_bar=SAB[None]), ValueError, "split_token_prepare: 'sqrt_alpha_bar' must be 1-D"),
    (lambda: _prepare(sqrt_alpha_bar=SAB.long()), TypeError, "'sqrt_alpha_bar' must be float32"),
    (lambda: _prepare(sqrt_one_minus_alpha_bar=S1M[:10]), ValueError,
     r"split_token_prepare: 'sqrt_one_minus_alpha_bar' must have shape \(1000,\)"),
    (lambda: _prepare(sqrt_one_minus_alpha_bar=S1M.to("meta")), ValueError, "'sqrt_one_minus_alpha_bar' must be on"),
    (lambda: _prepare(contraction="0.9"), TypeError, "split_token_prepare: 'contraction' must be a number"),
    (lambda: _prepare(contraction=float("nan")), ValueError, "split_token_prepare: 'contraction' must be finite"),
    (lambda: _prepare(mix=float("inf")), ValueError, "split_token_prepare: 'mix' must be finite"),
    (lambda: _prepare(mix=torch.tensor(0.5)), TypeError, "'mix' must be a number"),
    (lambda: _prepare(prototypes=torch.randn(2, 8)), ValueError,
     r"split_token_prepare: 'prototypes' must have shape \(2, 12\)"),
    (lambda: _prepare(prototypes=f.half()), TypeError, "split_token_prepare: 'prototypes' must have dtype"),
    (lambda: _prepare(permutation=torch.tensor([1, 0, 2])), ValueError,
     r"split_token_prepare: 'permutation' must be an int64 tensor of shape \[2\]"),
    (lambda: _prepare(permutation=torch.tensor([1, 0], dtype=torch.int32)), ValueError,
     "'permutation' must be an int64"),
    (lambda: _prepare(permutation=torch.tensor([1, 0], device="meta")), ValueError, "'permutation' must be on"),
    (lambda: _prepare(features=f.clone().requires_grad_()), ValueError,
     "split_token_prepare: 'features' is treated as a constant"),
    (lambda: _prepare(noise=eps6.clone().requires_grad_()), ValueError, "'noise' is treated as a constant"),
    (lambda: _prepare(prototypes=f.clone().requires_grad_()), ValueError, "'prototypes' is treated as a constant"),
    # adaln_modulate
    (lambda: ddg_ops.adaln_modulate(rows[None], rows, rows), ValueError, "adaln_modulate: 'x' must be 2-D"),
    (lambda: ddg_ops.adaln_modulate(rows.long(), rows, rows), TypeError, "adaln_modulate: 'x' must be float32"),
    (lambda: ddg_ops.adaln_modulate(rows, rows.half(), rows), TypeError, "adaln_modulate: 'shift' must have dtype"),
    (lambda: ddg_ops.adaln_modulate(rows, rows, rows.to("meta")), ValueError, "adaln_modulate: 'scale' must be on"),
    (lambda: ddg_ops.adaln_modulate(rows, rows[:4], rows), ValueError,
     r"adaln_modulate: 'shift' must be \[5, 7\] like 'x', got \(4, 7\)"),
    (lambda: ddg_ops.adaln_modulate(rows, rows, rows[:, :6]), ValueError, r"adaln_modulate: 'scale' must be \[5, 7\]"),
    (lambda: ddg_ops.adaln_modulate(rows, rows, rows[0]), ValueError, "adaln_modulate: 'scale' must be 2-D"),
    (lambda: ddg_ops.adaln_modulate(rows, rows[:3, :6], rows[:3], cond_index=ci), ValueError,
     r"adaln_modulate: 'shift' must be \[U, 7\] rows picked by 'cond_index'"),
    (lambda: ddg_ops.adaln_modulate(rows, rows[:3], rows[:3], cond_index=ci.int()), ValueError,
     r"adaln_modulate: 'cond_index' must be an int64 tensor of shape \[5\]"),
    (lambda: ddg_ops.adaln_modulate(rows, rows[:3], rows[:3], cond_index=ci[:4]), ValueError,
     r"'cond_index' must be an int64 tensor of shape \[5\]"),
    (lambda: ddg_ops.adaln_modulate(rows, rows[:3], rows[:3], cond_index=ci.tolist()), TypeError,
     "adaln_modulate: 'cond_index' must be a torch.Tensor"),
    (lambda: ddg_ops.adaln_modulate(rows, rows[:3], rows[:3], cond_index=ci.to("meta")), ValueError,
     "adaln_modulate: 'cond_index' must be on cpu"),
    (lambda: ddg_ops.adaln_modulate(rows, rows, rows, torch.ones(6)), ValueError,
     r"adaln_modulate: 'weight' must have shape \(7,\)"),
    (lambda: ddg_ops.adaln_modulate(rows, rows, rows, torch.ones(7), torch.zeros(7).double()), TypeError,
     "adaln_modulate: 'bias' must have dtype"),
    (lambda: ddg_ops.adaln_modulate(rows, rows, rows, torch.ones(1, 7)), ValueError, "'weight' must be 1-D"),
    (lambda: ddg_ops.adaln_modulate(rows, rows, rows, eps=0.0), ValueError, "adaln_modulate: 'eps' must be positive"),
    (lambda: ddg_ops.adaln_modulate(rows, rows, rows, eps=float("nan")), ValueError, "'eps' must be finite"),
    (lambda: ddg_ops.adaln_modulate(rows, rows, rows, eps="1e-6"), TypeError, "adaln_modulate: 'eps' must be a number"),
    # gated_residual
    (lambda: ddg_ops.gated_residual(rows, rows, rows[:4]), ValueError,
     r"gated_residual: 'h' must have shape \(5, 7\) \(like 'x'\)"),
    (lambda: ddg_ops.gated_residual(rows, rows, rows.double()), TypeError, "gated_residual: 'h' must have dtype"),
    (lambda: ddg_ops.gated_residual(rows.int(), rows, rows), TypeError, "gated_residual: 'x' must be float32"),
    (lambda: ddg_ops.gated_residual(rows, rows[:3], rows), ValueError, r"gated_residual: 'gate' must be \[5, 7\]"),
    (lambda: ddg_ops.gated_residual(rows, rows.bfloat16(), rows), TypeError, "gated_residual: 'gate' must have dtype"),
    (lambda: ddg_ops.gated_residual(rows, rows[:3, :2], rows, cond_index=ci), ValueError,
     r"gated_residual: 'gate' must be \[U, 7\] rows picked by 'cond_index'"),
    (lambda: ddg_ops.gated_residual(rows, rows[:3], rows, cond_index=ci[None]), ValueError,
     "gated_residual: 'cond_index' must be an int64 tensor"),
    # diffusion_loss
    (lambda: _loss(noise=eps6[0]), ValueError, "diffusion_loss: 'noise' must be 2-D"),
    (lambda: _loss(noise=eps6.long()), TypeError, "diffusion_loss: 'noise' must be float32"),
    (lambda: _loss(model_output=torch.randn(6, 8).double()), TypeError,
     "diffusion_loss: 'model_output' must have dtype"),
    (lambda: _loss(model_output=torch.randn(6, 8, device="meta")), ValueError, "'model_output' must be on cpu"),
    (lambda: _loss(model_output=torch.randn(6, 5)), ValueError,
     r"diffusion_loss: 'model_output' must have shape \(6, 4\) \(eps_hat per row\)"),
    (lambda: _loss(model_output=torch.randn(6, 4), learned_variance=True), ValueError,
     r"diffusion_loss: 'model_output' must have shape \(6, 8\) \(\[eps_hat, v\] per row\)"),
    (lambda: _loss(model_output=torch.randn(5, 8)), ValueError, r"'model_output' must have shape \(6, 8\)"),
    (lambda: _loss(timesteps=t6[:5]), ValueError,
     r"diffusion_loss: 'timesteps' must be an int64 tensor of shape \[6\]"),
    (lambda: _loss(timesteps=t6.float()), ValueError, "diffusion_loss: 'timesteps' must be an int64"),
    (lambda: _loss(timesteps=t6.to("meta")), ValueError, "diffusion_loss: 'timesteps' must be on cpu"),
    (lambda: _loss(loss_coefs=COEFS[:, :2]), ValueError, r"diffusion_loss: 'loss_coefs' must be \[T, 3\]"),
    (lambda: _loss(loss_coefs=COEFS[:0]), ValueError, r"'loss_coefs' must be \[T, 3\]"),
    (lambda: _loss(loss_coefs=COEFS[:, 0]), ValueError, "diffusion_loss: 'loss_coefs' must be 2-D"),
    (lambda: _loss(loss_coefs=COEFS.long()), TypeError, "diffusion_loss: 'loss_coefs' must be float32"),
    (lambda: _loss(loss_coefs=COEFS.to("meta")), ValueError, "diffusion_loss: 'loss_coefs' must be on cpu"),
    (lambda: _loss(x0=None), ValueError, "diffusion_loss: learned_variance needs 'x0'"),
    (lambda: _loss(x0=torch.randn(4, 4)), ValueError, r"diffusion_loss: 'x0' must be \[M0, 4\] with M = 6 a multiple"),
    (lambda: _loss(x0=torch.randn(3, 5)), ValueError, r"'x0' must be \[M0, 4\]"),
    (lambda: _loss(x0=torch.randn(0, 4)), ValueError, r"'x0' must be \[M0, 4\]"),
    (lambda: _loss(x0=torch.randn(3, 4).half()), TypeError, "diffusion_loss: 'x0' must have dtype"),
    (lambda: _loss(x0=torch.randn(3)), ValueError, "diffusion_loss: 'x0' must be 2-D"),
    (lambda: _loss(reduction="sum"), ValueError, "diffusion_loss: 'reduction' must be 'mean' or 'none'"),
    (lambda: _loss(noise=eps6.clone().requires_grad_()), ValueError,
     "diffusion_loss: 'noise' is treated as a constant"),
    (lambda: _loss(x0=torch.randn(3, 4, requires_grad=True)), ValueError, "diffusion_loss: 'x0' is treated as"),
])
def test_split_token_functional_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.requires_ext
@pytest.mark.parametrize("call,match", [
    (lambda: ops.split_token_prepare(f, None, 0.0, None, 1.0, t6, eps6[:, :3], SAB, S1M, 4),
     r"ddg\.split_token_prepare: .*'noise'"),
    (lambda: ops.split_token_prepare(f, torch.randn(2, 8), 0.9, None, 1.0, t6, eps6, SAB, S1M, 4),
     r"ddg\.split_token_prepare: .*'prototypes'"),
    (lambda: ops.split_token_prepare(f, None, 0.0, torch.tensor([0, 1, 2]), 0.5, t6, eps6, SAB, S1M, 4),
     r"ddg\.split_token_prepare: .*'permutation'"),
    (lambda: ops.split_token_prepare(f, None, 0.0, None, 1.0, t6.int(), eps6, SAB, S1M, 4),
     r"ddg\.split_token_prepare: .*'timesteps'"),
    (lambda: ops.adaln_modulate(rows, None, None, rows[:4], rows, None, 1e-6), r"ddg\.adaln_modulate: .*'shift'"),
    (lambda: ops.adaln_modulate(rows, torch.ones(7).double(), None, rows, rows, None, 1e-6),
     r"ddg\.adaln_modulate: .*'weight'"),
    (lambda: ops.adaln_modulate(rows, None, None, rows[:3], rows[:3], ci.int(), 1e-6),
     r"ddg\.adaln_modulate: .*'cond_index'"),
    (lambda: ops.adaln_modulate_backward(rows, rows, None, None, rows, None, torch.zeros(4), torch.ones(4)),
     r"ddg\.adaln_modulate_backward: .*'(mean|rstd)'"),
    (lambda: ops.gated_residual(rows, rows, rows[:, :6], None), r"ddg\.gated_residual: .*'h'"),
    (lambda: ops.gated_residual(rows, rows[:3, :6], rows, ci), r"ddg\.gated_residual: .*'gate'"),
    (lambda: ops.gated_residual_backward(rows, rows.double(), rows, None), r"ddg\.gated_residual_backward: .*'gate'"),
    (lambda: ops.diffusion_loss(torch.randn(6, 8), eps6, t6, None, COEFS[:, :2], True),
     r"ddg\.diffusion_loss: .*'(loss_coefs|x0)'"),
    (lambda: ops.diffusion_loss(torch.randn(6, 8), eps6, t6, torch.randn(3, 4), COEFS[:, :2], True),
     r"ddg\.diffusion_loss: .*'loss_coefs'"),
    (lambda: ops.diffusion_loss(torch.randn(6, 5), eps6, t6, None, COEFS, False),
     r"ddg\.diffusion_loss: .*'model_output'"),
    (lambda: ops.diffusion_loss_backward(torch.ones(5), torch.randn(6, 4), eps6, t6, None, COEFS, False),
     r"ddg\.diffusion_loss_backward: .*'grad_loss'"),
    # Index ranges (the functional API leaves them to the kernels). The CPU kernels raise; the
    # CUDA kernels' device asserts abort the process, so under the CUDA emulator these are
    # skipped and tests/cuda_emu/test_device_asserts.py checks the asserts in a subprocess.
    pytest.param(lambda: ops.split_token_prepare(f, None, 0.0, None, 1.0, t6 + 500, eps6, SAB, S1M, 4),
                 r"ddg\.split_token_prepare: 'timesteps' .*out of range", marks=pytest.mark.cpu_kernel_only),
    pytest.param(lambda: ops.split_token_prepare(f, None, 0.0, torch.tensor([0, -1]), 0.5, t6, eps6, SAB, S1M, 4),
                 r"ddg\.split_token_prepare: 'permutation' .*out of range", marks=pytest.mark.cpu_kernel_only),
    pytest.param(lambda: ops.diffusion_loss(torch.randn(6, 8), eps6, t6 - 1, torch.randn(3, 4), COEFS, True),
                 r"ddg\.diffusion_loss: 'timesteps' .*out of range", marks=pytest.mark.cpu_kernel_only),
    pytest.param(lambda: ops.adaln_modulate(rows, None, None, rows[:2], rows[:2], ci, 1e-6),
                 r"ddg(\.adaln_modulate)?: 'cond_index' .*out of range", marks=pytest.mark.cpu_kernel_only),
    pytest.param(lambda: ops.gated_residual(rows, rows[:2], rows, ci),
                 r"ddg(\.gated_residual)?: 'cond_index' .*out of range", marks=pytest.mark.cpu_kernel_only),
])
def test_split_token_raw_ops_reject_bad_input(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
