"""DDIS' KD stage stopped inside an epoch (--max-steps) and resumed sees the batches of the uninterrupted run and
ends with its weights: an epoch's order is a function of (seed, epoch), not of how many epochs this process has
drawn, and the augmentation stream is part of the checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.ddis.pipeline import KDData, Run, RunConfig, StopRun, run_distill  # noqa: E402
from examples.ddis.presets import PRESETS  # noqa: E402
from examples.ddis.tiny import shift_augment  # noqa: E402
from examples.ddis.tiny_world import TinyBNNet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Recording(nn.Module):
    """A teacher that remembers the id of every image it is shown (written in a corner no shift reaches...
    read before the shift: the batch's ids are the first pixel's row of the unshifted batch)."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.seen = teacher, []

    def forward(self, x):
        self.seen.append(sorted(x[:, 0, 8, 8].round().long().tolist()))
        return self.teacher(x)


def kd(out: Path, accelerator, max_steps=None, resume=False):
    torch.manual_seed(0)
    teacher = Recording(TinyBNNet((4, 8), num_classes=3).eval())
    x = torch.rand(12, 1, 16, 16)
    x[:, :, 7:10, 7:10] = torch.arange(12).float()[:, None, None, None]  # the image's id survives a 1-pixel shift
    preset = PRESETS["tiny"].with_overrides(kd_epochs=2, kd_lr=1e-2, kd_batch=4)
    run = Run.start(RunConfig(preset=preset, out=out, quiet=True, resume=resume, max_steps=max_steps), accelerator,
                    "kd")
    data = KDData(train=torch.utils.data.TensorDataset(x, torch.zeros(12, dtype=torch.long)),
                  build_student=lambda: TinyBNNet((4, 8), num_classes=3), augment=shift_augment)
    try:
        product = run_distill(run, teacher, data)
    except StopRun:
        return teacher.seen, None
    return teacher.seen, product["student"]


def test_resumed_kd_sees_the_uninterrupted_runs_batches(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    straight, weights = kd(tmp_path / "straight", accelerator)
    assert len(straight) == 6 and straight[:3] != straight[3:]  # two epochs of 3 batches, shuffled differently
    seen = []
    for stop in (2, 4, 5):  # inside epoch 1, inside epoch 2 (after an epoch's end), and once more
        part, _ = kd(tmp_path / "resumed", accelerator, max_steps=stop, resume=bool(seen))
        seen += part
    part, resumed = kd(tmp_path / "resumed", accelerator, resume=True)
    seen += part
    assert seen == straight, "the resumed epochs replay another order"
    for k, v in weights.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)
