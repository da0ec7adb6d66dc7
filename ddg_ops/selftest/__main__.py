"""python -m ddg_ops.selftest [--device cuda|cpu] [--quick] [--json PATH]: the first command to run on a
new machine. Checks every ddg op against its pure-PyTorch reference over a dtype x layout x shape
grid, forward and backward; times each op family against a copy of the same bytes; prints the
build, device and backend facts. Exit status: 0 all checks passed, 1 a mismatch (or an op without a
check, or a kernel that did not run), 2 the requested device has no ddg kernels to test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .._ext import STATE as EXTENSION
from ..testing import DTYPES
from .bandwidth import Row, measure
from ..op_registry import REGISTRY, SIZES
from .checks import CheckReport, Grid, registered_ops, run_checks
from .facts import arch_coverage, collect

EXIT_OK, EXIT_MISMATCH, EXIT_UNAVAILABLE = 0, 1, 2
MAX_PRINTED_MISMATCHES = 40
NOISY_SPREAD = 1.5
NOISY_COPY_RANGE = 3.0
DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in DTYPES}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ddg_ops.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="moderate instead of multi-million-element shapes, "
                                                             "fp32 only and shorter timing in the bandwidth table")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON to PATH")
    parser.add_argument("--ops", nargs="+", choices=[c.name for c in REGISTRY], help="check only these ops")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPE_NAMES), help="check only these dtypes")
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES), help="shape classes to check")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth table")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    return parser.parse_args(argv)


def unavailable(device: torch.device) -> Optional[str]:
    """Why ddg's kernels cannot be tested on ``device`` (None when they can)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return (f"--device cuda: no CUDA GPU is visible to torch {torch.__version__} (CUDA {torch.version.cuda}); "
                "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or run --device cpu")
    if not EXTENSION.loaded:
        return (f"the compiled ddg kernels are not loaded ({EXTENSION.reason}); without them every op runs its "
                "reference and there is nothing to test")
    if device.type not in EXTENSION.device_types:
        return (f"--device {device.type}: ddg_ops was built without {device.type.upper()} kernels (build record: "
                f"backends {EXTENSION.build_info.get('backends')}, {EXTENSION.build_info.get('decision')!r}); "
                "rebuild on this machine with `pip install --no-build-isolation -e .` (a visible GPU, or "
                "DDG_FORCE_CUDA=1, compiles them)")
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        arch_list = EXTENSION.build_info.get("cuda_arch_list")
        covered, how = arch_coverage(capability, arch_list)
        if covered is False:
            return (f"--device cuda: {torch.cuda.get_device_name(device)} (sm_{capability[0]}{capability[1]}) is not "
                    f"among the architectures the CUDA kernels were built for ({how}); rebuild with "
                    f"TORCH_CUDA_ARCH_LIST including {capability[0]}.{capability[1]}")
    return None


def _print_checks(report: CheckReport, total_points: int) -> None:
    print(f"\n{'op':<22}{'points':>8}{'failed':>8}{'seconds':>9}  ran on")
    for s in report.summaries.values():
        ran = ", ".join(f"{op}: {'/'.join(d) or 'never'}" for op, d in report.ran_on.items() if op.startswith(s.op))
        print(f"{s.op:<22}{s.points:>8}{s.failed_points:>8}{s.seconds:>9.1f}  {ran}")
    for op in report.uncovered:
        print(f"NO CHECK: torch.ops.ddg.{op} is registered but no registry row covers it "
              "(add its row to ddg_ops/op_registry/<family>.py)")
    for case, ops in report.not_run.items():
        print(f"NOT RUN: {case}: {', '.join(ops)} never executed on this device (the op fell back to the reference?)")
    if report.mismatches:
        print(f"\n{len(report.mismatches)} mismatches in {total_points} points"
              + (f" (first {MAX_PRINTED_MISMATCHES}; all in --json)" if len(report.mismatches) > MAX_PRINTED_MISMATCHES
                 else "") + ":")
        for m in report.mismatches[:MAX_PRINTED_MISMATCHES]:
            print(f"  MISMATCH {m}")


def _print_bandwidth(rows: Sequence[Row]) -> None:
    print(f"\n{'family':<12}{'kernel':<29}{'mode':<8}{'dtype':<9}{'shape':<17}{'MB':>8}{'ms':>9}{'GB/s':>8}"
          f"{'copy ms':>9}{'copy GB/s':>10}{'ratio':>7}{'p80/p20':>8}")
    for r in rows:
        print(f"{r.family:<12}{r.kernel:<29}{r.mode:<8}{r.dtype:<9}{r.shape:<17}{r.nbytes / 1e6:>8.1f}{r.ms:>9.3f}"
              f"{r.gbps:>8.1f}{r.copy_ms:>9.3f}{r.copy_gbps:>10.1f}{r.ratio:>7.2f}{r.spread:>8.2f}")
    # The copy is the same operation in every row: on a quiet device its GB/s varies little with the size.
    noisy = [r for r in rows if r.spread > NOISY_SPREAD]
    copy = [r.copy_gbps for r in rows]
    if noisy or (copy and max(copy) > NOISY_COPY_RANGE * min(copy)):
        print(f"note: {len(noisy)} of {len(rows)} rows have p80/p20 > {NOISY_SPREAD}, the copy ran at "
              f"{min(copy):.1f}-{max(copy):.1f} GB/s: the device is shared with other work and these times say "
              "little; rerun on a quiet machine")


