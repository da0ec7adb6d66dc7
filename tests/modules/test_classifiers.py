"""ddg_models.classifiers: the CIFAR (RepDistiller / CRD) and ImageNet teacher/student networks of
GenDD's pairs: shapes, the pooled-feature interface, parameter counts against the published
numbers, checkpoint names, and load_classifier's formats and errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddg_models.classifiers import (CIFAR_CLASSIFIERS, CifarResNet, WideResNet, build_classifier, classifier_of,
                                    feature_dim, load_classifier, pooled_features)


pytestmark = pytest.mark.usefixtures("one_thread")


# Exact parameter counts of this implementation (CIFAR: 100 classes; ImageNet: 1000 classes). They
# equal those of the reference code (RepDistiller's models/, torchvision, GenDD's MobileNetV1).
PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_40_2": 2_255_156, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_16_1": 180_916,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "mobilenet_v1": 4_231_976,
}
# Published sizes in millions: the CIFAR-100 KD tables (RepDistiller / CRD lineage), torchvision's
# model docs, Howard et al. (2017) for MobileNetV1.
PUBLISHED_M = {
    "resnet110": "1.7", "resnet56": "0.86", "resnet32x4": "7.43", "resnet8x4": "1.23", "wrn_40_2": "2.26",
    "wrn_16_2": "0.70", "wrn_40_1": "0.57", "vgg13": "9.46", "vgg8": "3.96",
    "resnet18": "11.7", "resnet34": "21.8", "resnet50": "25.6", "mobilenet_v1": "4.2",
}
FEATURE_DIM = {
    **dict.fromkeys(["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"], 64),
    "resnet8x4": 256, "resnet32x4": 256, "wrn_40_2": 128, "wrn_16_2": 128, "wrn_40_1": 64, "wrn_16_1": 64,
    **dict.fromkeys(["vgg8", "vgg11", "vgg13", "vgg16", "vgg19"], 512),
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "mobilenet_v1": 1024,
}
TORCHVISION = ("resnet18", "resnet34", "resnet50")
IMAGENET = TORCHVISION + ("mobilenet_v1",)


def build(name: str, num_classes: int) -> nn.Module:
    if name in TORCHVISION:
        pytest.importorskip("torchvision")
    return build_classifier(name, num_classes)


def check_feature_interface(model: nn.Module, x: torch.Tensor, num_classes: int, dim: int) -> None:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        feats = pooled_features(model, x)
        assert logits.shape == (x.shape[0], num_classes)
        assert feats.shape == (x.shape[0], dim)
        assert feature_dim(model) == dim
        assert classifier_of(model) is model.fc
        assert (feats >= 0).all(), "the pooled feature is taken after the last ReLU"
        torch.testing.assert_close(model.fc(feats), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CIFAR_CLASSIFIERS))
def test_cifar_feature_interface(name):
    check_feature_interface(build(name, 100), torch.randn(2, 3, 32, 32), 100, FEATURE_DIM[name])


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_feature_interface(name):
    # 64x64 is the smallest input all four take down to a 2x2 map at stride 32.
    check_feature_interface(build(name, 1000), torch.randn(2, 3, 64, 64), 1000, FEATURE_DIM[name])


def test_vgg_at_64px_pools_the_fourth_stage():
    """The reference's Tiny-ImageNet setting: a 64x64 input is pooled once more before the last stage,
    so the last stage runs at 4x4 as on CIFAR."""
    model = build("vgg8", 200).eval()
    seen = []
    model.block4.register_forward_hook(lambda mod, args, out: seen.append(out.shape[-2:]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        model(torch.randn(1, 3, 32, 32))
    assert seen == [(4, 4), (4, 4)]


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_count(name):
    num_classes = 1000 if name in IMAGENET else 100
    count = sum(p.numel() for p in build(name, num_classes).parameters())
    assert count == PARAMS[name]
    if name in PUBLISHED_M:
        published = PUBLISHED_M[name]
        decimals = len(published.split(".")[1])
        rounded, truncated = round(count / 1e6, decimals), math.floor(count / 10 ** (6 - decimals)) / 10 ** decimals
        # The tables mix conventions: wrn_40_2 (2.2552M) is listed rounded as 2.26M, vgg8 (3.9650M)
        # truncated as 3.96M.
        assert float(published) in (rounded, truncated), (name, count, published)


def test_checkpoint_names_follow_the_references():
    """State-dict keys of RepDistiller (CIFAR), GenDD's VGG/MobileNetV1: their checkpoints load as saved."""
    expected = {
        "resnet8x4": ["conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                      "layer3.0.conv2.weight", "fc.weight"],
        "resnet20": ["layer1.2.bn2.weight", "layer2.0.downsample.0.weight", "fc.bias"],
        "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.running_mean", "bn1.weight",
                     "fc.weight"],
        "wrn_16_1": ["block2.layer.0.convShortcut.weight", "block1.layer.1.conv1.weight"],
        "vgg13": ["block0.0.weight", "block0.0.bias", "block0.1.running_mean", "block0.3.weight", "block0.4.bias",
                  "block4.4.weight", "fc.weight"],
        "mobilenet_v1": ["model.0.0.weight", "model.0.1.running_mean", "model.13.3.weight", "model.13.4.bias",
                         "fc.weight"],
    }
    for name, keys in expected.items():
        state = build(name, 10).state_dict()
        assert set(keys) <= state.keys(), (name, sorted(set(keys) - state.keys()))
    assert "block1.layer.0.convShortcut.weight" not in build("wrn_16_1", 10).state_dict()  # 16 -> 16: identity
    assert "layer1.0.downsample.0.weight" not in build("resnet20", 10).state_dict()


