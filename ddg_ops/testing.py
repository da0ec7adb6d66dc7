"""What the test suite and ``python -m ddg_ops.selftest`` share: the per-dtype tolerance table,
input layouts, and comparisons that say how far a result is from its reference.

Kept in the library (not under tests/) so the self-test shipped with a wheel judges the kernels
by exactly the tolerances the tests use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

# atol, rtol per dtype (docs/selftest.md, "Tolerances"). fp32/fp64 results are compared with a
# reference that accumulates in fp32/fp64 (or fp64); fp16/bf16 outputs differ by output rounding.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

LAYOUTS = ["contiguous", "channels_last", "sliced", "batch_not_outer", "mixed"]


@dataclass(frozen=True)
class Difference:
    """How far ``actual`` is from ``expected``: the largest absolute and relative errors and the
    allowance (atol already scaled by the data's magnitude, rtol) the comparison used."""
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    worst_index: tuple
    bad: int    # elements outside atol + rtol * |expected|
    total: int

    def __str__(self) -> str:
        return (f"max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g} vs atol {self.atol:.3g}, "
                f"rtol {self.rtol:.3g}: {self.bad}/{self.total} elements outside, worst at {self.worst_index}")


def magnitude(*tensors: torch.Tensor) -> float:
    """Largest finite |value| (at least 1): absolute errors of fp32 math grow with it."""
    values = [1.0]
    for t in tensors:
        if t is not None and t.numel():
            largest = float(t.detach().abs().max())
            if not math.isfinite(largest):
                finite = t.detach()[torch.isfinite(t.detach())]
                largest = float(finite.abs().max()) if finite.numel() else 1.0
            values.append(largest)
    return max(values)


def difference(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None,
               scale: float = 1.0) -> Optional[Difference]:
    """None when ``actual`` matches ``expected`` within TOLERANCES[dtype] (atol scaled by ``scale``;
    NaN matches NaN, an infinity the same infinity), else the Difference. Shapes must agree."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise ValueError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    atol *= scale
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    # torch.isclose's rule (NaN == NaN, an infinity equals itself) in fewer passes over the data.
    close = (a - e).abs() <= atol + rtol * e.abs()
    if bool(close.all()):
        return None
    close |= (a == e) | (a.isnan() & e.isnan())
    if bool(close.all()):
        return None
    err = (a - e).abs()
    err = torch.where(close, torch.zeros_like(err), torch.nan_to_num(err, nan=float("inf")))
    flat = int(err.argmax())
    rel = err / e.abs()
    worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(a.shape))) if a.ndim else ()
    return Difference(float(err.max()), float(torch.nan_to_num(rel, nan=0.0).max()), atol, rtol, worst,
                      int((~close).sum()), a.numel())


def leaves(inputs: Dict[str, object], differentiable: Sequence[str], fp64: bool) -> Dict[str, object]:
    """Detached copies (fp64 ones for the reference) of the floating inputs; those named in
    ``differentiable`` require grad. The kernel side keeps the strides of the input's layout."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(torch.float64, copy=True) if fp64 else value.detach()
            if name in differentiable:
                value.requires_grad_()
        out[name] = value
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, scale: float = 1.0,
                 msg: str = "") -> None:
    """assert_close with the dtype's tolerances, atol scaled by the magnitude of the data."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{msg}\n{m}")


def make(shape, dtype, layout: str = "contiguous", index: int = 0, device="cpu", scale: float = 1.0,
         offset: float = 0.0) -> torch.Tensor:
    """A random tensor ``scale * N(0, 1) + offset`` of ``shape`` stored with the given memory layout
    (values are layout-independent): contiguous; channels_last (4-D); sliced (non-dense, every other
    element of the last dim); batch_not_outer (dense, dims 0 and 1 transposed: column-major for 2-D);
    mixed (sliced for odd ``index``, else contiguous)."""
    def draw(*size):
        return torch.randn(*size, device=device) * scale + offset

    if layout == "channels_last" and len(shape) == 4:
        return draw(*shape).to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        big = draw(*shape[:-1], shape[-1] * 2) if shape else draw(2)
        return big.to(dtype)[..., ::2]
    if layout == "batch_not_outer" and len(shape) >= 2:
        return draw(shape[1], shape[0], *shape[2:]).to(dtype).transpose(0, 1)
    if layout == "mixed" and index % 2 == 1:
        return make(shape, dtype, "sliced", device=device, scale=scale, offset=offset)
    return draw(*shape).to(dtype)
