"""fp64 gradcheck of every registry row's gradcheck samples (kernel path); a row without samples
says why (OpInfo.no_gradcheck)."""
import pytest
import torch
from torch.autograd import gradcheck

import ddg_ops
from ddg_ops.op_registry import REGISTRY

pytestmark = pytest.mark.requires_ext

SAMPLES = [pytest.param(sample, id=f"{row.name}-{sample.id}") for row in REGISTRY for sample in row.gradcheck()]


@pytest.mark.parametrize("sample", SAMPLES)
def test_gradcheck(sample):
    assert gradcheck(sample.fn, sample.inputs())


@pytest.mark.parametrize("row", [r for r in REGISTRY if not list(r.gradcheck())], ids=lambda r: r.name)
def test_a_row_without_gradcheck_says_why(row):
    assert row.no_gradcheck


def test_backward_ops_raise_on_double_backward():
    u, c = (torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = ddg_ops.cfg_combine(u, c, 7.5, 0.5)
    gu, _ = torch.autograd.grad(out.sum(), (u, c), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gu.sum().backward()
