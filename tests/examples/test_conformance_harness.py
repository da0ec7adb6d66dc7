"""The conformance harness catches what it exists to catch: on a two-stage run built on examples/common
(tests/examples/probe_example.py) a correct run passes every check, and each injected bug fails the check meant
for it: a resume that loses the random state or hands one stage's optimizer state to the next, ranks that draw
the same randomness."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.examples.conformance import (ALL_CELLS, Cell, ConformanceCase, Tolerance, assert_same,  # noqa: E402
                                        run_resumed, run_straight)

LOOSE = Tolerance(1e-2, 1e-3, "bf16 autocast of the probe's linear layer")
# Two stops (the first checkpoint, inside stage 1, and stage 1's last, the boundary) keep the test short: each
# run is a fresh process.
PROBE = ConformanceCase(name="probe", argv=["tests/examples/probe_example.py"], bf16=LOOSE, two_processes=LOOSE,
                        max_stops=2, timeout=300)
FP32 = Cell("no", 1, "resumed")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run (the injected bugs act only on a resume: it is the same run for all of them)."""
    out = tmp_path_factory.mktemp("straight")
    run_straight(PROBE, Cell("no", 1, "straight"), out)
    return out


def test_a_correct_run_passes_bit_for_bit(tmp_path, straight):
    stops = run_resumed(PROBE, FP32, tmp_path, straight)
    assert stops == [1, 3]  # inside stage 1; stage 1's end (the next run resumes into stage 2)
    assert_same(PROBE, FP32, straight, tmp_path)


@pytest.mark.parametrize("bug", ["fresh_rng", "keep_optimizer"])
def test_a_lossy_resume_fails(tmp_path, monkeypatch, straight, bug):
    monkeypatch.setenv("CONFORMANCE_PROBE_BUG", bug)
    run_resumed(PROBE, FP32, tmp_path, straight)
    with pytest.raises(AssertionError, match="resumed metrics differ"):
        assert_same(PROBE, FP32, straight, tmp_path)


@pytest.mark.slow
def test_ranks_drawing_the_same_randomness_fail(tmp_path, monkeypatch):
    """Slow: two launches of two processes."""
    cell = Cell("no", 2, "straight")
    run_straight(PROBE, cell, tmp_path / "ok")  # two processes through accelerate's launcher
    monkeypatch.setenv("CONFORMANCE_PROBE_BUG", "shared_seed")
    with pytest.raises(AssertionError, match="same random state"):
        run_straight(PROBE, cell, tmp_path / "shared")


def test_stops_are_the_checkpoints_or_the_stage_boundaries():
    history = [{"step": s, "stage": "a" if s <= 4 else "b"} for s in range(1, 11)]
    case = ConformanceCase(name="x", argv=["x.py"], bf16=LOOSE, two_processes=LOOSE)  # max_stops 6
    assert case.stops(history[:6]) == [1, 2, 3, 4, 5, 6]
    assert case.stops(history) == [1, 4, 8, 10]  # first, the two stage ends, the middle of the longest stage (b)
    assert PROBE.stops(history) == [1, 4]


def test_case_and_tolerance_validation():
    with pytest.raises(ValueError, match="unknown ci_cells"):
        ConformanceCase(name="x", argv=["x.py"], bf16=LOOSE, two_processes=LOOSE, ci_cells=frozenset({"fp32"}))
    with pytest.raises(ValueError, match="states its reason"):
        Tolerance(0.1, 0.1, " ")
    assert len(ALL_CELLS) == 8 and len({c.id for c in ALL_CELLS}) == 8
    assert PROBE.tolerance(FP32).rtol == 0 and PROBE.tolerance(Cell("bf16", 2, "resumed")) is LOOSE