def randomize_(model: nn.Module) -> nn.Module:
    """Non-default BN statistics too, so a round trip that dropped buffers would show."""
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "net", "dataparallel"])
def test_load_classifier_round_trip(tmp_path, wrap):
    model = randomize_(build("resnet8", 10)).eval()
    state = model.state_dict()
    saved = {
        "plain": state,
        "model": {"epoch": 240, "model": state, "best_acc": torch.tensor(70.0), "optimizer": {"state": {}}},
        "state_dict": {"state_dict": state, "epoch": 3},
        "net": {"net": state},
        "dataparallel": {"model": {"module." + k: v for k, v in state.items()}},
    }[wrap]
    torch.save(saved, tmp_path / "ckpt.pth")
    loaded = load_classifier("resnet8", tmp_path / "ckpt.pth")  # num_classes read from fc.weight
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_repdistiller_vgg_classifier_keys(tmp_path):
    """RepDistiller's VGG names its final layer 'classifier'; it loads into 'fc'."""
    model = randomize_(build("vgg8", 100)).eval()
    state = {("classifier." + k[3:] if k.startswith("fc.") else k): v for k, v in model.state_dict().items()}
    torch.save({"model": state}, tmp_path / "ckpt_epoch_240.pth")
    loaded = load_classifier("vgg8", tmp_path / "ckpt_epoch_240.pth")  # num_classes from classifier.weight
    assert torch.equal(loaded.fc.weight, model.fc.weight) and torch.equal(loaded.fc.bias, model.fc.bias)


def test_load_imagenet_classifier(tmp_path):
    model = randomize_(build("mobilenet_v1", 10)).eval()
    torch.save(model.state_dict(), tmp_path / "mbv1.pth")
    loaded = load_classifier("mobilenet_v1", tmp_path / "mbv1.pth", num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_load_classifier_errors(tmp_path):
    state = build("resnet8", 10).state_dict()

    def save(obj, name="bad.pth"):
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    missing = {k: v for k, v in state.items() if k != "layer1.0.bn2.running_var"}
    with pytest.raises(ValueError, match=r"missing keys: layer1\.0\.bn2\.running_var"):
        load_classifier("resnet8", save(missing), 10)
    with pytest.raises(ValueError, match=r"unexpected keys: head\.extra"):
        load_classifier("resnet8", save({**state, "head.extra": torch.zeros(1)}), 10)
    with pytest.raises(ValueError, match=r"shape mismatches: fc\.bias \(10,\) vs \(100,\)"):
        load_classifier("resnet8", save(state), 100)
    with pytest.raises(ValueError, match=r"missing keys: layer1\.1\.bn1\.bias, .*\(72 in all\)"):
        load_classifier("resnet20", save(state), 10)  # a checkpoint of another architecture
    with pytest.raises(ValueError, match=r"top-level keys: \['epoch', 'weights'\]"):
        load_classifier("resnet8", save({"weights": state, "epoch": 1}), 10)
    with pytest.raises(ValueError, match="not a state_dict"):
        load_classifier("resnet8", save(torch.zeros(3)), 10)
    with pytest.raises(ValueError, match="cannot infer num_classes"):
        load_classifier("resnet8", save({k: v for k, v in state.items() if not k.startswith("fc.")}))


def test_bad_names_and_models():
    with pytest.raises(ValueError, match=r"unknown classifier 'resnet9'.*resnet8.*mobilenet_v1"):
        build_classifier("resnet9")
    with pytest.raises(TypeError, match="not a ddg classifier"):
        pooled_features(nn.Linear(3, 3), torch.zeros(1, 3))
    with pytest.raises(TypeError, match="no nn.Linear attribute 'fc'"):
        classifier_of(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(9, (16, 16, 32, 64))
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(15, 2)
