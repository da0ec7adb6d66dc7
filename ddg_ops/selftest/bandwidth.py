"""The self-test's bandwidth table: per op family, the median time of the fused kernel, the bytes a
perfect implementation moves, the GB/s that makes, and the same for a plain tensor copy of the same
number of bytes timed in the same run (the ceiling an elementwise kernel can hope for here).

Every family a registry row benches (ddg_ops.bench.FAMILIES) contributes its ddg_ops.bench cases
and byte counts (provider 'ddg').
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..bench.__main__ import FAMILIES
from ..bench._utils import time_fn

# Seconds of timing per kernel and per copy.
MIN_RUN_TIME = {"quick": 0.05, "full": 0.2}
DTYPES = {"quick": (torch.float32,), "full": (torch.float32, torch.bfloat16)}


@dataclass
class Row:
    family: str
    kernel: str
    mode: str
    dtype: str
    shape: str
    nbytes: int
    ms: float
    copy_ms: float
    # Largest p80/p20 of the kernel's and the copy's times: near 1 on a quiet machine; well above it
    # when other processes share the cores and the row says little.
    spread: float = 1.0

    @property
    def gbps(self) -> float:
        return self.nbytes / (self.ms * 1e-3) / 1e9

    @property
    def copy_gbps(self) -> float:
        return self.nbytes / (self.copy_ms * 1e-3) / 1e9

    @property
    def ratio(self) -> float:
        """Kernel GB/s over copy GB/s: 1.0 is the copy limit."""
        return self.copy_ms / self.ms

    def as_dict(self) -> Dict[str, object]:
        return {"family": self.family, "kernel": self.kernel, "mode": self.mode, "dtype": self.dtype,
                "shape": self.shape, "bytes": self.nbytes, "ms": round(self.ms, 6), "gb_per_s": round(self.gbps, 2),
                "copy_ms": round(self.copy_ms, 6), "copy_gb_per_s": round(self.copy_gbps, 2),
                "ratio_to_copy": round(self.ratio, 3), "spread_p80_p20": round(self.spread, 2)}


# ------------------------------------------------------------------------------ the table

def _largest(cases: Sequence[Tuple[str, Tuple[int, ...]]], kernel: str) -> Optional[Tuple[int, ...]]:
    shapes = [shape for k, shape in cases if k == kernel]
    return max(shapes, key=math.prod) if shapes else None


def _copy_times(nbytes: int, device, min_run_time: float) -> Tuple[float, float, float]:
    """(p50, p20, p80) ms of a same-device copy that reads nbytes / 2 and writes nbytes / 2."""
    src = torch.ones(max(nbytes // 8, 1), dtype=torch.float32, device=device)  # ones: touch the pages
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device, min_run_time)


def _bench_case(module, kernel: str, shape, mode: str, dtype: torch.dtype, device):
    """(step, bytes, shape) of one ddg_ops.bench case, provider 'ddg'."""
    case = module.Case(kernel, shape, dtype, mode, device)
    return case.step("ddg"), module.min_bytes(kernel, shape, dtype, mode), shape


def measure(device: torch.device, quick: bool, progress=None) -> List[Row]:
    """One row per (family, kernel, mode, dtype) at the largest shape its bench cases use (``quick``:
    the bench's --quick cases), each next to a copy of the same bytes timed in the same run."""
    level = "quick" if quick else "full"
    min_run_time = MIN_RUN_TIME[level]
    todo: List[Tuple[str, str, str, torch.dtype, Callable]] = []  # (family, kernel, mode, dtype, build)
    for family, module_name in FAMILIES.items():
        module = importlib.import_module(module_name)
        cases = module.cases(quick, device)
        for kernel in dict.fromkeys(k for k, _ in cases):
            shape = _largest(cases, kernel)
            for mode in getattr(module, "kernel_modes", lambda k: module.MODES)(kernel):
                for dtype in DTYPES[level]:
                    todo.append((family, kernel, mode, dtype, functools.partial(_bench_case, module, kernel, shape,
                                                                                mode, dtype, device)))
    table = []
    for family, kernel, mode, dtype, build in todo:
        step, nbytes, shape = build()
        step()  # warm-up (and first-touch of the outputs)
        ms, ms20, ms80 = time_fn(step, device, min_run_time)
        copy_ms, copy20, copy80 = _copy_times(nbytes, device, min_run_time)
        row = Row(family, kernel, mode, str(dtype).replace("torch.", ""), "x".join(map(str, shape)), nbytes, ms,
                  copy_ms, max(ms80 / ms20, copy80 / copy20))
        table.append(row)
        if progress:
            progress(row)
    return table
