"""GenDD on two processes (gloo, CPU): each rank draws its own timesteps, noise, CFG-drop masks and mixup
(with one seed for every rank the global batch would see one rank's randomness R times over)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

for _module in ("accelerate", "sklearn", "matplotlib", "tqdm"):
    pytest.importorskip(_module)

from tests.examples.two_ranks import launch_two_ranks  # noqa: E402


def test_ranks_draw_distinct_gendd_randomness(tmp_path):
    launch_two_ranks(Path(__file__).with_name("gendd_rank_draws.py"), str(tmp_path), "--preset", "tiny",
                     "--smoke", "--quiet", "--methods", "gendd")
    ranks = [torch.load(tmp_path / f"draws{r}.pt", weights_only=False) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for step, (a, b) in enumerate(zip(*ranks)):
        for key in ("timesteps", "noise", "keep"):
            assert not torch.equal(a[key], b[key]), f"step {step}: both ranks drew the same {key}"
        assert a["mix"] != b["mix"], f"step {step}: both ranks drew the same mixup coefficient {a['mix']}"
