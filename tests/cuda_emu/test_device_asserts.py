"""The CUDA kernels' index range checks: an out-of-range index makes the kernel's device assert
fire, which aborts the process as on a GPU. The calls are the op registry's bad inputs that carry a
``device_assert`` (the same calls against the CPU kernels raise a RuntimeError in
tests/ops/test_bad_inputs.py); each runs in its own emulated subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddg_ops.op_registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.cuda_emulator

CASES = [pytest.param(row.name, i, case.device_assert, id=f"{row.name}-{case.argument}")
         for row in REGISTRY for i, case in enumerate(row.bad_inputs()) if case.device_assert]


def test_every_kernel_range_check_has_a_case():
    assert len(CASES) == 6
    assert {p.values[0] for p in CASES} == {"split_token_prepare", "diffusion_loss", "adaln_modulate",
                                            "gated_residual"}


@pytest.mark.parametrize("op,index,device_assert", CASES)
def test_out_of_range_index_fires_the_device_assert(op, index, device_assert):
    kernel, condition = device_assert
    code = (f"from ddg_ops.op_registry import row\n"
            f"list(row({op!r}).bad_inputs())[{index}].call()\n"
            f"print('NO ASSERT')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -6 and "NO ASSERT" not in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    assert f"Assertion `{condition}` failed. (kernel {kernel}<" in proc.stderr, proc.stderr[-2000:]
