"""DDIS' KD refuses a synthetic set with missing images (a rank that had not finished, a killed run), naming
the classes and how many images each lacks, instead of distilling on what happens to be on disk."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.ddis import train  # noqa: E402
from examples.ddis.presets import PACS_CLASSES  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kd_refuses_an_incomplete_synthetic_set(tmp_path):
    from torchvision.utils import save_image

    from ddg_models import build_classifier

    torch.manual_seed(0)
    torch.save(build_classifier("resnet18", 7).state_dict(), tmp_path / "teacher.pth")
    images = tmp_path / "run" / "images"
    for c, name in enumerate(PACS_CLASSES):
        for k in range(2):
            if (c, k) in ((2, 1), (5, 0), (5, 1)):
                continue  # what another rank had not written yet
            path = images / f"{c:04d}_{name}" / f"{k:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(torch.rand(3, 8, 8), path)
    args = ["--preset", "pacs", "--stages", "distill", "--teacher", "resnet18", "--teacher-ckpt",
            str(tmp_path / "teacher.pth"), "--out", str(tmp_path / "run"), "--cpu", "--quiet", "--images-per-class",
            "2", "--kd-epochs", "1", "--kd-batch", "4", "--num-workers", "0"]
    with pytest.raises(SystemExit, match=r"giraffe: 1 of 2 missing.*house: 2 of 2 missing"):
        train.main(args)
