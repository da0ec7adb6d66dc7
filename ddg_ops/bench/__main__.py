"""python -m ddg_ops.bench <family> [options]: time each provider on each case, write a CSV, print a table.

A family module defines PROVIDERS, MODES, ORACLE (the provider others are checked against),
``cases(quick, device)`` -> [(kernel, shape)], ``min_bytes(kernel, shape, dtype, mode)`` (None when
bytes are not the measure) and ``Case(kernel, shape, dtype, mode, device)`` whose ``step(provider)`` is
the call to time and ``results(output)`` the tensors (outputs, gradients) that a step computed.
Optional: ``DEFAULT_DTYPES``, ``TOLERANCE`` (per dtype, replacing _utils.TOLERANCE), ``kernel_modes(kernel)`` (the modes a kernel has), ``Case.note(provider)``
(a remark for the row), ``Case.release()`` (free what earlier calls left, e.g. gradients, before the
peak-memory run) and ``derived_rows``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch

from .._ext import STATE as EXTENSION, use_kernel
from ..op_registry import REGISTRY
from ._utils import (Timing, append_rows, assert_matches, case_rows, copy_ceiling_gbps, environment, peak_mem_mb,
                     print_table, time_fn)

# Family name -> module: every family a registry row's bench names (ddg_ops/bench/<family>.py).
FAMILIES = {family: f"ddg_ops.bench.{family}" for family in dict.fromkeys(r.bench.family for r in REGISTRY if r.bench)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Seconds of timing per (provider, case): full runs stay under ~15 min on a 2-core CPU,
# torch.compile warm-ups included; --quick is a CI smoke test.
MIN_RUN_TIME = {"quick": 0.1, "full": 0.3}
# The copy ceiling must not fit in any cache (H100 L2: 50 MB; server L3 up to a few hundred MB).
CEILING_BYTES = {"cpu": 512 * 2**20, "cuda": 2 * 2**30}
# torch.compile needs a toolchain (a C++ compiler, triton): its failure is a fact about the
# machine and goes into the row; any other provider failing is a bug and stops the run.
MAY_FAIL = {"compile"}


def parse_args(argv: Sequence[str] | None, families: Mapping[str, str] = FAMILIES,
               prog: str = "python -m ddg_ops.bench") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(families))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES),
                        help="default: the family's DEFAULT_DTYPES, else float32 and bfloat16")
    parser.add_argument("--mode", nargs="+", choices=("forward", "full"), default=["forward", "full"],
                        help="full = forward + backward")
    parser.add_argument("--out", type=Path, help="CSV path (default bench_results/<family>_<device>.csv)")
    parser.add_argument("--append", action="store_true", help="add to an existing CSV instead of replacing it")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing (CI smoke test)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--providers", nargs="+", help="run only these providers")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def _select_providers(requested: Sequence[str] | None, family) -> Sequence[str]:
    """--providers validated against the family, in the family's order."""
    unknown = sorted(set(requested or ()) - set(family.PROVIDERS))
    if unknown:
        sys.exit(f"unknown providers {unknown}; this family has {list(family.PROVIDERS)}")
    return [p for p in family.PROVIDERS if not requested or p in requested]


def bench_case(family, case, providers: Sequence[str], dtype: torch.dtype, device: torch.device,
               min_run_time: float) -> Dict[str, Timing]:
    """Check every provider against the oracle once (this also warms it up), then time it."""
    expected = case.results(case.step(family.ORACLE)())
    timings = {}
    for provider in providers:
        try:
            step = case.step(provider)
            got = case.results(step())
        except Exception as exc:  # noqa: BLE001 (recorded in the row; see MAY_FAIL)
            if provider not in MAY_FAIL:
                raise
            note = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:150]}"
            print(f"  {provider} failed: {note}", file=sys.stderr)
            timings[provider] = Timing(note=note)
            continue
        assert_matches(provider, got, expected, dtype, getattr(family, "TOLERANCE", None))
        note = case.note(provider) if hasattr(case, "note") else ""
        if hasattr(case, "release"):  # what earlier calls left behind (parameter grads) is not this call's memory
            case.release()
        peak = peak_mem_mb(step, device, compiled=provider == "compile")
        timings[provider] = Timing(time_fn(step, device, min_run_time), peak, note)
    return timings


def main(argv: Sequence[str] | None = None, families: Optional[Mapping[str, str]] = None,
         prog: str = "python -m ddg_ops.bench") -> None:
    """Run one family of ``families`` (default: the op families of ddg_ops.op_registry)."""
    families = FAMILIES if families is None else families
    args = parse_args(argv, families, prog)
    family = importlib.import_module(families[args.family])
    providers = _select_providers(args.providers, family)
    device = torch.device(args.device)
    if "ddg" in providers and not use_kernel(torch.empty(0, device=device)):
        # Without the extension ddg runs the reference: timing it against itself says nothing.
        sys.exit(f"ddg kernels unavailable on {device.type}: {EXTENSION.reason}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("bench_results") / f"{args.family}_{args.device}.csv"
    if not args.append:
        out.unlink(missing_ok=True)
    min_run_time = MIN_RUN_TIME["quick" if args.quick else "full"]
    modes = [m for m in family.MODES if m in args.mode]
    env = environment(device)
    ceiling = copy_ceiling_gbps(device, CEILING_BYTES[device.type], min_run_time)
    print(f"{env['device_name']}, {env['threads']} threads, torch {env['torch_version']}: "
          f"copy ceiling {ceiling:.1f} GB/s", file=sys.stderr)

    dtypes = args.dtype or getattr(family, "DEFAULT_DTYPES", ("float32", "bfloat16"))
    kernel_modes = getattr(family, "kernel_modes", lambda kernel: modes)
    todo = [(kernel, shape, dtype, mode) for kernel, shape in family.cases(args.quick, device)
            for dtype in dtypes for mode in modes if mode in kernel_modes(kernel)]
    rows = []
    for i, (kernel, shape, dtype_name, mode) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {kernel} {mode} {dtype_name} {shape}", file=sys.stderr)
        dtype = DTYPES[dtype_name]
        case = family.Case(kernel, shape, dtype, mode, device)
        timings = bench_case(family, case, providers, dtype, device, min_run_time)
        meta = {"kernel": kernel, "mode": mode, "dtype": dtype_name, "shape": "x".join(map(str, shape))}
        nbytes = family.min_bytes(kernel, shape, dtype, mode)
        new_rows = case_rows(meta, timings, family.PROVIDERS, nbytes, ceiling, env)
        append_rows(out, new_rows)  # as we go, so an interrupted run keeps what it measured
        rows += new_rows

    # A family may add rows computed from the measured ones (bn_stats: whole-network totals).
    derived = family.derived_rows(rows, ceiling, env) if hasattr(family, "derived_rows") else []
    append_rows(out, derived)
    rows += derived
    print_table(rows)
    print(f"\ncopy ceiling {ceiling:.1f} GB/s on {env['device_name']}; {len(rows)} rows written to {out}")


if __name__ == "__main__":
    main()
