"""ddg_models.classifiers.load_classifier on the files users have: torchvision state dicts from before BatchNorm
counted its batches (no ``num_batches_tracked``), which torch's strict ``load_state_dict`` accepts."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")

from ddg_models.classifiers import build_classifier, load_classifier  # noqa: E402


def test_loads_a_torchvision_state_dict_without_num_batches_tracked(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet18", 5)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(model.state_dict())
    model.load_state_dict(state)  # what torch itself accepts (BatchNorm fills the counter in)
    torch.save(state, tmp_path / "old_torchvision.pth")
    loaded = load_classifier("resnet18", tmp_path / "old_torchvision.pth")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_other_missing_keys_are_still_an_error(tmp_path):
    state = build_classifier("resnet18", 5).state_dict()
    del state["layer1.0.bn1.running_mean"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing keys: layer1.0.bn1.running_mean"):
        load_classifier("resnet18", tmp_path / "broken.pth")


def test_loads_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_classifier("resnet18", 4).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "student.safetensors"))
    loaded = load_classifier("resnet18", tmp_path / "student.safetensors")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
