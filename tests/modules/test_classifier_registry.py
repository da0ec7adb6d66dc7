"""register_classifier: a user's model built, loaded and read through the one pooled-feature protocol, either by
itself (forward_features + fc) or through registered adapters; the registry's errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ddg_models.classifiers import (CLASSIFIER_NAMES, build_classifier, classifier_of, feature_dim, load_classifier,
                                    pooled_features, register_classifier, registered_classifiers, registry)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def scratch_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ADAPTED_TYPES", dict(registry._ADAPTED_TYPES))
    monkeypatch.setattr(registry, "_PENDING_TYPES", dict(registry._PENDING_TYPES))


class ProtocolNet(nn.Module):
    """Follows the protocol by itself: forward_features + fc."""

    def __init__(self, num_classes: int, width: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.conv(x).relu().mean((2, 3))

    def forward(self, x):
        return self.fc(self.forward_features(x))


class ForeignNet(nn.Module):
    """Does not: its feature is a method of another name and its final layer is called 'head'."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(5, num_classes)

    def forward(self, x):
        return self.head(self.trunk(x))


def check_protocol(model: nn.Module, x: torch.Tensor, num_classes: int, dim: int) -> None:
    model.eval()
    with torch.no_grad():
        feats = pooled_features(model, x)
        assert feats.shape == (x.shape[0], dim) and feature_dim(model) == dim
        torch.testing.assert_close(classifier_of(model)(feats), model(x), atol=1e-5, rtol=1e-5)
        assert model(x).shape == (x.shape[0], num_classes)


def test_register_a_model_that_follows_the_protocol_by_itself():
    register_classifier("protocol_net", ProtocolNet)
    assert registered_classifiers()[:len(CLASSIFIER_NAMES)] == CLASSIFIER_NAMES
    assert registered_classifiers()[-1] == "protocol_net"
    model = build_classifier("protocol_net", 7)
    assert type(model) is ProtocolNet and classifier_of(model) is model.fc
    check_protocol(model, torch.randn(3, 3, 9, 11), 7, 6)


def test_register_a_model_through_adapters():
    register_classifier("foreign_net", ForeignNet, features=lambda m, x: m.trunk(x), head=lambda m: m.head)
    model = build_classifier("foreign_net", 4)
    assert classifier_of(model) is model.head
    check_protocol(model, torch.randn(2, 3, 7, 5), 4, 5)
    # The adapters hold for the class, also for an instance built without the registry.
    check_protocol(ForeignNet(3), torch.randn(2, 3, 6, 6), 3, 5)


def test_load_a_checkpoint_of_a_registered_model(tmp_path):
    register_classifier("protocol_net", ProtocolNet)
    saved = build_classifier("protocol_net", 5)
    with torch.no_grad():
        for p in saved.parameters():
            p.uniform_(-1, 1)
    torch.save({"model": {f"module.{k}": v for k, v in saved.state_dict().items()}, "epoch": 3},
               tmp_path / "ckpt.pth")
    loaded = load_classifier("protocol_net", tmp_path / "ckpt.pth")  # num_classes read from fc.weight
    assert not loaded.training
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), saved.eval()(x))
    with pytest.raises(ValueError, match=r"does not fit 'protocol_net' with 6 classes; shape mismatches: fc\.bias"):
        load_classifier("protocol_net", tmp_path / "ckpt.pth", num_classes=6)


def test_torchvision_resnets_use_the_registered_adapter():
    pytest.importorskip("torchvision")
    model = build_classifier("resnet18", 10)
    entry = registry._adapters(model)
    assert entry is not None and entry.features is registry._torchvision_resnet_features and entry.head is None
    assert not hasattr(model, "forward_features")


