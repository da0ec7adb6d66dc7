"""DDIS in the conformance matrix (tests/examples/conformance.py): the ``smoke`` preset (the imagenet_r34_r18 code
path on SD 2.1-base configs cut in depth, generated assets), tokens -> synthesize -> distill.

Its own checks: the exported student reloads through ``ddg_models.load_classifier`` (the loader of a user's
torchvision files) and reproduces the last evaluation on the test set; the exported class tokens reload into the
smoke text stack with ``ClassAlignmentTokens.from_pretrained``; the evaluation rows were written once per KD
epoch; on two processes each rank trained its share of the classes."""
from __future__ import annotations

import json
from pathlib import Path

from tests.examples.conformance import Cell, ConformanceCase, Tolerance


def check(out: Path, cell: Cell) -> None:
    from torch.utils.data import DataLoader

    from ddg_models import ClassAlignmentTokens, load_classifier
    from examples.ddis import data
    from examples.ddis.method import top1
    from examples.ddis.presets import PRESETS
    from examples.ddis.smoke import asset_paths

    preset = PRESETS["smoke"]
    results = json.loads((out / "results.json").read_text())
    student = load_classifier(preset.student, out / "export" / "student.safetensors")
    test = DataLoader(data.image_folder(asset_paths(out)["test_root"], preset.classifier_size, train=False),
                      batch_size=64)
    correct, total = top1(student, test)
    assert 100.0 * correct / total == results["metrics"]["student_test_acc"], \
        "the exported student does not reproduce the last evaluation"

    from transformers import CLIPTextModel, CLIPTokenizer

    sd = asset_paths(out)["pretrained_model"]
    names = data.read_class_names(preset, asset_paths(out)["class_names"])
    tokens = ClassAlignmentTokens.from_pretrained(out / "export" / "class_tokens",
                                                  CLIPTokenizer.from_pretrained(sd / "tokenizer"),
                                                  CLIPTextModel.from_pretrained(sd / "text_encoder"), names)
    assert tokens.learned_embeddings().shape == (preset.num_classes, 1024)
    assert tokens.tokens[0] in tokens.tokenizer.tokenize(tokens.prompt(0)), "the prompt does not use its class token"

    rows = json.loads((out / "log.json").read_text())
    assert [r["epoch"] for r in rows if r["stage"] == "distill"] == list(range(1, preset.kd_epochs + 1)), \
        "one evaluation row per KD epoch, from the main process only"
    trained_by = {r["classes"]: r["rank"] for r in rows if r["stage"] == "tokens"}
    assert sorted(trained_by) == [str(c) for c in range(preset.num_classes)]
    assert set(trained_by.values()) == set(range(cell.processes)), \
        f"the class tokens were trained by ranks {sorted(set(trained_by.values()))} of {cell.processes}"


CASE = ConformanceCase(
    name="ddis",
    argv=["examples/ddis/train.py", "--preset", "smoke", "--quiet"],
    # Measured bit-identical in every cell (the full matrix, OMP_NUM_THREADS=1): bf16 weights and autocast run the
    # same kernels on the same inputs after a resume, and the two ranks' gradient sum (gloo) and their rank-local
    # CAT / synthesis do not depend on where the run was stopped.
    bf16=Tolerance(0.0, 0.0, "bf16 on one thread: the resumed run replays the same bf16 kernels on the same inputs"),
    two_processes=Tolerance(0.0, 0.0, "two ranks: a two-term gloo sum and rank-local CAT/synthesis replay exactly"),
    ci_cells=frozenset({"fp32-1p-resumed", "bf16-2p-straight"}),
    check=check,
    max_stops=4,
)
