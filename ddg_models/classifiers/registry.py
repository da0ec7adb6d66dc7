"""Classifiers by name, and the one pooled-feature protocol every registered classifier follows.

The protocol (docs/methods/gendd.md §2: f_T, f_S are the post-ReLU average-pooled features that feed the final
linear layer): ``pooled_features(model, x)`` is that feature [B, D], ``classifier_of(model)`` the final
``nn.Linear`` and ``feature_dim(model)`` its D, with ``classifier_of(model)(pooled_features(model, x)) == model(x)``.
A model follows it either by itself, with a ``forward_features(x)`` method and an ``nn.Linear`` attribute ``fc``,
or through adapter callables given to ``register_classifier`` (``features(model, x)``, ``head(model)``): they
hold for every instance of the class the name's builder returns, known from the first ``build_classifier`` of the
name on, or from the start when the class is given as ``model_class`` (a class, or a ``"module:Class"`` string
resolved once that module is imported: the registry never imports an optional package just to name a class).
torchvision's ResNets are registered that way, so a ResNet the user builds with torchvision follows the protocol.

Built in: the CIFAR networks of RepDistiller / CRD (``resnet8`` ... ``resnet110``, ``resnet8x4``, ``resnet32x4``,
``wrn_40_2``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_16_1``, ``vgg8`` ... ``vgg19``) and the ImageNet networks of
GenDD's pairs (``resnet18``, ``resnet34``, ``resnet50`` from torchvision, built with ``weights=None``, and
``mobilenet_v1``). Nothing is downloaded.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from . import cifar_resnet, mobilenet_v1, vgg, wide_resnet

Builder = Callable[[int], nn.Module]
FeatureAdapter = Callable[[nn.Module, torch.Tensor], torch.Tensor]
HeadAdapter = Callable[[nn.Module], nn.Linear]


class ClassifierEntry(NamedTuple):
    builder: Builder                     # builder(num_classes) -> a freshly initialised model
    features: Optional[FeatureAdapter]   # None: model.forward_features(x)
    head: Optional[HeadAdapter]          # None: model.fc


_REGISTRY: Dict[str, ClassifierEntry] = {}
# The adapters of each class a registered builder returned (filled by build_classifier).
_ADAPTED_TYPES: Dict[type, Tuple[str, ClassifierEntry]] = {}
# "module:Class" -> the adapters of that class, bound once the module has been imported by someone else.
_PENDING_TYPES: Dict[str, Tuple[str, ClassifierEntry]] = {}


def register_classifier(name: str, builder: Builder, *, features: Optional[FeatureAdapter] = None,
                        head: Optional[HeadAdapter] = None, model_class: Union[type, str, None] = None) -> None:
    """Make ``build_classifier(name, num_classes)`` / ``load_classifier(name, path)`` build ``builder(num_classes)``.

    Args:
        name: a new name (registering a name twice is an error: two meanings of one checkpoint name).
        builder: ``builder(num_classes) -> nn.Module``.
        features: ``features(model, x) -> [B, D]`` the pooled penultimate feature, for models without
            ``forward_features``.
        head: ``head(model) -> nn.Linear`` the final layer, for models whose final layer is not ``fc``.
        model_class: the class the adapters hold for, also for instances not made by ``build_classifier``: a
            class, or ``"module:Class"`` (bound when that module is imported, never importing it here).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_classifier: 'name' must be a non-empty str, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"register_classifier: a classifier named {name!r} is already registered "
                         f"(builder {_qualname(_REGISTRY[name].builder)})")
    for arg, value in (("builder", builder), ("features", features), ("head", head)):
        if not callable(value) and not (value is None and arg != "builder"):
            raise TypeError(f"register_classifier: {arg!r} of {name!r} must be callable, got {type(value).__name__}")
    if model_class is not None and features is None and head is None:
        raise ValueError(f"register_classifier: 'model_class' of {name!r} binds adapters, but no features/head "
                         "adapter is given")
    if isinstance(model_class, str) and (model_class.count(":") != 1 or not all(model_class.split(":"))):
        raise ValueError(f"register_classifier: 'model_class' of {name!r} must be a class or 'module:Class', got "
                         f"{model_class!r}")
    if model_class is not None and not isinstance(model_class, (type, str)):
        raise TypeError(f"register_classifier: 'model_class' of {name!r} must be a class or 'module:Class', got "
                        f"{type(model_class).__name__}")
    entry = ClassifierEntry(builder, features, head)
    if isinstance(model_class, type):
        _bind(model_class, name, entry)
    elif isinstance(model_class, str):
        _PENDING_TYPES.setdefault(model_class, (name, entry))
    _REGISTRY[name] = entry


