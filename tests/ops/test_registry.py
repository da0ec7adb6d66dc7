"""The op registry is complete and drives everything: every torch.ops.ddg schema has a row, a fake,
an autograd registration and a reference (and a newly registered op without them is caught); every
row's kernel matches its reference over the odd and empty grid in every dtype and layout, forward
and backward; ``python -m ddg_ops.info`` and ``python -m ddg_ops.bench`` list what the rows name."""
import dataclasses
import importlib

import pytest
import torch

import ddg_ops
from ddg_ops import info
from ddg_ops.bench.__main__ import FAMILIES
from ddg_ops.op_registry import NAMESPACE, REGISTRY, coverage_problems, families, registered_schemas, row
from ddg_ops.selftest import Grid, run_checks
from ddg_ops.testing import DTYPES

CPU = torch.device("cpu")


@pytest.mark.requires_ext
def test_every_registered_schema_is_complete():
    schemas = registered_schemas()
    assert "cfg_combine" in schemas and "cond_rows_sum" in schemas
    assert coverage_problems() == []


def test_rows_are_unique_and_name_public_functions():
    names = [r.name for r in REGISTRY]
    assert len(names) == len(set(names))
    owned = [s for r in REGISTRY for s in r.schemas]
    assert len(owned) == len(set(owned)), "a schema belongs to one row"
    for r in REGISTRY:
        assert getattr(ddg_ops, r.name) is r.function
        assert getattr(ddg_ops.reference, r.reference.__name__) is r.reference
        assert importlib.import_module(f"ddg_ops.{r.family}").__name__ == f"ddg_ops.{r.family}"


@pytest.fixture
def scratch_op():
    """An operator defined the way csrc/ddg_ops.cpp defines one, in a namespace of its own."""
    lib = torch.library.Library("ddg_registry_scratch", "DEF")
    lib.define("scaled(Tensor x, float s) -> Tensor")
    yield "ddg_registry_scratch", "ddg_registry_scratch::scaled"
    lib._destroy()


def test_a_new_op_without_row_fake_or_autograd_is_caught(scratch_op):
    namespace, qualname = scratch_op
    problems = coverage_problems(namespace, registry=())
    assert problems == [f"{qualname}: no registry row names it (ddg_ops/op_registry/<family>.py)",
                        f"{qualname}: no fake kernel (ddg_ops/_fake.py)",
                        f"{qualname}: no autograd registration (ddg_ops/_autograd.py)"]
    torch.library.register_fake(qualname, lambda x, s: torch.empty_like(x))
    torch.library.register_autograd(qualname, lambda ctx, grad: (grad, None))
    assert coverage_problems(namespace, registry=()) == [f"{qualname}: no registry row names it "
                                            "(ddg_ops/op_registry/<family>.py)"]
    scratch_row = dataclasses.replace(row("gated_residual"), name="scaled", schemas=("scaled",))
    assert coverage_problems(namespace, (scratch_row,)) == []
    no_reference = dataclasses.replace(scratch_row, reference=None)
    assert coverage_problems(namespace, (no_reference,)) == ["scaled: no reference (ddg_ops/reference.py)"]
    no_reason = dataclasses.replace(scratch_row, gradcheck=lambda: ())
    assert coverage_problems(namespace, (no_reason,)) == [
        "scaled: no gradcheck samples and no reason (no_gradcheck) why"]


@pytest.mark.requires_ext
def test_a_row_naming_a_missing_operator_is_caught():
    ghost = dataclasses.replace(row("bn_stats"), schemas=("bn_stats", "bn_stats_backward", "bn_stats_twice"))
    problems = coverage_problems(NAMESPACE, (*REGISTRY[:3], ghost, *REGISTRY[4:]))
    assert problems == ["bn_stats: names operators not registered under torch.ops.ddg: ['bn_stats_twice']"]


@pytest.mark.requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", [r.name for r in REGISTRY])
def test_kernel_matches_reference_on_the_grid(op, dtype):
    """Every odd and empty shape, layout and variant of the row, forward and gradients, against the
    fp64 reference with the dtype's TOLERANCES; the row's operators must have run on the CPU."""
    report = run_checks(CPU, Grid(quick=True, dtypes=(dtype,), sizes=("odd", "empty"), ops=(op,)))
    assert report.mismatches == [], "\n".join(map(str, report.mismatches[:10]))
    assert report.summaries[op].points > 0
    assert not report.not_run, report.not_run


def test_info_lists_every_row():
    text = info.report()
    for r in REGISTRY:
        assert any(line.split()[:2] == [r.name, r.family] for line in text.splitlines()), r.name


def test_bench_families_are_the_rows_families():
    assert set(FAMILIES) == {r.bench.family for r in REGISTRY if r.bench}
    for family, rows in families().items():
        benched = [r for r in rows if r.bench]
        for r in benched:
            module = importlib.import_module(FAMILIES[r.bench.family])
            kernels = {k for k, _ in module.cases(False, CPU)}
            missing = set(r.bench.kernels) - kernels
            assert not missing, f"{r.name}: bench kernels {sorted(missing)} not in {FAMILIES[r.bench.family]}"


def test_ddg_ops_imports_nothing_above_it():
    """The op layer (the bench included) loads without ddg_models or ddg_losses."""
    import subprocess
    import sys
    code = ("import sys, ddg_ops, ddg_ops.bench.__main__, ddg_ops.selftest.__main__, ddg_ops.info; "
            "import ddg_ops.bench.guidance, ddg_ops.bench.bn_stats, ddg_ops.bench.split_token; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ddg_models', 'ddg_losses')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
