"""The examples' conformance matrix (tests/examples/conformance.py, docs/examples.md "Conformance matrix").

Every ``tests/examples/conformance_<example>.py`` contributes its ``CASE``; each case runs in the eight cells.
CI runs the cells a case lists in ``ci_cells``; ``DDG_CONFORMANCE=all python -m pytest -m slow
tests/examples/test_conformance.py`` runs the whole matrix (tens of minutes on two cores)."""
from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import pytest

for _module in ("accelerate", "diffusers", "transformers", "safetensors"):
    pytest.importorskip(_module)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.examples.conformance import ALL_CELLS, Cell, ConformanceCase, assert_same, run_resumed, run_straight  # noqa: E402

FULL = os.environ.get("DDG_CONFORMANCE") == "all"


def _cases() -> Dict[str, ConformanceCase]:
    cases = {}
    for path in sorted(HERE.glob("conformance_*.py")):
        case = importlib.import_module(f"tests.examples.{path.stem}").CASE
        assert isinstance(case, ConformanceCase), f"{path}: CASE must be a ConformanceCase"
        cases[case.name] = case
    return cases


CASES = _cases()


def _params():
    for case in CASES.values():
        for cell in ALL_CELLS:
            in_ci = cell.id in case.ci_cells
            marks = [pytest.mark.slow]
            if not in_ci and not FULL:
                marks.append(pytest.mark.skip(reason=f"not among {case.name}'s CI cells {sorted(case.ci_cells)}; "
                                                     "DDG_CONFORMANCE=all runs the whole matrix"))
            yield pytest.param(case.name, cell, id=f"{case.name}-{cell.id}", marks=marks)


_STRAIGHT: Dict[Tuple[str, str, int], Path] = {}


def straight_run(case: ConformanceCase, cell: Cell, tmp_path_factory) -> Path:
    """The uninterrupted run of (case, precision, processes), once per session (a resumed cell compares to it)."""
    key = (case.name, cell.precision, cell.processes)
    if key not in _STRAIGHT:
        out = tmp_path_factory.mktemp(f"{case.name}-{cell.precision}-{cell.processes}p-straight")
        t0 = time.perf_counter()
        run_straight(case, Cell(cell.precision, cell.processes, "straight"), out)
        print(f"[conformance] {case.name} {cell.precision} {cell.processes}p straight: "
              f"{time.perf_counter() - t0:.1f} s")
        _STRAIGHT[key] = out
    return _STRAIGHT[key]


@pytest.mark.parametrize("name, cell", list(_params()))
def test_cell(name: str, cell: Cell, tmp_path_factory):
    case = CASES[name]
    straight = straight_run(case, cell, tmp_path_factory)
    if cell.mode == "straight":
        return
    out = tmp_path_factory.mktemp(f"{case.name}-{cell.id}")
    t0 = time.perf_counter()
    stops = run_resumed(case, cell, out, straight)
    print(f"[conformance] {case.name} {cell.id}: stops {stops}, {time.perf_counter() - t0:.1f} s")
    assert_same(case, cell, straight, out)


def test_every_example_has_a_case():
    examples = {p.parent.name for p in (ROOT / "examples").glob("*/train.py")}
    missing = examples - set(CASES)
    assert not missing, f"examples without a conformance case (tests/examples/conformance_<name>.py): {sorted(missing)}"
