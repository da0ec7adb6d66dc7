"""examples/common on two processes (gloo, CPU): the per-rank stream differs between ranks and the shared one
does not; the run log, results and on_main happen on rank 0 only; a checkpoint restores a DDP model, its
optimizer, every RNG and the run's generators on each rank."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from tests.examples.two_ranks import launch_two_ranks  # noqa: E402


def test_two_ranks(tmp_path):
    launch_two_ranks(Path(__file__).with_name("common_rank_worker.py"), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name in ("torch", "numpy", "python", "rank_generator"):
        a, b = (torch.as_tensor(r["drawn"][name]) for r in (r0, r1))
        assert not torch.equal(a, b), f"both ranks drew the same numbers from the per-rank {name} stream"
    assert torch.equal(r0["drawn"]["shared_generator"], r1["drawn"]["shared_generator"])

    written = {p.name for p in (tmp_path / "files0").iterdir()}
    assert written == {"log.csv", "log.json", "log.md", "curves.png", "results.json"}
    assert not (tmp_path / "files1").exists() or not any((tmp_path / "files1").iterdir())
    assert r0["ran_on"] == r1["ran_on"] == "0"

    files = {p.name for p in next((tmp_path / "ckpt").glob("step-*")).iterdir()}
    assert {"rng-rank0.pt", "rng-rank1.pt", "state.pt", "meta.json", "only"} <= files
    for r, rank in ((r0, 0), (r1, 1)):
        assert r["rank_state"] == {"rank": rank} and r["ckpt_stage"] == "only" and r["rows"][0]["loss"] == 0.5
        for key in ("weight", "torch", "g"):
            assert torch.equal(r["after"][key], r["restored"][key]), (rank, key)
        assert all(torch.equal(a, b) for a, b in zip(r["after"]["exp_avg"], r["restored"]["exp_avg"]))
    assert torch.equal(r0["after"]["weight"], r1["after"]["weight"])  # DDP kept the replicas equal
    assert not torch.equal(r0["after"]["torch"], r1["after"]["torch"])
