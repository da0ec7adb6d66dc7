"""DDIS on two processes (torch.distributed.run, gloo): the class tokens are trained by every rank, each its
share of the classes, and the gathered tokens equal a one-process run's (a class's noises depend on cat_seed,
not on the rank that trains it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.ddis.presets import PRESETS  # noqa: E402
from examples.ddis.smoke import build_smoke_assets  # noqa: E402
from tests.examples.two_ranks import launch_two_ranks  # noqa: E402

pytest.importorskip("diffusers")
SCRIPT = ROOT / "examples" / "ddis" / "train.py"


def asset_flags(tmp_path: Path):
    assets = build_smoke_assets(tmp_path / "shared", PRESETS["smoke"])
    return ["--preset", "smoke", "--quiet", "--pretrained-model", str(assets["pretrained_model"]), "--teacher-ckpt",
            str(assets["teacher_ckpt"]), "--class-names", str(assets["class_names"]), "--test-root",
            str(assets["test_root"])]


def tokens_of(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "export" / "class_tokens" / "learned_embeds.safetensors"))


@pytest.mark.slow
def test_class_tokens_are_split_over_the_ranks_and_equal_one_process(tmp_path):
    flags = asset_flags(tmp_path) + ["--stages", "tokens"]
    one = subprocess.run([sys.executable, str(SCRIPT), *flags, "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    launch_two_ranks(SCRIPT, *flags, "--out", str(tmp_path / "two"), timeout=600)
    rows = [r for r in json.loads((tmp_path / "two" / "log.json").read_text()) if r["stage"] == "tokens"
            and "epochs" in r]  # a class's summary row (its epoch rows precede it)
    assert {r["classes"]: r["rank"] for r in rows} == {"0": 0, "1": 1}, "each rank trains its share of the classes"
    single = [r for r in json.loads((tmp_path / "one" / "log.json").read_text()) if r["stage"] == "tokens"
              and "epochs" in r]
    assert [(r["classes"], r["epochs"], r["best_loss"]) for r in rows] == \
        [(r["classes"], r["epochs"], r["best_loss"]) for r in single]
    a, b = tokens_of(tmp_path / "one"), tokens_of(tmp_path / "two")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    steps = json.loads((tmp_path / "two" / "results.json").read_text())["steps"]
    assert steps == max(r["epochs"] for r in rows) < sum(r["epochs"] for r in single), \
        "the ranks train their classes at the same time"