def _print_facts(facts) -> None:
    dev = facts["device"]
    print(f"\npython {facts['python']}, torch {facts['torch']} (CUDA {facts['torch_cuda']}), "
          f"GPU visible: {facts['cuda_available']}")
    ext = facts["extension"]
    print(f"extension: {'loaded' if ext['loaded'] else 'NOT loaded'} ({ext['reason']}); kernels for "
          f"{ext['device_types']}")
    b = facts["build_info"]
    print(f"build: backends {b.get('backends')}, CUDA arch list {b.get('cuda_arch_list')}, CPU capability "
          f"{b.get('cpu_capability')}, nvcc {b.get('nvcc')}, torch {b.get('torch')}, git {b.get('git_sha')}")
    line = f"device: {dev['name']} ({dev['type']}"
    if dev["type"] == "cuda":
        line += (f", capability {dev['capability']}, {dev['multiprocessors']} SMs, {dev['memory_gib']} GiB); "
                 f"covered by the built archs: {dev['arch_covered']} ({dev['arch_coverage']})")
    else:
        line += f", {dev['threads']} threads, running CPU capability {dev['cpu_capability']})"
    print(line)
    print("backends: " + ", ".join(f"{op}: {how}" for op, how in facts["backends"].items()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    reason = unavailable(device)
    if reason:
        print(f"ddg_ops.selftest: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    ops = registered_ops()
    dtypes = tuple(DTYPE_NAMES[d] for d in args.dtype) if args.dtype else tuple(DTYPES)
    grid = Grid(quick=args.quick, dtypes=dtypes, sizes=tuple(args.sizes), ops=tuple(args.ops) if args.ops else None)
    print(f"ddg_ops self-test on {device.type}{' (quick)' if args.quick else ''}: {len(ops)} operators registered "
          f"under torch.ops.ddg; {len(REGISTRY)} registry rows over dtypes x layouts x shapes (odd, large, empty), "
          "forward and backward")
    report = run_checks(device, grid, progress=lambda s: print(f"  checked {s.op}: {s.points} points, "
                                                               f"{s.failed_points} failed, {s.seconds:.1f} s",
                                                               file=sys.stderr))
    total_points = sum(s.points for s in report.summaries.values())
    _print_checks(report, total_points)
    check_seconds = time.perf_counter() - start

    rows, bandwidth_error = [], None
    if not args.no_bandwidth:
        try:
            rows = measure(device, args.quick, progress=lambda r: print(f"  timed {r.kernel} {r.mode} {r.dtype}",
                                                                          file=sys.stderr))
        except Exception as exc:  # noqa: BLE001 (a kernel that fails while timed is a failure of the run)
            bandwidth_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        _print_bandwidth(rows)
        if bandwidth_error:
            print(f"BANDWIDTH ERROR: {bandwidth_error}")

    facts = collect(device, ops)
    _print_facts(facts)
    ok = report.ok and bandwidth_error is None
    seconds = time.perf_counter() - start
    print(f"\n{'PASS' if ok else 'FAIL'}: {total_points} points over {len(report.summaries)} ops "
          f"({len(ops)} operators), {len(report.mismatches)} mismatches, {len(report.uncovered)} ops without a check, "
          f"{len(report.not_run)} cases whose kernels did not run; checks {check_seconds:.0f} s, "
          f"total {seconds:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "ok": ok, "device": device.type, "quick": args.quick, "seconds": round(seconds, 1),
            "check_seconds": round(check_seconds, 1),
            "checks": {"points": total_points,
                       "per_op": {s.op: {"points": s.points, "failed_points": s.failed_points,
                                         "seconds": round(s.seconds, 2), "input_elements": s.elements}
                                  for s in report.summaries.values()},
                       "ran_on": report.ran_on, "uncovered_ops": report.uncovered, "not_run": report.not_run,
                       "mismatches": [{"op": m.point.op, "dtype": str(m.point.dtype).replace("torch.", ""),
                                       "layout": m.point.layout, "shape": list(m.point.shape),
                                       "variant": m.point.variant, "result": m.result, "detail": m.detail}
                                      for m in report.mismatches]},
            "bandwidth": [r.as_dict() for r in rows], "bandwidth_error": bandwidth_error,
            "facts": facts}, indent=2, default=str) + "\n")
    return EXIT_OK if ok else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
