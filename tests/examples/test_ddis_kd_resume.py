"""DDIS' KD stage resumed after an epoch sees the batches of the uninterrupted run: an epoch's order is a function
of (seed, epoch), not of how many epochs this process has drawn."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.ddis import distill  # noqa: E402
from examples.ddis.presets import PRESETS  # noqa: E402
from examples.ddis.tiny_world import TinyBNNet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Recording(nn.Module):
    """A teacher that remembers the first pixel of every image it is shown (each image's id)."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.seen = teacher, []

    def forward(self, x):
        self.seen.append(x[:, 0, 0, 0].round().long().tolist())
        return self.teacher(x)


def kd_batches(out: Path, epochs: int, resume: bool):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    teacher = Recording(TinyBNNet((4, 8), num_classes=3).eval())
    x = torch.rand(12, 1, 16, 16)
    x[:, 0, 0, 0] = torch.arange(12).float()  # the image's id, read back by the teacher
    loader = DataLoader(TensorDataset(x, torch.zeros(12, dtype=torch.long)), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    preset = PRESETS["tiny"].with_overrides(kd_epochs=epochs, kd_lr=1e-2)
    distill.distill(teacher, TinyBNNet((4, 8), num_classes=3), loader, preset, out, resume=resume, quiet=True,
                    log=lambda m: None)
    return teacher.seen


def test_resumed_kd_sees_the_uninterrupted_runs_batches(tmp_path):
    straight = kd_batches(tmp_path / "straight", 2, resume=False)
    first = kd_batches(tmp_path / "resumed", 1, resume=False)
    second = kd_batches(tmp_path / "resumed", 2, resume=True)
    assert first == straight[:3]
    assert second == straight[3:], "the resumed epoch 2 replays epoch 1's order"
