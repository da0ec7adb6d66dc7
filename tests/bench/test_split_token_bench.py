"""The split-token benchmark's providers compute the same thing (so its timings compare like with like).

torch.compile is left out (its warm-up takes minutes on a small CPU); it wraps the eager step.
"""
import pytest
import torch

from ddg_ops.bench import split_token
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
    assert set(rows_per_step.values()) == {640}, rows_per_step  # the spec's eval rows per step (CIFAR, B = 64)
