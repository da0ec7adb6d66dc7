"""examples/ddg: a run stopped with --max-steps at the last Stage-I step resumes into Stage II and ends where the
uninterrupted run ends."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

for _module in ("accelerate", "sklearn", "diffusers", "transformers", "torchvision"):
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.ddg import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--preset", "tiny", "--quiet", "--test-envs", "0", "--steps", "4",
        "--stage1-steps", "2", "--swad-start", "1", "--checkpoint-freq", "1", "--teacher-steps", "3,3,3",
        "--batch-per-domain", "4", "--n-converge", "1", "--n-tolerance", "2"]


def test_resume_from_the_stage_switch_checkpoint(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    argv = [*TINY, "--methods", "ddg"]
    train.main([*argv, "--out", str(straight)])
    train.main([*argv, "--out", str(stopped), "--max-steps", "2"])  # step 2 = the last Stage-I step
    for done in stopped.rglob("result.json"):  # a run killed right after that checkpoint has no result yet
        done.unlink()
    train.main([*argv, "--out", str(stopped), "--resume"])
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((stopped / "results.json").read_text())
    assert a["metrics"] == b["metrics"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DDG_CONFORMANCE") != "all",
                    reason="about 100 s: runs with the whole conformance matrix (DDG_CONFORMANCE=all)")
def test_resume_after_every_checkpoint_of_two_runs(tmp_path):
    """ERM then DDG (8 optimizer steps, a checkpoint after each): stopped after every one and resumed, the run
    ends with the uninterrupted run's metrics and exported students, bit for bit (fp32, one process)."""
    from safetensors.torch import load_file

    argv = [*TINY, "--methods", "erm,ddg"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train.main([*argv, "--out", str(straight)])
    for step in range(1, 8):
        train.main([*argv, "--out", str(stopped), "--max-steps", str(step), *(["--resume"] if step > 1 else [])])
        assert (stopped / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    train.main([*argv, "--out", str(stopped), "--resume"])
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((stopped / "results.json").read_text())
    assert a["metrics"] == b["metrics"]
    files = sorted(p.relative_to(straight) for p in (straight / "export").rglob("*.safetensors"))
    assert len(files) == 2
    for f in files:
        x, y = load_file(str(straight / f)), load_file(str(stopped / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
