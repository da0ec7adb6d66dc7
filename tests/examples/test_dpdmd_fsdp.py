"""DP-DMD under FSDP on two CPU ranks (gloo; tests/examples/dpdmd_fsdp_ranks.py emulates accelerate's FSDP1 and
FSDP2 wrapping, which accelerate itself refuses on CPU): the exported student is the whole model, and the
generator's sigma grid keeps its fp32 values under bf16 mixed precision."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

for _module in ("accelerate", "diffusers", "transformers"):
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.examples.two_ranks import launch_two_ranks  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """mode -> both ranks' reports of one two-rank run (generator forward + export), run once per mode."""
    runs = {}

    def get(mode: str):
        if mode not in runs:
            out = tmp_path_factory.mktemp(mode)
            launch_two_ranks(ROOT / "tests/examples/dpdmd_fsdp_ranks.py", mode, "export", str(out), timeout=300)
            runs[mode] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        return runs[mode]
    return get


@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2"])  # FSDP1: accelerate_fsdp.yaml; FSDP2: DTensor parameters
def test_fsdp_export_is_the_full_student(mode, ranks):
    rank0, _ = ranks(mode)
    assert "export_error" not in rank0, rank0["export_error"]
    assert "reload_error" not in rank0, rank0["reload_error"]
    assert rank0["missing"] == [] and rank0["different"] == [], (rank0["missing"], rank0["different"][:5])
    assert rank0["dtypes"] == ["torch.float32"]  # the fp32 master weights, not the bf16 compute copy


def test_fsdp_bf16_keeps_the_sigma_grid(ranks):
    from ddg_models import shifted_flow_sigmas

    grid = shifted_flow_sigmas(4, 3.0)  # 1, 0.8577, 0.6022, 0.0089, 0
    for report in ranks("fsdp1"):
        assert report["sigmas_dtype"] == "torch.float32", report
        assert report["sigmas"] == grid.tolist()
        assert report["timesteps_seen"] == (1000 * grid[:-1]).tolist(), report["timesteps_seen"]
