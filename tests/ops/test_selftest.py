"""python -m ddg_ops.selftest: its check core on a tiny grid, that it catches a wrong forward and a wrong
backward kernel, that every registered op has a case, and its exit statuses."""
import dataclasses
import json

import pytest
import torch

import ddg_ops
from ddg_ops.selftest import Grid, registered_ops, run_checks, uncovered_ops
from ddg_ops.selftest.__main__ import EXIT_MISMATCH, EXIT_OK, EXIT_UNAVAILABLE, main
from ddg_ops.op_registry import REGISTRY as CASES
from ddg_ops.selftest.facts import arch_coverage

pytestmark = pytest.mark.requires_ext

CPU = torch.device("cpu")
# One odd shape per op in two dtypes: every op, layout and variant, in seconds.
TINY = Grid(quick=True, dtypes=(torch.float32, torch.bfloat16), sizes=("odd",), shapes_per_size=1)


def test_every_registered_op_has_a_case():
    ops = registered_ops()
    assert "cfg_combine" in ops and "cfg_combine_backward" in ops
    assert uncovered_ops() == []
    named = {op for case in CASES for op in case.schemas}
    assert named == set(ops), f"cases name operators that are not registered: {sorted(named - set(ops))}"


def test_a_new_op_without_a_case_fails_the_run():
    without = tuple(c for c in CASES if c.name != "gated_residual")
    assert uncovered_ops(without) == ["gated_residual", "gated_residual_backward"]
    report = run_checks(CPU, Grid(quick=True, dtypes=(torch.float32,), sizes=("empty",), ops=("cfg_combine",)),
                        cases=without)
    assert not report.ok and report.uncovered == ["gated_residual", "gated_residual_backward"]


def test_tiny_grid_passes_and_runs_every_kernel():
    report = run_checks(CPU, TINY)
    assert report.mismatches == [], "\n".join(map(str, report.mismatches[:10]))
    assert report.ok
    assert set(report.summaries) == {c.name for c in CASES}
    assert all(s.points > 0 for s in report.summaries.values())
    # Forward and backward operators both ran on CPU: the check is not the reference against itself.
    assert all(report.ran_on[op] == ["cpu"] for op in registered_ops())


class _OffByOnePercent:
    """Stands in for torch.ops.ddg.<op>: calls return every result 1% too large; attributes (the
    .default overload torch's Python dispatch looks up by name) are the real op's."""

    def __init__(self, real):
        self.real = real

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out * 1.01
        return type(out)(t * 1.01 for t in out)

    def __getattr__(self, name):
        return getattr(self.real, name)


def _off_by_one_percent(monkeypatch, op: str):
    """The functional API looks torch.ops.ddg.<op> up per call, so it gets the wrong results."""
    monkeypatch.setattr(torch.ops.ddg, op, _OffByOnePercent(getattr(torch.ops.ddg, op)))


@pytest.mark.parametrize("op,case", [("cfg_combine", "cfg_combine"), ("gated_residual_backward", "gated_residual"),
                                     ("bn_stats", "bn_stats")])
def test_a_wrong_kernel_is_reported(monkeypatch, op, case):
    """A forward (or backward) op whose result is 1% off: the self-test names the op, dtype, layout,
    shape, result and error, and fails."""
    _off_by_one_percent(monkeypatch, op)
    grid = Grid(quick=True, dtypes=(torch.float32,), sizes=("odd",), ops=(case,), shapes_per_size=1)
    report = run_checks(CPU, grid)
    assert not report.ok and report.mismatches
    assert {m.point.op for m in report.mismatches} == {case}
    results = {m.result for m in report.mismatches}
    if op.endswith("_backward"):
        assert results == {"grad_gate", "grad_h"}  # grad_x is grad_output itself, not the op's
    else:
        assert "out0" in results
    first = str(report.mismatches[0])
    assert case in first and "float32" in first and "max abs err" in first and "atol" in first


