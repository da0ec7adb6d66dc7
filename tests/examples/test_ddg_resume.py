"""examples/ddg: a run stopped with --max-steps at the last Stage-I step resumes into Stage II and ends where the
uninterrupted run ends."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

for _module in ("accelerate", "sklearn", "diffusers", "transformers", "torchvision"):
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.ddg import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--preset", "tiny", "--quiet", "--test-envs", "0", "--methods", "ddg", "--steps", "4",
        "--stage1-steps", "2", "--swad-start", "1", "--checkpoint-freq", "1", "--teacher-steps", "3,3,3",
        "--batch-per-domain", "4", "--n-converge", "1", "--n-tolerance", "2"]


def test_resume_from_the_stage_switch_checkpoint(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train.main([*TINY, "--out", str(straight)])
    train.main([*TINY, "--out", str(stopped), "--max-steps", "2"])  # step 2 = the last Stage-I step
    for done in stopped.rglob("result.json"):  # a run killed right after that checkpoint has no result yet
        done.unlink()
    train.main([*TINY, "--out", str(stopped), "--resume"])
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((stopped / "results.json").read_text())
    assert a["metrics"] == b["metrics"]
