"""torch.library.opcheck on every registry row's raw-op samples, backward and helper ops included
(schema, fake kernel, autograd registration, AOT dispatch)."""
import pytest
import torch

import ddg_ops
from ddg_ops.op_registry import REGISTRY

pytestmark = pytest.mark.requires_ext
if not ddg_ops.HAS_EXT:  # the backward samples call the ops while the tests are collected
    pytest.skip(f"compiled extension not loaded: {ddg_ops.EXTENSION.reason}", allow_module_level=True)

SAMPLES = [pytest.param(sample, id=f"{row.name}-{sample.id}") for row in REGISTRY for sample in row.opcheck()]


@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck(sample):
    torch.library.opcheck(sample.overload, sample.args)


def test_every_schema_has_an_opcheck_sample():
    sampled = {p.values[0].op for p in SAMPLES}
    schemas = {s for row in REGISTRY for s in row.schemas}
    assert sampled == schemas, f"schemas without an opcheck sample: {sorted(schemas - sampled)}"
