"""GenDD's conformance case: ``--preset smoke`` (the ImageNet pair r34_r18's path: ResNet-34 teacher from a
torchvision state dict, ResNet-18 student, stage 1 then GenDD stage 2; 12 optimizer steps, a checkpoint after
each epoch: steps 4, 8, 12) in every cell of the matrix.

GenDD-specific checks (``check``): the exported student, condition LayerNorm, head and teacher classifier
reload with ``examples.gendd.export.load_gendd`` and, re-evaluated on one process, give the run's last
evaluation (the evaluation is split between ranks in fixed chunks with per-chunk sampling seeds, so a 2-process
run's numbers are reproduced by one process too); the exported tensors are the final checkpoint's stage-2
weights; on 2 processes the ranks' GenDD generators (timesteps, noise, CFG-drop masks, mixup) are in different
states.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.examples.conformance import ConformanceCase, Tolerance

STAGE2_KEYS = ("acc_sample", "acc_sample_skip", "acc_probe")


def check(out: Path, cell) -> None:
    from safetensors.torch import load_file

    from examples.gendd import data, smoke
    from examples.gendd.export import evaluate_export, load_gendd
    from examples.gendd.presets import PRESETS

    out = Path(out)
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    exported = load_gendd(out / "export")
    assert exported.info["measured"] == {k: metrics[f"stage2_{k}"] for k in STAGE2_KEYS}
    data_root, _ = smoke.build("smoke", out)  # the fixtures the run read (already complete: not rewritten)
    _, test = data.datasets_for("imagenet", data_root, image_size=PRESETS["smoke"].image_size)
    assert evaluate_export(exported, test) == exported.info["measured"]

    ckpts = out / "checkpoints"
    latest = ckpts / (ckpts / "latest").read_text().strip()
    stage2 = torch.load(latest / "state.pt", map_location="cpu", weights_only=False)["products"]["stage2"]["model"]
    parts = {"student.": load_file(str(out / "export" / "student.safetensors")),
             "gendd.cond_norm.": load_file(str(out / "export" / "cls_projector.safetensors")),
             "gendd.head.": load_file(str(out / "export" / "head" / "model.safetensors"))}
    for prefix, tensors in parts.items():
        for name, value in tensors.items():
            assert torch.equal(value, stage2[prefix + name]), prefix + name

    ranks = sorted(latest.glob("rng-rank*.pt"))
    if len(ranks) > 1:
        states = [torch.load(r, weights_only=False)["generators"]["method"] for r in ranks]
        assert not torch.equal(states[0], states[1]), "both ranks' GenDD generators are in one state"


CASE = ConformanceCase(
    name="gendd",
    argv=["examples/gendd/train.py", "--preset", "smoke", "--quiet"],
    bf16=Tolerance(0.0, 0.0, "measured bit-identical: the resumed run replays the same bf16 autocast kernels on "
                             "the same inputs on one thread, and the diffusion loss and evaluation run in fp32"),
    two_processes=Tolerance(0.0, 0.0, "measured bit-identical: each rank replays its own streams from its "
                                      "rng-rank file, the gloo all-reduce of two ranks' gradients is one addition "
                                      "(commutative), and the evaluation's chunks do not depend on the ranks"),
    # CI: the exact resume (3 stops: the stage boundary, stage 2's first epoch end, the last step; ~75 s) and
    # bf16 on two ranks (the 2-rank export re-evaluated on one process; ~45 s); the rest ~6 min, slow
    ci_cells=frozenset({"fp32-1p-resumed", "bf16-2p-straight"}),
    check=check,
)
