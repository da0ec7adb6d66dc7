"""The split-token benchmarks' providers compute the same thing (so their timings compare like with like):
the head's module benchmark (benchmarks/split_token_head.py) and the row ops' family (ddg_ops.bench).

torch.compile is left out (its warm-up takes minutes on a small CPU); it wraps the eager step.
"""
import pytest
import torch

from benchmarks import split_token_head as split_token
from ddg_ops.bench import split_token as row_ops
from ddg_ops.bench._utils import assert_matches


@pytest.mark.parametrize("kernel,shape,mode", [(kernel, shape, mode) for kernel, shape in split_token.QUICK
                                               for mode in split_token.kernel_modes(kernel)])
def test_ddg_matches_straightforward_head(kernel, shape, mode):
    case = split_token.Case(kernel, shape, torch.float32, mode, "cpu")
    expected = case.results(case.step("eager")())
    got = case.results(case.step("ddg")())
    assert len(got) == (2 if mode == "full" and kernel.startswith("train") else 1)
    assert_matches("ddg", got, expected, torch.float32)
    assert "GFLOP" in case.note("ddg")


def test_cases_cover_the_spec_configs():
    names = [kernel for kernel, _ in split_token.cases(False, "cpu")]
    assert set(names) == set(split_token.TRAIN) | set(split_token.SAMPLE)
    rows_per_step = {kernel: 2 * shape[0] * shape[3] * shape[1] // split_token.TOKEN
                     for kernel, shape in split_token.cases(False, "cpu") if kernel.startswith("sample")}
    assert set(rows_per_step.values()) == {640}, rows_per_step  # GenDD's eval rows per step (CIFAR, B = 64)


@pytest.mark.requires_ext
@pytest.mark.parametrize("kernel,mode", [(kernel, mode) for kernel in row_ops.KERNEL_MODES
                                         for mode in row_ops.kernel_modes(kernel)])
def test_row_ops_match_the_reference(kernel, mode):
    """The ops-level family at a small shape (the bench checks the same before it times)."""
    case = row_ops.Case(kernel, (64, row_ops.WIDTH), torch.float32, mode, "cpu")
    expected = case.results(case.step("eager")())
    got = case.results(case.step("ddg")())
    assert len(got) == len(expected) > (1 if mode == "full" else 0)
    assert_matches("ddg", got, expected, torch.float32, row_ops.TOLERANCE)
