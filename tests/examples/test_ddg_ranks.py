"""examples/ddg on two CPU processes (torch.distributed.run, gloo): evaluation happens once, a per-domain batch
that the processes cannot share equally is refused, and DDP accepts a run whose patch-token adapter gets no
gradient."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

for _module in ("accelerate", "sklearn", "diffusers", "transformers", "torchvision"):
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.examples.two_ranks import free_port  # noqa: E402

WORKER = ROOT / "tests" / "examples" / "ddg_rank_worker.py"
# The tiny preset cut to a few steps (teachers of 3 steps each): the mechanics, not the numbers.
TINY = ["--preset", "tiny", "--quiet", "--test-envs", "0", "--steps", "4", "--stage1-steps", "2",
        "--swad-start", "1", "--checkpoint-freq", "2", "--teacher-steps", "3,3,3", "--n-converge", "1",
        "--n-tolerance", "2"]


def two_ranks(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def evaluate_calls(out: Path, rank: int) -> int:
    return json.loads((out / f"evaluate-calls-rank{rank}.json").read_text())["evaluate"]


@pytest.fixture(scope="module")
def adapter_unused_run(tmp_path_factory):
    """DDG with conditioning B and beta 0: the patch-token adapter never receives a gradient in Stage II."""
    out = tmp_path_factory.mktemp("ddg_two_ranks") / "run"
    proc = two_ranks(*TINY, "--methods", "ddg", "--conditioning", "patches", "--beta", "0",
                     "--batch-per-domain", "4", "--out", str(out))
    return out, proc


def test_unused_patch_adapter_is_accepted_by_ddp(adapter_unused_run):
    _, proc = adapter_unused_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_evaluation_runs_on_the_main_process_only(adapter_unused_run):
    out, proc = adapter_unused_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert evaluate_calls(out, 0) > 0
    assert evaluate_calls(out, 1) == 0, "rank 1 evaluated: evaluation must run once, on the main process"


def test_batch_not_divisible_by_the_processes_is_refused(tmp_path):
    out = tmp_path / "run"
    proc = two_ranks(*TINY, "--methods", "erm", "--batch-per-domain", "5", "--out", str(out))
    assert proc.returncode != 0, "5 images per domain on 2 processes ran (each process silently took 2)"
    assert "--batch-per-domain 5 is not divisible by the 2 processes" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DDG_CONFORMANCE") != "all",
                    reason="about 2 min: runs with the whole conformance matrix (DDG_CONFORMANCE=all)")
def test_two_process_resume_inside_the_stages(tmp_path):
    """The smoke case with a checkpoint after every step, on two processes: stops inside Stage I and Stage II
    (each rank's loss sums, streams and minibatch position restored) give the uninterrupted run, bit for bit."""
    import dataclasses

    from tests.examples.conformance import Cell, assert_same, run_resumed, run_straight
    from tests.examples.conformance_ddg import CASE

    case = dataclasses.replace(CASE, name="ddg-every-step", argv=[*CASE.argv, "--checkpoint-freq", "1"], check=None)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_straight(case, Cell("no", 2, "straight"), straight)
    assert run_resumed(case, Cell("no", 2, "resumed"), resumed, straight) == [1, 2, 3, 4]
    assert_same(case, Cell("no", 2, "resumed"), straight, resumed)
