"""The conformance matrix of the examples (docs/examples.md, "Conformance matrix").

Every example's ``smoke`` preset runs in eight cells: {fp32, bf16 mixed precision} x {1 process, 2 processes}
x {uninterrupted, stopped after checkpoints and resumed}. Each example describes itself in
``tests/examples/conformance_<name>.py`` as ``CASE = ConformanceCase(...)``; ``test_conformance.py`` runs the
cells. A cell is a set of subprocesses (accelerate fixes the mixed precision once per process, and a real user
starts the run from the shell), each on one thread (``OMP_NUM_THREADS=1``: the blocking of CPU kernels, hence
the last bits of a reduction, depends on the thread count).

What a cell checks:

* uninterrupted: the run exits 0, writes ``results.json`` with a flat ``metrics`` dict of finite numbers, a
  checkpoint history and the exports; with 2 processes the ranks' random streams differ (their checkpointed RNG
  states are not equal) and the exports are complete files written once.
* resumed: the run is stopped with ``--max-steps`` right after checkpoints of the uninterrupted run (see
  ``ConformanceCase.stops``), resumed with ``--resume`` each time, and finished with a last ``--resume``. Its
  metrics and exported tensors equal the uninterrupted run's: bit for bit in fp32 on one process, within the
  case's stated tolerance in bf16 or on two processes.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]
PRECISIONS = ("no", "bf16")
PROCESSES = (1, 2)
MODES = ("straight", "resumed")


@dataclass(frozen=True)
class Cell:
    precision: str  # accelerate's --mixed-precision: "no" (fp32) or "bf16"
    processes: int
    mode: str       # "straight" (uninterrupted) or "resumed"

    @property
    def id(self) -> str:
        return f"{'fp32' if self.precision == 'no' else self.precision}-{self.processes}p-{self.mode}"

    @property
    def exact(self) -> bool:
        """fp32 on one process: a resumed run replays the same kernels on the same inputs, bit for bit."""
        return self.precision == "no" and self.processes == 1


ALL_CELLS: Tuple[Cell, ...] = tuple(Cell(p, n, m) for p in PRECISIONS for n in PROCESSES for m in MODES)


@dataclass(frozen=True)
class Tolerance:
    """How close a resumed run's metrics and exported tensors must be to the uninterrupted run's, and why."""
    rtol: float
    atol: float
    reason: str

    def __post_init__(self):
        if not self.reason.strip():
            raise ValueError("Tolerance: a tolerance states its reason")


EXACT = Tolerance(0.0, 0.0, "fp32 on one thread: the resumed run replays the same computation")


@dataclass(frozen=True)
class ConformanceCase:
    """One example in the matrix.

    ``argv``: the script and its arguments relative to the repository root (``--out``, ``--mixed-precision``,
    ``--max-steps`` and ``--resume`` are added per run). ``bf16`` / ``two_processes``: tolerances of the
    resumed-vs-uninterrupted comparison in those cells (a bf16 cell on two processes uses the looser of the two).
    ``ci_cells``: ids of the cells that run in CI (``Cell.id``, e.g. "fp32-1p-resumed"); the others are slow.
    ``check(out, cell)``: the example's own assertions on a finished run (exports reload and reproduce the last
    evaluation, evaluation ran once, ...). ``max_stops``: at most this many stops in a resumed cell."""
    name: str
    argv: Sequence[str]
    bf16: Tolerance
    two_processes: Tolerance
    ci_cells: FrozenSet[str] = frozenset()
    check: Optional[Callable[[Path, Cell], None]] = None
    max_stops: int = 6
    timeout: float = 900.0

    def __post_init__(self):
        unknown = set(self.ci_cells) - {c.id for c in ALL_CELLS}
        if unknown:
            raise ValueError(f"ConformanceCase {self.name}: unknown ci_cells {sorted(unknown)}; "
                             f"expected ids among {[c.id for c in ALL_CELLS]}")

    def tolerance(self, cell: Cell) -> Tolerance:
        if cell.exact:
            return EXACT
        if cell.precision == "no":
            return self.two_processes
        if cell.processes == 1:
            return self.bf16
        return max(self.bf16, self.two_processes, key=lambda t: (t.rtol, t.atol))

    def stops(self, history: Sequence[Dict]) -> List[int]:
        """Where a resumed cell stops: every checkpoint of the uninterrupted run; when there are more than
        ``max_stops``, in this order of priority: the stage boundaries (a resume there must start the next stage
        fresh), the first checkpoint, one inside the longest stage, the last checkpoint."""
        steps = sorted({int(h["step"]) for h in history})
        if len(steps) <= self.max_stops:
            return steps
        by_stage: Dict[str, List[int]] = {}
        for h in history:
            by_stage.setdefault(h["stage"], []).append(int(h["step"]))
        longest = sorted(max(by_stage.values(), key=len))
        priority = sorted(max(s) for s in by_stage.values() if max(s) != steps[-1])
        priority += [steps[0], longest[len(longest) // 2], steps[-1]]
        chosen: List[int] = []
        for s in priority:
            if s not in chosen and len(chosen) < self.max_stops:
                chosen.append(s)
        return sorted(chosen)


def command(case: ConformanceCase, cell: Cell, out: Path, *extra: str) -> List[str]:
    """One run of the case as a user types it: ``python script ...`` or, for two processes, accelerate's
    launcher (``--multi_gpu`` on a machine without a GPU gives gloo CPU ranks; ``--cpu`` would start one
    process: docs/examples.md)."""
    script, *args = case.argv
    tail = [str(ROOT / script), *args, "--out", str(out), "--mixed-precision", cell.precision, *extra]
    if cell.processes == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(cell.processes), "--num_machines", "1", "--main_process_port", str(_free_port()), *tail]


def run(case: ConformanceCase, cell: Cell, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command(case, cell, out, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=case.timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{case.name} {cell.id} {' '.join(extra)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(out: Path) -> Dict[str, float]:
    """``results.json``'s ``metrics``: a flat dict of finite numbers."""
    path = out / "results.json"
    assert path.is_file(), f"{out}: no results.json"
    found = json.loads(path.read_text()).get("metrics")
    assert isinstance(found, dict) and found, f"{path}: expected a non-empty 'metrics' dict, got {found!r}"
    for k, v in found.items():
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), \
            f"{path}: metric {k!r} is not a finite number: {v!r}"
    return found