def registered_classifiers() -> Tuple[str, ...]:
    """Every name ``build_classifier`` accepts, the built-in ones first."""
    return tuple(_REGISTRY)


def build_classifier(name: str, num_classes: int = 100) -> nn.Module:
    """A freshly initialised classifier ``name`` with ``num_classes`` outputs."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"build_classifier: unknown classifier {name!r}; known: {', '.join(_REGISTRY)}")
    model = entry.builder(num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_classifier: the builder of {name!r} ({_qualname(entry.builder)}) returned a "
                        f"{type(model).__name__}, expected an nn.Module")
    if entry.features is None and not callable(getattr(model, "forward_features", None)):
        raise TypeError(f"build_classifier: {name!r} built a {type(model).__name__} without forward_features(x); "
                        "register it with features=<callable(model, x) -> pooled feature>")
    if entry.head is None and not isinstance(getattr(model, "fc", None), nn.Linear):
        raise TypeError(f"build_classifier: {name!r} built a {type(model).__name__} without an nn.Linear 'fc'; "
                        "register it with head=<callable(model) -> final nn.Linear>")
    if entry.features is not None or entry.head is not None:
        _bind(type(model), name, entry)
    return model


def _bind(cls: type, name: str, entry: ClassifierEntry) -> None:
    bound = _ADAPTED_TYPES.setdefault(cls, (name, entry))
    if bound[1][1:] != entry[1:]:
        raise ValueError(f"register_classifier: {name!r} and {bound[0]!r} both build {cls.__name__} but with "
                         "different features/head adapters; one class has one protocol")


def _bind_imported_classes() -> None:
    for key in list(_PENDING_TYPES):
        module, qualname = key.split(":")
        cls = getattr(sys.modules.get(module), qualname, None) if module in sys.modules else None
        if isinstance(cls, type):
            name, entry = _PENDING_TYPES.pop(key)
            _bind(cls, name, entry)


def _adapters(model: nn.Module) -> Optional[ClassifierEntry]:
    for attempt in range(2):
        for cls in type(model).__mro__:
            if cls in _ADAPTED_TYPES:
                return _ADAPTED_TYPES[cls][1]
        if attempt == 0 and _PENDING_TYPES:
            _bind_imported_classes()  # the model's class may come from a module imported since registration
    return None


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The post-ReLU, average-pooled penultimate feature [B, D] that feeds the final linear layer."""
    entry = _adapters(model)
    if entry is not None and entry.features is not None:
        return entry.features(model, x)
    if callable(getattr(model, "forward_features", None)):
        return model.forward_features(x)
    raise TypeError(f"pooled_features: {type(model).__name__} is not a ddg classifier (no forward_features, and "
                    "no registered classifier with a features adapter builds it)")


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear layer (features -> logits)."""
    entry = _adapters(model)
    fc = entry.head(model) if entry is not None and entry.head is not None else getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"classifier_of: {type(model).__name__} has no nn.Linear attribute 'fc' (nor a registered "
                        "head adapter)")
    return fc


def feature_dim(model: nn.Module) -> int:
    """D, the size of ``pooled_features``."""
    return classifier_of(model).in_features


def _qualname(fn) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _torchvision_builder(arch: str) -> Builder:
    def build(num_classes: int) -> nn.Module:
        import torchvision  # optional dependency (the 'models' extra), only needed for these names

        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)

    build.__qualname__ = f"torchvision.models.{arch}"
    return build


def _torchvision_resnet_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # torchvision's ResNet.forward up to (excluding) fc.
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


CIFAR_CLASSIFIERS: Dict[str, Builder] = {
    **{name: getattr(cifar_resnet, name) for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
                                                       "resnet56", "resnet110", "resnet8x4", "resnet32x4")},
    **{name: getattr(wide_resnet, name) for name in ("wrn_40_2", "wrn_16_2", "wrn_40_1", "wrn_16_1")},
    **{name: getattr(vgg, name) for name in vgg.CONVS_PER_STAGE},
}
IMAGENET_CLASSIFIERS = ("resnet18", "resnet34", "resnet50", "mobilenet_v1")
CLASSIFIER_NAMES = tuple(CIFAR_CLASSIFIERS) + IMAGENET_CLASSIFIERS  # the built-in names

for _name, _builder in CIFAR_CLASSIFIERS.items():
    register_classifier(_name, _builder)
for _arch in ("resnet18", "resnet34", "resnet50"):
    register_classifier(_arch, _torchvision_builder(_arch), features=_torchvision_resnet_features,
                        model_class="torchvision.models.resnet:ResNet")
register_classifier("mobilenet_v1", mobilenet_v1.mobilenet_v1)
del _name, _builder, _arch
