"""Build classifiers by name, load their checkpoints, and read their pooled penultimate feature.

Names: the CIFAR networks of RepDistiller / CRD (``resnet8`` ... ``resnet110``, ``resnet8x4``,
``resnet32x4``, ``wrn_40_2``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_16_1``, ``vgg8`` ... ``vgg19``) and
the ImageNet networks of GenDD's pairs (``resnet18``, ``resnet34``, ``resnet50`` from torchvision,
built with ``weights=None``, and ``mobilenet_v1``). Nothing is downloaded.

Every network exposes the same feature interface (specs/gendd.md §2: f_T, f_S are the post-ReLU
average-pooled features that feed the final linear layer): ``pooled_features(model, x)``,
``classifier_of(model)`` and ``feature_dim(model)``, with
``classifier_of(model)(pooled_features(model, x)) == model(x)``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from . import cifar_resnet, mobilenet_v1, vgg, wide_resnet

__all__ = ["CIFAR_CLASSIFIERS", "IMAGENET_CLASSIFIERS", "CLASSIFIER_NAMES", "build_classifier", "load_classifier",
           "pooled_features", "classifier_of", "feature_dim"]

CIFAR_CLASSIFIERS: Dict[str, Callable[[int], nn.Module]] = {
    **{name: getattr(cifar_resnet, name) for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
                                                       "resnet56", "resnet110", "resnet8x4", "resnet32x4")},
    **{name: getattr(wide_resnet, name) for name in ("wrn_40_2", "wrn_16_2", "wrn_40_1", "wrn_16_1")},
    **{name: getattr(vgg, name) for name in vgg.CONVS_PER_STAGE},
}
_TORCHVISION = ("resnet18", "resnet34", "resnet50")
IMAGENET_CLASSIFIERS = _TORCHVISION + ("mobilenet_v1",)
CLASSIFIER_NAMES = tuple(CIFAR_CLASSIFIERS) + IMAGENET_CLASSIFIERS

# Where trainers nest the weights inside a saved dict (RepDistiller: {'model': ..., 'epoch': ...}).
_WRAPPER_KEYS = ("model", "state_dict", "net")


def build_classifier(name: str, num_classes: int = 100) -> nn.Module:
    """A freshly initialised classifier ``name`` with ``num_classes`` outputs."""
    if name in CIFAR_CLASSIFIERS:
        return CIFAR_CLASSIFIERS[name](num_classes)
    if name == "mobilenet_v1":
        return mobilenet_v1.mobilenet_v1(num_classes)
    if name in _TORCHVISION:
        import torchvision  # optional dependency (the 'models' extra), only needed for these names

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    raise ValueError(f"build_classifier: unknown classifier {name!r}; known: {', '.join(CLASSIFIER_NAMES)}")


def _is_torchvision_resnet(model: nn.Module) -> bool:
    # A torchvision model implies torchvision is imported already; never import it just to check.
    models = sys.modules.get("torchvision.models")
    return models is not None and isinstance(model, models.ResNet)


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The post-ReLU, average-pooled penultimate feature [B, D] that feeds the final linear layer."""
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    if _is_torchvision_resnet(model):
        # torchvision's ResNet.forward up to (excluding) fc.
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        return torch.flatten(model.avgpool(x), 1)
    raise TypeError(f"pooled_features: {type(model).__name__} is not a ddg classifier (no forward_features) "
                    "nor a torchvision ResNet")


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear layer (features -> logits)."""
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"classifier_of: {type(model).__name__} has no nn.Linear attribute 'fc'")
    return fc


def feature_dim(model: nn.Module) -> int:
    """D, the size of ``pooled_features``."""
    return classifier_of(model).in_features


def _unwrap(checkpoint: object, path: Path) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"load_classifier: {path} holds a {type(checkpoint).__name__}, not a state_dict")
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    raise ValueError(f"load_classifier: {path} is neither a state_dict nor a dict with one under "
                     f"{'/'.join(map(repr, _WRAPPER_KEYS))}; its top-level keys: {sorted(map(str, checkpoint))}")


def _strip_dataparallel(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the 'module.' prefix that (Distributed)DataParallel puts on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _rename_classifier(state: Dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """RepDistiller's VGG calls its final layer 'classifier' where these models say 'fc'."""
    renamed = {}
    for k, v in state.items():
        if k.startswith("classifier.") and k not in expected and "fc." + k[len("classifier."):] in expected:
            k = "fc." + k[len("classifier."):]
        renamed[k] = v
    return renamed


def _listing(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_classifier(name: str, path: Union[str, Path], num_classes: Optional[int] = None,
                    map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Build classifier ``name`` and load the weights saved at ``path``; returned in eval mode.

    The file may hold a plain state_dict or a dict with it under 'model', 'state_dict' or 'net'
    (RepDistiller's ``ckpt_epoch_240.pth``). A uniform 'module.' prefix is stripped and
    RepDistiller's VGG 'classifier.*' keys map to 'fc.*'. ``num_classes`` defaults to the number of
    rows of the checkpoint's final layer. Any missing, unexpected or mis-shaped key is an error
    that names them.
    """
    path = Path(path)
    state = _strip_dataparallel(_unwrap(torch.load(path, map_location=map_location, weights_only=True), path))
    if num_classes is None:
        head = state.get("fc.weight", state.get("classifier.weight"))
        if head is None:
            raise ValueError(f"load_classifier: cannot infer num_classes from {path} (no fc.weight); pass it")
        num_classes = head.shape[0]
    model = build_classifier(name, num_classes)
    expected = model.state_dict()
    state = _rename_classifier(state, expected)
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        problems = [f"{label}: {_listing(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshaped))
                    if keys]
        raise ValueError(f"load_classifier: {path} does not fit {name!r} with {num_classes} classes; "
                         + "; ".join(problems))
    model.load_state_dict(state)
    return model.eval()
