"""Shared test helpers: tolerance table, input layouts, verbose comparisons."""
from __future__ import annotations

import pytest
import torch

# atol, rtol per dtype (specs/kernels.md §7). fp32/fp64 results are compared to a reference
# that also accumulates in fp32/fp64; fp16/bf16 outputs differ by output rounding.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, scale: float = 1.0,
                 msg: str = "") -> None:
    """assert_close with the dtype's tolerances, atol scaled by the magnitude of the data."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{msg}\n{m}")


def magnitude(*tensors: torch.Tensor) -> float:
    """Largest |value| (at least 1): absolute errors of fp32 math grow with it."""
    return max([1.0] + [float(t.detach().abs().max()) for t in tensors if t.numel()])


LAYOUTS = ["contiguous", "channels_last", "sliced", "batch_not_outer", "mixed"]


def make(shape, dtype, layout: str = "contiguous", index: int = 0, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """A random tensor of `shape` stored with the given memory layout (values are layout-independent)."""
    if layout == "channels_last" and len(shape) == 4:
        return (torch.randn(shape, device=device) * scale).to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # non-dense: every other element of the last dim
        big = torch.randn(*shape[:-1], shape[-1] * 2, device=device) * scale if shape else torch.randn(2)
        return big.to(dtype)[..., ::2]
    if layout == "batch_not_outer" and len(shape) >= 2:  # dense, but samples are not contiguous blocks
        return (torch.randn(shape[1], shape[0], *shape[2:], device=device) * scale).to(dtype).transpose(0, 1)
    if layout == "mixed" and index % 2 == 1:
        return make(shape, dtype, "sliced", device=device, scale=scale)
    return (torch.randn(shape, device=device) * scale).to(dtype)


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
