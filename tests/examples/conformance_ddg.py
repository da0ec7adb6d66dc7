"""DDG's conformance case: ``--preset smoke`` (the PACS path: a generated DomainBed PACS folder, a CLIP ViT-L/14
teacher and a CLIP ViT-B/16 student from transformers folders, an SD v1.4 diffusers folder; one DDG run on the
held-out 'sketch': Stage I steps 1-2, Stage II steps 3-4, a checkpoint every 2 steps, so the stops are the Stage
I -> II switch and the end) in every cell of the matrix.

DDG-specific checks (``check``): the exported selected student reloads with ``examples.ddg.export.load_student``
and, evaluated on the test domain, reproduces the run's selected accuracy; the exported tensors are the weights
of the selected evaluation (the training-domain-validation choice, kept in the checkpoints); the run log has one
row per evaluation with the stage recorded (Stage I at 2, Stage II at 4); the SD teacher ran in the cell's
precision (bf16 weights under bf16 mixed precision); on 2 processes the ranks' diffusion generators (timesteps,
noise) are in different states.

CI runs the bf16 two-process resumed cell (with its uninterrupted run): the setting of a GPU user, and with a
zero tolerance it also holds the resume to bit-exactness. The fp32 one-process resume is also covered in CI by
tests/examples/test_ddg_resume.py (the stop at the Stage I -> II switch); the rest of the matrix is slow.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.examples.conformance import ConformanceCase, Tolerance

RUN = "sketch_seed0_ddg"


def check(out: Path, cell) -> None:
    from examples.ddg.data import eval_loader, load_environments
    from examples.ddg.export import load_student
    from examples.ddg.pipeline import evaluate
    from examples.ddg.presets import PRESETS

    out = Path(out)
    p = PRESETS["smoke"]
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    # the frozen SD teacher runs in the mixed-precision dtype (its latents and loss stay fp32)
    assert results["sd_dtype"] == {"no": "torch.float32", "bf16": "torch.bfloat16"}[cell.precision], results["sd_dtype"]
    assert set(metrics) == {f"{RUN}/selected_acc", f"{RUN}/swad_acc", f"{RUN}/last_acc", "sketch_seed0_zeroshot/acc"}
    envs = load_environments(p, str(out / "smoke_assets" / "data"), 0)
    student = load_student(out / "export" / RUN)
    test = eval_loader(envs.splits[envs.names.index("sketch")].eval_in, p.test_batch, 0)
    assert evaluate(student, {"test": test}, "cpu")["test_acc"] == metrics[f"{RUN}/selected_acc"]

    rows = json.loads((out / "log.json").read_text())
    assert [(r["run_step"], r["stage"]) for r in rows] == [(2, "stage1"), (4, "stage2")]
    assert "diff" in rows[1] and "diff" not in rows[0]

    ranks = sorted((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()).glob("rng-rank*.pt"))
    if len(ranks) > 1:
        states = [torch.load(r, weights_only=False)["generators"]["noise"] for r in ranks]
        assert not torch.equal(states[0], states[1]), "both ranks' diffusion generators are in one state"


CASE = ConformanceCase(
    name="ddg",
    argv=["examples/ddg/train.py", "--preset", "smoke", "--quiet"],
    bf16=Tolerance(0.0, 0.0, "measured bit-identical: the resumed run replays the same bf16 autocast kernels on the "
                             "same inputs on one thread, from the checkpointed weights, optimizer and streams"),
    two_processes=Tolerance(0.0, 0.0, "measured bit-identical: each rank replays its own streams from its rng-rank "
                                      "file, the gloo all-reduce of two ranks' gradients is one addition "
                                      "(commutative), and the evaluation runs on the main process only"),
    ci_cells=frozenset({"bf16-2p-resumed"}),
    check=check,
)