def exported_tensors(out: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under ``<out>/export``, keyed by 'file:tensor'."""
    from safetensors.torch import load_file
    files = sorted((out / "export").rglob("*.safetensors"))
    assert files, f"{out}: nothing exported under export/ as safetensors"
    tensors = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            tensors[f"{f.relative_to(out / 'export')}:{k}"] = v
    return tensors


def rank_rng_states(out: Path) -> List[torch.Tensor]:
    """The torch CPU RNG state of every rank in the latest checkpoint."""
    root = out / "checkpoints"
    latest = root / (root / "latest").read_text().strip()
    files = sorted(latest.glob("rng-rank*.pt"))
    return [torch.load(f, map_location="cpu", weights_only=False)["torch"] for f in files]


def check_finished(case: ConformanceCase, cell: Cell, out: Path) -> None:
    """What every finished run has, whatever the cell."""
    from examples.common import checkpoint
    metrics(out)
    exported_tensors(out)
    assert checkpoint.history(out / "checkpoints"), f"{out}: no checkpoint was written"
    if cell.processes > 1:
        states = rank_rng_states(out)
        assert len(states) == cell.processes, f"{out}: expected {cell.processes} rank RNG files, got {len(states)}"
        assert not torch.equal(states[0], states[1]), \
            f"{case.name} {cell.id}: ranks 0 and 1 end with the same random state: they drew the same randomness"
    leftovers = [p.name for p in (out / "checkpoints").glob("*.tmp")]
    assert not leftovers, f"{out}: unfinished checkpoint folders {leftovers}"
    if case.check is not None:
        case.check(out, cell)


def run_straight(case: ConformanceCase, cell: Cell, out: Path) -> None:
    run(case, cell, out)
    check_finished(case, cell, out)


def run_resumed(case: ConformanceCase, cell: Cell, out: Path, straight: Path) -> List[int]:
    """Stop after each chosen checkpoint of the uninterrupted run, resume, and finish; returns the stops."""
    from examples.common import checkpoint
    stops = case.stops(checkpoint.history(straight / "checkpoints"))
    assert stops, f"{case.name}: the uninterrupted run wrote no checkpoint to stop at"
    for i, stop in enumerate(stops):
        run(case, cell, out, "--max-steps", str(stop), *(("--resume",) if i else ()))
        latest = (out / "checkpoints" / "latest").read_text().strip()
        assert latest == checkpoint.step_dir(Path("."), stop).name, \
            f"{case.name} {cell.id}: --max-steps {stop} stopped at {latest}"
        assert not (out / "results.json").exists(), \
            f"{case.name} {cell.id}: the run stopped at step {stop} but wrote results.json"
    run(case, cell, out, "--resume")
    check_finished(case, cell, out)
    return stops


def assert_same(case: ConformanceCase, cell: Cell, straight: Path, resumed: Path) -> None:
    tol = case.tolerance(cell)
    a, b = metrics(straight), metrics(resumed)
    assert a.keys() == b.keys(), f"{case.name} {cell.id}: metrics differ in names: {sorted(a)} vs {sorted(b)}"
    bad = {k: (a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=tol.rtol, abs_tol=tol.atol)
           and not (tol.rtol == tol.atol == 0 and a[k] == b[k])}
    assert not bad, f"{case.name} {cell.id}: resumed metrics differ ({tol.reason}; rtol {tol.rtol}, atol " \
                    f"{tol.atol}): {bad}"
    ta, tb = exported_tensors(straight), exported_tensors(resumed)
    assert ta.keys() == tb.keys(), f"{case.name} {cell.id}: exports differ in tensors"
    for k in ta:
        if tol.rtol == tol.atol == 0:
            assert torch.equal(ta[k], tb[k]), f"{case.name} {cell.id}: exported {k} differs after resume"
        else:
            torch.testing.assert_close(tb[k].float(), ta[k].float(), rtol=tol.rtol, atol=tol.atol,
                                       msg=lambda m, k=k: f"{case.name} {cell.id}: exported {k}: {m} ({tol.reason})")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
