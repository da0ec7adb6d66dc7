"""Bad input fails with a message naming the op and the argument, on both the functional API
(either path) and the raw torch.ops (C++ checks): every registry row's bad-input cases."""
import pytest

from ddg_ops.op_registry import REGISTRY


def _params(raw: bool):
    out = []
    for row in REGISTRY:
        for i, case in enumerate(row.bad_inputs()):
            if case.raw != raw:
                continue
            # Index ranges: the CPU kernels raise while they read; the CUDA kernels' device asserts abort
            # the process, so under the CUDA emulator these are skipped and
            # tests/cuda_emu/test_device_asserts.py checks the asserts in a subprocess.
            marks = [pytest.mark.cpu_kernel_only] if case.kernel_only else []
            out.append(pytest.param(case, id=f"{row.name}-{case.argument or 'call'}-{i}", marks=marks))
    return out


@pytest.mark.parametrize("case", _params(raw=False))
def test_functional_rejects_bad_input(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


@pytest.mark.requires_ext
@pytest.mark.parametrize("case", _params(raw=True))
def test_raw_ops_reject_bad_input(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


@pytest.mark.parametrize("row", REGISTRY, ids=lambda r: r.name)
def test_every_row_has_functional_and_raw_bad_inputs(row):
    cases = list(row.bad_inputs())
    assert any(not c.raw for c in cases) and any(c.raw for c in cases)
