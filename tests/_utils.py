"""Shared test helpers. The tolerance table, layouts and comparisons live in ddg_ops.testing,
where ``python -m ddg_ops.selftest`` uses the same ones."""
from __future__ import annotations

import pytest
import torch

from ddg_ops.testing import DTYPES, LAYOUTS, TOLERANCES, assert_close, magnitude, make  # noqa: F401


def grads(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def _cuda_kernel_device():
    import ddg_ops

    e = ddg_ops.EXTENSION
    if torch.cuda.is_available() and "cuda" in e.device_types:
        return "cuda"
    if e.loaded and "cuda-emulator" in e.build_info.get("backends", []):
        return "cpu"
    return None


# Device whose tensors run the csrc/cuda kernels: "cuda" with a GPU and the CUDA build, "cpu" under
# the CUDA emulator (DDG_CUDA_EMULATOR, tests/cuda_emu), None otherwise (tests marked cuda_kernels skip).
KERNEL_DEVICE = _cuda_kernel_device()
EMULATED = KERNEL_DEVICE == "cpu"
# Largest case per test the emulator runs in every dtype; larger ones run in fp32 only (CI time).
EMULATOR_FULL_DTYPE_NUMEL = 1 << 18


def emulator_size_limit(dtype: torch.dtype, numel: int) -> None:
    """Skips a large non-fp32 case under the CUDA emulator (the fp32 case of the same size runs)."""
    if EMULATED and numel > EMULATOR_FULL_DTYPE_NUMEL and dtype != torch.float32:
        pytest.skip(f"{numel} elements under the CUDA emulator: run in fp32 only (CI time)")