def test_a_torchvision_resnet_built_by_the_user_follows_the_protocol():
    """Not made by build_classifier (e.g. a teacher loaded with torchvision directly): the adapter still holds."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=7)
    check_protocol(model, torch.randn(2, 3, 32, 32), num_classes=7, dim=512)


def test_model_class_binds_the_adapters_before_any_build():
    register_classifier("foreign", ForeignNet, features=lambda m, x: m.trunk(x), head=lambda m: m.head,
                        model_class=ForeignNet)
    check_protocol(ForeignNet(4), torch.randn(3, 3, 8, 8), num_classes=4, dim=5)


def test_model_class_by_name_binds_once_its_module_is_imported():
    register_classifier("foreign_later", ForeignNet, features=lambda m, x: m.trunk(x), head=lambda m: m.head,
                        model_class=f"{__name__}:ForeignNet")
    assert f"{__name__}:ForeignNet" in registry._PENDING_TYPES  # this module is imported: bound at first use
    check_protocol(ForeignNet(2), torch.randn(1, 3, 8, 8), num_classes=2, dim=5)
    assert f"{__name__}:ForeignNet" not in registry._PENDING_TYPES


def test_bad_model_class():
    with pytest.raises(ValueError, match="'model_class' of 'a' binds adapters, but no features/head adapter"):
        register_classifier("a", ProtocolNet, model_class=ProtocolNet)
    with pytest.raises(ValueError, match="must be a class or 'module:Class', got 'torchvision.ResNet'"):
        register_classifier("b", ForeignNet, features=lambda m, x: m.trunk(x), model_class="torchvision.ResNet")
    with pytest.raises(TypeError, match="must be a class or 'module:Class', got int"):
        register_classifier("c", ForeignNet, features=lambda m, x: m.trunk(x), model_class=3)
    assert not {"a", "b", "c"} & set(registered_classifiers())


def test_every_builtin_is_registered_and_follows_the_protocol_without_adapters_but_torchvision():
    assert set(CLASSIFIER_NAMES) <= set(registered_classifiers())
    for name in CLASSIFIER_NAMES:
        entry = registry._REGISTRY[name]
        if name in ("resnet18", "resnet34", "resnet50"):
            assert entry.features is registry._torchvision_resnet_features
        else:  # the library's own networks implement the protocol themselves
            assert entry.features is None and entry.head is None


def test_duplicate_and_bad_registrations():
    register_classifier("protocol_net", ProtocolNet)
    with pytest.raises(ValueError, match="'protocol_net' is already registered"):
        register_classifier("protocol_net", ForeignNet)
    with pytest.raises(ValueError, match="'resnet8' is already registered"):
        register_classifier("resnet8", ProtocolNet)
    with pytest.raises(TypeError, match="'builder' of 'x' must be callable, got str"):
        register_classifier("x", "ProtocolNet")
    with pytest.raises(TypeError, match="'features' of 'x' must be callable, got int"):
        register_classifier("x", ProtocolNet, features=3)
    with pytest.raises(TypeError, match="'name' must be a non-empty str"):
        register_classifier("", ProtocolNet)
    assert "x" not in registered_classifiers()


def test_bad_builders_fail_at_build_with_the_name():
    register_classifier("returns_tensor", lambda k: torch.zeros(k))
    with pytest.raises(TypeError, match="builder of 'returns_tensor' .* returned a Tensor, expected an nn.Module"):
        build_classifier("returns_tensor", 3)
    register_classifier("no_features", ForeignNet)
    with pytest.raises(TypeError, match="'no_features' built a ForeignNet without forward_features"):
        build_classifier("no_features", 3)
    register_classifier("no_fc", ForeignNet, features=lambda m, x: m.trunk(x))
    with pytest.raises(TypeError, match="'no_fc' built a ForeignNet without an nn.Linear 'fc'"):
        build_classifier("no_fc", 3)
    register_classifier("foreign_a", ForeignNet, features=lambda m, x: m.trunk(x), head=lambda m: m.head)
    register_classifier("foreign_b", ForeignNet, features=lambda m, x: m.trunk(x)[:, :2], head=lambda m: m.head)
    build_classifier("foreign_a", 3)
    with pytest.raises(ValueError, match="'foreign_b' and 'foreign_a' both build ForeignNet"):
        build_classifier("foreign_b", 3)
    with pytest.raises(ValueError, match="unknown classifier 'nope'; known: resnet8, .*mobilenet_v1, "
                                         ".*returns_tensor, no_features, no_fc, foreign_a, foreign_b$"):
        build_classifier("nope")
