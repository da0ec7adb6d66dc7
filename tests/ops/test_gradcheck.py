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
