"""A short run of GenDD's tiny preset (teacher, GenDD stage 2, linear-probe stage; 2 epochs of 2 steps each: 12
optimizer steps, a checkpoint after every epoch) stopped with --max-steps inside an epoch and resumed ends
bit-identical to the uninterrupted one (weights of every stage, log rows, results); a resume with other
settings is refused; a stage's checkpoint never loads into another stage.
Stops at checkpoints (stage boundaries included), bf16 and two processes: the conformance matrix
(tests/examples/conformance_gendd.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

for _module in ("accelerate", "sklearn", "matplotlib", "tqdm"):
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.common import checkpoint  # noqa: E402

ARGS = ["--preset", "tiny", "--epochs", "2", "--probe-epochs", "2", "--steps-per-epoch", "2", "--eval-steps", "3",
        "--eval-samples", "1", "--eval-batches", "1", "--methods", "gendd", "--quiet"]
TIMING = {"epoch_s"}

pytestmark = pytest.mark.usefixtures("restore_determinism")


def train(out: Path, *extra: str):
    """One run of the CLI on one thread (the kernels' blocking, hence the last bits, depend on the count)."""
    from examples.gendd.train import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(ARGS + ["--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)


def final_state(out: Path):
    """The last checkpoint's products (every stage's weights and last row) and log rows, and results.json."""
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    state = torch.load(latest / "state.pt", weights_only=False)
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in state["rows"]]
    results = json.loads((out / "results.json").read_text())
    return state["products"], rows, results


def assert_same_run(a, b):
    (prod_a, rows_a, res_a), (prod_b, rows_b, res_b) = a, b
    assert prod_a.keys() == prod_b.keys() == {"seed0-teacher", "seed0-gendd", "seed0-gendd_probe"}
    for stage in prod_a:
        for name, value in prod_a[stage]["model"].items():
            assert torch.equal(value, prod_b[stage]["model"][name]), (stage, name)
    assert rows_a == rows_b and len(rows_a) == 6
    assert res_a["per_seed"] == res_b["per_seed"]


def train_process(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (accelerate's mixed-precision setting is fixed once per process)."""
    return subprocess.run([sys.executable, str(ROOT / "examples" / "gendd" / "train.py"), *ARGS, "--out", str(out),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def stop_and_resume(out: Path, stop: int, *extra: str):
    assert train(out, "--max-steps", str(stop), *extra) is None  # stopped
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    assert latest.name == f"step-{stop:08d}"
    assert not (out / "results.json").exists()
    return train(out, "--resume", *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(out)
    return final_state(out)


def test_resume_inside_an_epoch_reproduces_the_run(tmp_path, uninterrupted):
    """Step 7: inside GenDD's second epoch, where no epoch-end checkpoint exists (the sampler skips the done
    batch without loading it; the stage's generator resumes mid-epoch)."""
    stop_and_resume(tmp_path, 7)
    assert_same_run(uninterrupted, final_state(tmp_path))


def test_resume_refuses_other_settings(tmp_path):
    train(tmp_path, "--max-steps", "2")
    with pytest.raises(SystemExit, match="other settings.*contraction"):
        train(tmp_path, "--resume", "--contraction", "0.5")
    proc = train_process(tmp_path, "--resume", "--mixed-precision", "bf16")
    assert proc.returncode != 0 and "mixed_precision: checkpoint 'no', now 'bf16'" in proc.stderr


def test_a_stage_checkpoint_never_loads_into_another_stage(tmp_path):
    from accelerate import Accelerator

    train(tmp_path, "--max-steps", "4")  # the teacher's last checkpoint: the next stage is GenDD's
    from examples.gendd.pipeline import RunConfig
    from examples.gendd.train import build_config, parse_args
    rc: RunConfig = build_config(parse_args(ARGS + ["--out", str(tmp_path)]))
    ckpt = checkpoint.latest(tmp_path / "checkpoints", rc.settings())
    assert ckpt.stage == "seed0-teacher" and "seed0-teacher" in ckpt.state["products"]
    with pytest.raises(ValueError, match="holds the state of stage 'seed0-teacher'; refusing to load it into "
                                         "stage 'seed0-gendd'"):
        checkpoint.load(ckpt, Accelerator(cpu=True), "seed0-gendd")
