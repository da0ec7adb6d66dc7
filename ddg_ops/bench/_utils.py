"""Timing, bandwidth, memory, correctness and CSV/table helpers shared by the benchmark families."""
from __future__ import annotations

import csv
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.benchmark as torch_benchmark

from .._ext import STATE as EXTENSION
from ._cpu_memory import cpu_peak_mem_mb

QUANTILES = (0.5, 0.2, 0.8)
# Relative tolerance of every provider against the oracle, elementwise, with an absolute floor
# of tol * max|oracle| so that values near zero in bf16/fp16 do not fail spuriously.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
# L2 flush buffer for the CUDA-event timer, larger than any current GPU's L2 (H100: 50 MB).
_CUDA_FLUSH_BYTES = 256 * 2**20


@dataclass
class Timing:
    """One provider's result for one case: (p50, p20, p80) ms, or a note saying why not."""
    ms: Optional[Tuple[float, float, float]] = None
    peak_mb: Optional[float] = None
    note: str = ""


# ---------------------------------------------------------------- timing

def _quantiles_ms(times_ms: Sequence[float]) -> Tuple[float, float, float]:
    t = torch.tensor(times_ms, dtype=torch.float64)
    return tuple(torch.quantile(t, q).item() for q in QUANTILES)


def _time_cuda_events(fn: Callable[[], object], min_run_time: float,
                      warmup: int = 10) -> Tuple[float, float, float]:
    """do_bench without triton: per-call CUDA events, L2 flushed before each call."""
    flush = torch.empty(_CUDA_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    probe = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    probe[0].record()
    for _ in range(5):
        flush.zero_()
        fn()
    probe[1].record()
    torch.cuda.synchronize()
    n = max(5, int(min_run_time * 1e3 / max(probe[0].elapsed_time(probe[1]) / 5, 1e-3)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _quantiles_ms([start.elapsed_time(end) for start, end in events])


def time_fn(fn: Callable[[], object], device, min_run_time: float) -> Tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of one call of ``fn`` on ``device``.

    On CUDA the L2 is flushed between calls; on CPU it is not, so working sets that fit in
    the CPU caches can report more GB/s than the copy ceiling. CPU times of code that allocates
    large temporaries include page faults when glibc returns them to the OS between calls;
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (or jemalloc) take that out.
    """
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _time_cuda_events(fn, min_run_time)
        return tuple(do_bench(fn, rep=min_run_time * 1e3, quantiles=list(QUANTILES)))
    # Timer runs with one thread unless told otherwise; keep the process setting (--threads).
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return _quantiles_ms([t * 1e3 for t in measurement.times])


def copy_ceiling_gbps(device, nbytes: int, min_run_time: float = 0.2) -> float:
    """GB/s of a same-device copy of ``nbytes`` (bytes read + written): the bandwidth an
    elementwise kernel can hope for on this machine, measured in the same run as the kernels."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # ones, not empty: touch the pages
    dst = torch.empty_like(src)
    p50, _, _ = time_fn(lambda: dst.copy_(src), device, min_run_time)
    return 2 * src.nbytes / (p50 * 1e-3) / 1e9


def peak_mem_mb(fn: Callable[[], object], device, compiled: bool = False) -> Optional[float]:
    """Peak memory during one call (MiB): allocated CUDA memory (inputs included) on CUDA; on CPU the
    peak growth of the heap over the call (see _cpu_memory; inputs excluded)."""
    if torch.device(device).type != "cuda":
        return cpu_peak_mem_mb(fn, trace_ops=not compiled)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


# ---------------------------------------------------------------- correctness

def assert_matches(provider: str, got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                   dtype: torch.dtype, tolerance: Optional[Dict[torch.dtype, float]] = None) -> None:
    """Every output (and gradient) of ``provider`` equals the reference's within (the family's) TOLERANCE[dtype]."""
    tol = (tolerance or TOLERANCE)[dtype]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol * e.abs().max().item(),
                                   msg=lambda m, i=i: f"{provider}: result {i} differs from the reference: {m}")


# ---------------------------------------------------------------- rows

def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> Optional[str]:
    sha = EXTENSION.build_info.get("git_sha")
    if sha:
        return sha
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment(device: torch.device) -> Dict[str, object]:
    """The columns that identify where a row was measured (one CSV per device)."""
    return {"device_name": _device_name(device), "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda, "git_sha": _git_sha(), "threads": torch.get_num_threads()}


def _rounded(value: Optional[float], digits: int) -> Optional[float]:
    return None if value is None else round(value, digits)


def case_rows(case: Dict[str, object], timings: Dict[str, Timing], providers: Sequence[str], nbytes: int,
              ceiling_gbps: float, env: Dict[str, object]) -> List[Dict[str, object]]:
    """Liger-style rows for one case, one per provider timed; ``speedup_vs_<p>`` is p's median over
    this row's median (> 1: this row is faster). Every row has a column for every provider, so
    the CSV header does not depend on which providers ran."""
    medians = {p: t.ms[0] for p, t in timings.items() if t.ms}
    rows = []
    for provider, timing in timings.items():
        median, p20, p80 = timing.ms or (None, None, None)
        gbps = nbytes / (median * 1e-3) / 1e9 if median and nbytes else None
        row = {"kernel": case["kernel"], "provider": provider, "mode": case["mode"], "dtype": case["dtype"],
               "shape": case["shape"], "ms_p50": _rounded(median, 6), "ms_p20": _rounded(p20, 6),
               "ms_p80": _rounded(p80, 6), "gb_per_s": _rounded(gbps, 3),
               "pct_of_copy_ceiling": _rounded(100 * gbps / ceiling_gbps, 2) if gbps else None}
        for other in providers:
            speedup = medians[other] / median if median and other != provider and other in medians else None
            row[f"speedup_vs_{other}"] = _rounded(speedup, 3)
        row.update(peak_mem_mb=_rounded(timing.peak_mb, 2), **env, note=timing.note)
        rows.append(row)
    return rows


def append_rows(csv_path: Path, rows: Sequence[Dict[str, object]]) -> None:
    """Append rows to ``csv_path`` (header written when the file is new); a file with other
    columns is refused rather than silently mixed."""
    if not rows:
        return
    csv_path = Path(csv_path)
    fields = list(rows[0])
    exists = csv_path.exists() and csv_path.stat().st_size > 0
    if exists:
        with csv_path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"{csv_path} has other columns than this benchmark writes; choose another --out")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if not exists:
            writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- table

_TABLE_KEYS = ("kernel", "mode", "dtype", "shape", "provider", "ms_p50", "ms_p20", "ms_p80", "gb_per_s",
               "pct_of_copy_ceiling", "peak_mem_mb")
_HEADINGS = {"gb_per_s": "GB/s", "pct_of_copy_ceiling": "%copy", "peak_mem_mb": "peakMB"}
_FORMATS = {"ms_p50": "{:.4g}", "ms_p20": "{:.4g}", "ms_p80": "{:.4g}", "gb_per_s": "{:.1f}",
            "pct_of_copy_ceiling": "{:.0f}", "peak_mem_mb": "{:.1f}"}


def _cell(key: str, value: object) -> str:
    if value is None or value == "":
        return "-"
    if key.startswith("speedup_vs_"):
        return f"{value:.2f}x"
    return _FORMATS.get(key, "{}").format(value)


def print_table(rows: Sequence[Dict[str, object]]) -> None:
    """A fixed-width table of the rows (numbers right-aligned), a blank line between cases."""
    if not rows:
        return
    keys = list(_TABLE_KEYS) + [k for k in rows[0] if k.startswith("speedup_vs_")]
    if any(row["note"] for row in rows):
        keys.append("note")
    headings = [_HEADINGS.get(k, k.replace("speedup_", "")) for k in keys]
    cells = [[_cell(k, row[k]) for k in keys] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headings)]
    numeric = [k in _FORMATS or k.startswith("speedup_vs_") for k in keys]

    def line(texts):
        return "  ".join(t.rjust(w) if num else t.ljust(w) for t, w, num in zip(texts, widths, numeric)).rstrip()

    print(line(headings))
    previous = None
    for row, texts in zip(rows, cells):
        case = (row["kernel"], row["mode"], row["dtype"], row["shape"])
        if previous is not None and case != previous:
            print()
        previous = case
        print(line(texts))
