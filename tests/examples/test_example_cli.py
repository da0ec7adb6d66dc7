"""The shared command-line pieces: --attention-backend on the examples that run diffusers models (DDG, DDIS,
DP-DMD), carried into their run configuration."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.ddg import train as ddg_train  # noqa: E402
from examples.ddis import train as ddis_train  # noqa: E402
from examples.dpdmd import train as dpdmd_train  # noqa: E402


@pytest.mark.parametrize("train", [ddg_train, ddis_train, dpdmd_train], ids=["ddg", "ddis", "dpdmd"])
def test_attention_backend_option(train, capsys):
    assert train.parse_args([]).attention_backend == "sdpa"
    assert train.parse_args(["--attention-backend", "xformers"]).attention_backend == "xformers"
    with pytest.raises(SystemExit):
        train.parse_args(["--attention-backend", "flash"])
    assert "invalid choice: 'flash'" in capsys.readouterr().err


def test_ddg_run_config_carries_the_backend():
    rc = ddg_train.build_config(ddg_train.parse_args(["--attention-backend", "xformers"]))
    assert rc.attention_backend == "xformers"
