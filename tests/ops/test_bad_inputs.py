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
