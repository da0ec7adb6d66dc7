"""Shared test helpers. The tolerance table, layouts and comparisons live in ddg_ops.testing,
where ``python -m ddg_ops.selftest`` uses the same ones."""
from __future__ import annotations

import torch

from ddg_ops.testing import DTYPES, LAYOUTS, TOLERANCES, assert_close, magnitude, make  # noqa: F401


def grads(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
