"""The self-test's check core: run every grid point of every case forward and backward, kernel
against reference, and record each mismatch with what it was (op, dtype, layout, shape, variant,
which result) and how far off (max abs/rel error against the tolerance).

The kernel side runs under a dispatch mode that records which ``torch.ops.ddg`` operators
actually executed and on which device, so a case that silently fell back to the reference (or
never reached its backward op) is reported rather than passing against itself.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..testing import DTYPES, difference, leaves, magnitude
from ..op_registry import REGISTRY, SIZES, Call, OpInfo, registered_schemas

NAMESPACE = "ddg"


def registered_ops() -> List[str]:
    """Every operator registered under torch.ops.ddg (forward and backward ops)."""
    return registered_schemas(NAMESPACE)


def uncovered_ops(cases: Sequence[OpInfo] = REGISTRY) -> List[str]:
    """Registered operators that no registry row exercises: a new op needs a row before the self-test passes."""
    covered = {op for case in cases for op in case.schemas}
    return [op for op in registered_ops() if op not in covered]


class _OpRecorder(TorchDispatchMode):
    """Notes (operator, device type) of every ddg operator that runs while active (backward included:
    the autograd engine carries the mode into its threads)."""

    def __init__(self, seen: Set[Tuple[str, str]]):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == NAMESPACE:
            devices = {a.device.type for a in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                       if isinstance(a, torch.Tensor)}
            for device in devices or {"none"}:
                self.seen.add((func._opname, device))
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Point:
    op: str
    dtype: torch.dtype
    layout: str
    shape: tuple
    variant: str
    size: str

    def describe(self) -> str:
        return (f"{self.op} {str(self.dtype).replace('torch.', '')} {self.layout} {tuple(self.shape)} "
                f"[{self.variant}]")


@dataclass
class Mismatch:
    point: Point
    result: str   # 'out0', 'grad_x', ... or 'error'
    detail: str   # the Difference, or what went wrong

    def __str__(self) -> str:
        return f"{self.point.describe()} {self.result}: {self.detail}"


@dataclass
class CaseSummary:
    op: str
    points: int = 0
    failed_points: int = 0
    seconds: float = 0.0
    elements: int = 0  # input elements over all points (the bytes-moved estimate of docs/selftest.md)


@dataclass
class CheckReport:
    mismatches: List[Mismatch] = field(default_factory=list)
    summaries: Dict[str, CaseSummary] = field(default_factory=dict)
    uncovered: List[str] = field(default_factory=list)
    # Operators a row names in ``schemas`` that never ran on the device (fallback to the reference).
    not_run: Dict[str, List[str]] = field(default_factory=dict)
    # op -> device types it ran on.
    ran_on: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.uncovered and not self.not_run


@dataclass(frozen=True)
class Grid:
    """Which part of the grid to run; ``quick`` picks the moderate large shapes."""
    quick: bool = False
    dtypes: Tuple[torch.dtype, ...] = tuple(DTYPES)
    sizes: Tuple[str, ...] = SIZES
    ops: Optional[Tuple[str, ...]] = None  # case names; None: all
    shapes_per_size: Optional[int] = None  # the first n shapes of each size class; None: all

    def points(self, case: OpInfo) -> Iterable[Point]:
        for size in self.sizes:
            for shape in case.grid_shapes(size, self.quick)[:self.shapes_per_size]:
                for layout in case.layouts_for(shape, size):
                    for variant in case.variants_for(size):
                        for dtype in self.dtypes:
                            yield Point(case.name, dtype, layout, tuple(shape), variant, size)


@contextlib.contextmanager
def _threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _compare(point: Point, call: Call, seen: Set[Tuple[str, str]], kernel_threads: int = 1) -> List[Mismatch]:
    """Forward outputs, then the gradients of every differentiable input for a random grad_output on
    every differentiable output. Tolerances: TOLERANCES of each result's dtype, atol scaled by the
    magnitude of the expected values (and by ``call.scales`` where that is not enough)."""
    got_in = leaves(call.inputs, call.differentiable, False)
    ref_in = leaves(call.inputs, call.differentiable, True)
    with _OpRecorder(seen), _threads(kernel_threads):
        got = call.run(**got_in)
    with warnings.catch_warnings():
        # torch's var() of an empty row warns; the empty points expect exactly that input.
        warnings.filterwarnings("ignore", message=r"var(_mean)?\(\): degrees of freedom")
        ref = call.reference(**ref_in)
    bad = []
    if len(got) != len(ref):
        return [Mismatch(point, "outputs", f"{len(got)} outputs, the reference has {len(ref)}")]
    names = [n for n in call.differentiable if got_in.get(n) is not None]
    pairs = [(g, r) for g, r in zip(got, ref) if r.requires_grad]
    grad_outs = [torch.randn(g.shape, dtype=torch.float64, device=g.device).to(g.dtype) for g, _ in pairs]
    extra = call.scales(ref_in, [go.double() for go in grad_outs]) if names and pairs else call.scales(ref_in, [])
    for i, (g, r) in enumerate(zip(got, ref)):
        if g.shape != r.shape:
            bad.append(Mismatch(point, f"out{i}", f"shape {tuple(g.shape)}, reference {tuple(r.shape)}"))
            continue
        diff = difference(g, r, g.dtype, scale=magnitude(r) * extra.get(f"out{i}", 1.0))
        if diff:
            bad.append(Mismatch(point, f"out{i}", str(diff)))
    if not names or not pairs or all(g.numel() == 0 for g, _ in pairs):
        return bad
    if not all(g.requires_grad for g, _ in pairs):
        return bad + [Mismatch(point, "autograd", "a differentiable output of the kernel has no grad_fn")]
    with _OpRecorder(seen), _threads(kernel_threads):
        g_got = torch.autograd.grad([g for g, _ in pairs], [got_in[n] for n in names], grad_outs, allow_unused=True)
    g_ref = torch.autograd.grad([r for _, r in pairs], [ref_in[n] for n in names],
                                [go.double() for go in grad_outs], allow_unused=True)
    for name, a, b in zip(names, g_got, g_ref):
        key = f"grad_{name}"
        if b is None:
            if a is not None and bool(a.any()):
                bad.append(Mismatch(point, key, "nonzero gradient where the reference has none"))
            continue
        if a is None:
            bad.append(Mismatch(point, key, "missing gradient"))
            continue
        if a.shape != got_in[name].shape or a.dtype != got_in[name].dtype:
            bad.append(Mismatch(point, key, f"{a.dtype} {tuple(a.shape)}, input is "
                                            f"{got_in[name].dtype} {tuple(got_in[name].shape)}"))
            continue
        diff = difference(a, b, a.dtype, scale=max(magnitude(b), extra.get(key, 0.0)))
        if diff:
            bad.append(Mismatch(point, key, str(diff)))
    return bad


def run_checks(device: torch.device, grid: Grid = Grid(), cases: Sequence[OpInfo] = REGISTRY, seed: int = 0,
               progress=None) -> CheckReport:
    """Every point of ``grid`` for every case (``grid.ops`` selects cases). An exception at a point is
    a mismatch too (named 'error'), so one broken kernel does not hide the rest."""
    report = CheckReport(uncovered=uncovered_ops(cases))
    selected = [c for c in cases if grid.ops is None or c.name in grid.ops]
    # On CPU, intra-op threads only add synchronisation to the references, the comparisons and the
    # small points (minutes on a loaded machine); the kernels of the large points keep all threads,
    # so their parallel reductions and merges are among the checked paths.
    threads = torch.get_num_threads()
    with _threads(1):
        for case in selected:
            _run_case(case, device, grid, seed, report, threads)
            if progress:
                progress(report.summaries[case.name])
    return report


def _run_case(case: OpInfo, device: torch.device, grid: Grid, seed: int, report: CheckReport, threads: int) -> None:
    """All grid points of one case into ``report``; which of its operators ran, and where."""
    seen: Set[Tuple[str, str]] = set()
    summary = report.summaries.setdefault(case.name, CaseSummary(case.name))
    start = time.perf_counter()
    for index, point in enumerate(grid.points(case)):
        # Each point's draws do not depend on what ran before. (torch.manual_seed would also queue
        # lazy seeding of every accelerator backend, a stack capture each, per point.)
        torch.default_generator.manual_seed(seed + index)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed + index)
        try:
            call = case.build(point.shape, point.dtype, point.layout, point.variant, device)
            summary.elements += sum(t.numel() for t in call.inputs.values() if isinstance(t, torch.Tensor))
            bad = _compare(point, call, seen, threads if point.size == "large" else 1)
        except Exception as exc:  # noqa: BLE001 (reported as a failure of this point)
            bad = [Mismatch(point, "error", f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")]
        summary.points += 1
        summary.failed_points += bool(bad)
        report.mismatches += bad
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    summary.seconds = time.perf_counter() - start
    for op in case.schemas:
        report.ran_on[op] = sorted(d for o, d in seen if o == op)
    missing = [op for op in case.schemas if device.type not in report.ran_on[op]]
    if missing and summary.points:
        report.not_run[case.name] = missing
