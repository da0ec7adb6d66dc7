"""GenDD on two processes (gloo, CPU): each rank draws its own timesteps, noise, CFG-drop masks and mixup
(with one seed for every rank the global batch would see one rank's randomness R times over), and a 2-rank run
stopped and resumed ends as the uninterrupted one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

for _module in ("accelerate", "sklearn", "matplotlib", "tqdm"):
    pytest.importorskip(_module)

from tests.examples.two_ranks import ROOT, launch_two_ranks  # noqa: E402


def test_ranks_draw_distinct_gendd_randomness(tmp_path):
    launch_two_ranks(Path(__file__).with_name("gendd_rank_draws.py"), str(tmp_path), "--preset", "tiny",
                     "--epochs", "1", "--steps-per-epoch", "2", "--eval-steps", "3", "--eval-samples", "1",
                     "--eval-batches", "1", "--quiet", "--methods", "gendd", "--stages", "stage2")
    ranks = [torch.load(tmp_path / f"draws{r}.pt", weights_only=False) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for step, (a, b) in enumerate(zip(*ranks)):
        for key in ("timesteps", "noise", "keep"):
            assert not torch.equal(a[key], b[key]), f"step {step}: both ranks drew the same {key}"
        assert a["mix"] != b["mix"], f"step {step}: both ranks drew the same mixup coefficient {a['mix']}"


def _metrics_and_export(out: Path):
    import json

    from safetensors.torch import load_file

    metrics = json.loads((out / "results.json").read_text())["metrics"]
    files = sorted(p for p in (out / "export").rglob("*.safetensors"))
    return metrics, {str(p.relative_to(out)): load_file(str(p)) for p in files}


@pytest.mark.slow
def test_two_rank_stop_and_resume_matches(tmp_path):
    """``--preset smoke`` on 2 ranks, stopped inside stage 2's first epoch (step 6: the sampler skips the done
    batches of both ranks' shards) and resumed, ends with the uninterrupted 2-rank run's metrics and exported
    tensors. Tolerance: none. Each rank replays its own streams from its rng-rank file, the gloo all-reduce of
    two ranks' gradients is one addition whichever rank holds which operand, and the evaluation's chunks do not
    depend on the ranks: measured bit-identical. The ranks' checkpointed GenDD generators differ."""
    train = ROOT / "examples" / "gendd" / "train.py"
    args = ("--preset", "smoke", "--quiet")
    launch_two_ranks(train, *args, "--out", str(tmp_path / "straight"))
    launch_two_ranks(train, *args, "--out", str(tmp_path / "resumed"), "--max-steps", "6")
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-00000006"
    assert not (tmp_path / "resumed" / "results.json").exists() and (ckpt / "meta.json").is_file()
    draws = [torch.load(ckpt / f"rng-rank{r}.pt", weights_only=False)["generators"]["method"] for r in (0, 1)]
    assert not torch.equal(*draws), "both ranks' GenDD generators are in one state"
    launch_two_ranks(train, *args, "--out", str(tmp_path / "resumed"), "--resume")
    (m_a, e_a), (m_b, e_b) = (_metrics_and_export(tmp_path / d) for d in ("straight", "resumed"))
    assert m_a == m_b and set(m_a) >= {"stage1_acc", "stage2_acc_sample", "stage2_loss"}
    assert e_a.keys() == e_b.keys() and len(e_a) == 4
    for name in e_a:
        for key, value in e_a[name].items():
            assert torch.equal(value, e_b[name][key]), (name, key)
