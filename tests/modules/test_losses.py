import pytest
import torch

import ddg_ops
from ddg_losses import DistributionMatchingLoss


@pytest.mark.parametrize("prediction", ["velocity", "epsilon"])
def test_dmd_loss_module_equals_functional(prediction):
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    u, c, f, xt = (torch.randn(2, 4, 8, 8) for _ in range(4))
    kw = dict(x_t=xt, alpha_bar=torch.tensor([0.3, 0.8])) if prediction == "epsilon" else {}
    module = DistributionMatchingLoss(3.5, prediction)
    out = module(x, u, c, f, **kw)
    expected = ddg_ops.dmd_grad(x, u, c, f, 3.5, prediction=prediction, **kw)
    torch.testing.assert_close(out.loss, expected.loss)
    (g,) = torch.autograd.grad(out.loss, x)
    torch.testing.assert_close(g, expected.grad / x.numel())
    assert "guidance_scale=3.5" in repr(module) and module.state_dict() == {}


def test_dmd_loss_module_rejects_unknown_prediction():
    with pytest.raises(ValueError, match="'prediction' must be one of"):
        DistributionMatchingLoss(3.5, "sample")
