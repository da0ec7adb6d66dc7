"""The CUDA kernels' index range checks: an out-of-range index makes the kernel's device assert
fire, which aborts the process as on a GPU. Each call runs in its own emulated subprocess; the
same calls against the CPU kernels (a RuntimeError) are in tests/ops/test_bad_inputs.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.cuda_emulator

_SETUP = "import torch; from tests.ops.test_bad_inputs import ops, f, t6, eps6, SAB, S1M, rows, ci, COEFS\n"


@pytest.mark.parametrize("call,kernel,condition", [
    ("ops.split_token_prepare(f, None, 0.0, None, 1.0, t6 + 500, eps6, SAB, S1M, 4)", "prepare_kernel",
     "step >= 0 && step < p.steps"),
    ("ops.split_token_prepare(f, None, 0.0, torch.tensor([0, -1]), 0.5, t6, eps6, SAB, S1M, 4)", "prepare_kernel",
     "partner >= 0 && partner < p.batch"),
    ("ops.diffusion_loss(torch.randn(6, 8), eps6, t6 - 1, torch.randn(3, 4), COEFS, True)", "loss_kernel",
     "step >= 0 && step < a.steps"),
    ("ops.adaln_modulate(rows, None, None, rows[:2], rows[:2], ci, 1e-6)", "modulate_kernel",
     "ci >= 0 && ci < cond_rows"),
    ("ops.gated_residual(rows, rows[:2], rows, ci)", "gated_kernel", "ci >= 0 && ci < cond_rows"),
    ("ops.cond_rows_sum(rows, ci, 2)", "segment_column_sum_kernel", "offsets[0] == 0 && offsets[segments] == rows"),
], ids=["prepare_timesteps", "prepare_permutation", "loss_timesteps", "adaln_cond_index", "gated_cond_index",
        "cond_rows_sum_index"])
def test_out_of_range_index_fires_the_device_assert(call, kernel, condition):
    proc = subprocess.run([sys.executable, "-c", _SETUP + call + "\nprint('NO ASSERT')"], cwd=ROOT,
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -6 and "NO ASSERT" not in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    assert f"Assertion `{condition}` failed. (kernel {kernel}<" in proc.stderr, proc.stderr[-2000:]
