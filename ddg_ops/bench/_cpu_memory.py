"""Peak CPU heap use of one call, for the benchmarks' peak-memory column on CPU.

PyTorch keeps no allocator statistics for CPU tensors, so this reads glibc's mallinfo2() (bytes
in use in the main arena + bytes in mmap'd chunks, where large tensors live): after every
dispatched op (a TorchDispatchMode, which sees the ops of eager code, custom ops and autograd's
backward alike) and from a background thread every ~0.2 ms (which also sees code that does not go
through the dispatcher, e.g. torch.compile's generated kernels; pass ``trace_ops=False`` for
those, so the mode does not change what runs). The result is the peak growth over the memory in
use before the call. Allocations in other threads' malloc arenas are not seen (tensors are
allocated by the calling thread). Unavailable (None) on non-glibc systems.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from typing import Callable, Optional

from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()
_SAMPLE_SECONDS = 2e-4


def _in_use() -> int:
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class _AfterEveryOp(TorchDispatchMode):
    def __init__(self, peak: list):
        super().__init__()
        self.peak = peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak[0] = max(self.peak[0], _in_use())
        return out


def cpu_peak_mem_mb(fn: Callable[[], object], trace_ops: bool = True) -> Optional[float]:
    """Peak growth of the CPU heap (MiB) during one call of ``fn``; None without glibc's mallinfo2."""
    if _MALLINFO2 is None:
        return None
    base = _in_use()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _in_use())
            time.sleep(_SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        if trace_ops:
            with _AfterEveryOp(peak):
                result = fn()
        else:
            result = fn()
        peak[0] = max(peak[0], _in_use())  # before the result (and what it holds) is released
        del result
    finally:
        done.set()
        sampler.join()
    return (peak[0] - base) / 2**20