def test_a_kernel_that_falls_back_to_the_reference_is_reported(monkeypatch):
    """If the functional API stops calling the op (a fallback), the self-test must not pass on the reference."""
    monkeypatch.setattr(ddg_ops.split_token, "use_kernel", lambda t: False)
    report = run_checks(CPU, Grid(quick=True, dtypes=(torch.float32,), sizes=("odd",), ops=("gated_residual",),
                                  shapes_per_size=1))
    assert report.mismatches == [] and not report.ok
    assert report.not_run == {"gated_residual": ["gated_residual", "gated_residual_backward"]}


def test_an_exception_is_a_failure_of_that_point():
    def broken(shape, dtype, layout, variant, device):
        raise RuntimeError("no kernel image is available for execution on the device")

    case = dataclasses.replace(CASES[0], schemas=("cfg_combine",), shapes={"odd": ((3, 4),)}, layouts=("contiguous",),
                               variants=("scale",), build=broken)
    report = run_checks(CPU, Grid(quick=True, dtypes=(torch.float32,), sizes=("odd",), ops=("cfg_combine",)),
                        cases=(case,) + CASES[1:])
    assert [m.result for m in report.mismatches] == ["error"]
    assert "no kernel image" in report.mismatches[0].detail


def test_main_exit_status_and_json(monkeypatch, tmp_path):
    out = tmp_path / "report.json"
    argv = ["--device", "cpu", "--quick", "--ops", "gated_residual", "--dtype", "float32", "--sizes", "odd",
            "--no-bandwidth", "--json", str(out)]
    assert main(argv) == EXIT_OK
    report = json.loads(out.read_text())
    assert report["ok"] and report["checks"]["points"] > 0 and report["checks"]["mismatches"] == []
    assert report["facts"]["backends"]["gated_residual"] == "cpu kernel"
    _off_by_one_percent(monkeypatch, "gated_residual")
    assert main(argv) == EXIT_MISMATCH
    report = json.loads(out.read_text())
    assert not report["ok"]
    m = report["checks"]["mismatches"][0]
    assert m["op"] == "gated_residual" and m["result"] == "out0" and "max abs err" in m["detail"]


@pytest.mark.skipif(torch.cuda.is_available() and "cuda" in ddg_ops.EXTENSION.device_types,
                    reason="this machine has CUDA kernels and a GPU to test")
def test_cuda_requested_without_cuda_kernels_or_gpu(capsys):
    assert main(["--device", "cuda", "--quick"]) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "--device cuda" in err and ("no CUDA GPU" in err or "without CUDA kernels" in err)


def test_arch_coverage():
    assert arch_coverage((8, 0), "8.0;9.0+PTX") == (True, "SASS for sm_80")
    assert arch_coverage((8, 6), "8.0;9.0+PTX")[0] is True  # sm_80 SASS runs on sm_86
    assert arch_coverage((9, 0), "9.0+PTX") == (True, "SASS for sm_90")
    assert arch_coverage((8, 0), "9.0+PTX")[0] is False  # A100 on an H100-only build
    covered, how = arch_coverage((10, 0), "8.0;9.0+PTX")
    assert covered and "PTX compute_90" in how
    assert arch_coverage((12, 0), "9.0a")[0] is False  # arch-specific SASS: exactly sm_90 only
    assert arch_coverage((9, 0), "visible GPUs")[0] is None


def test_cuda_device_outside_the_built_archs_is_refused(monkeypatch):
    """An A100 (sm_80) with kernels built for 9.0+PTX only: a clear refusal, not a flood of launch errors."""
    from ddg_ops._ext import ExtensionState
    from ddg_ops.selftest import __main__ as selftest_main

    built = ExtensionState(True, "loaded", {"backends": ["cpu", "cuda"], "cuda_arch_list": "9.0+PTX"},
                           frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(selftest_main, "EXTENSION", built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    message = selftest_main.unavailable(torch.device("cuda"))
    assert "A100" in message and "sm_80" in message and "TORCH_CUDA_ARCH_LIST including 8.0" in message
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert selftest_main.unavailable(torch.device("cuda")) is None
