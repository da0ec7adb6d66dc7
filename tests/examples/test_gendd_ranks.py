"""GenDD on two processes (gloo, CPU): each rank draws its own timesteps, noise, CFG-drop masks and mixup
(with one seed for every rank the global batch would see one rank's randomness R times over)."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

for _module in ("accelerate", "sklearn", "matplotlib", "tqdm"):
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(script: Path, *args: str, timeout: float = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ranks_draw_distinct_gendd_randomness(tmp_path):
    launch_two_ranks(Path(__file__).with_name("gendd_rank_draws.py"), str(tmp_path), "--preset", "tiny",
                     "--smoke", "--quiet", "--methods", "gendd")
    ranks = [torch.load(tmp_path / f"draws{r}.pt", weights_only=False) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for step, (a, b) in enumerate(zip(*ranks)):
        for key in ("timesteps", "noise", "keep"):
            assert not torch.equal(a[key], b[key]), f"step {step}: both ranks drew the same {key}"
        assert a["mix"] != b["mix"], f"step {step}: both ranks drew the same mixup coefficient {a['mix']}"
