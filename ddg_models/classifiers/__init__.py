"""Image classifiers used as GenDD teachers and students (docs/methods/gendd.md §4): the CIFAR networks of
RepDistiller / CRD, torchvision ResNets and MobileNetV1 for ImageNet, a registry that builds them (and the
user's own, ``register_classifier``) by name, and one pooled-feature protocol."""
from .checkpoint import load_classifier
from .cifar_resnet import CifarResNet
from .mobilenet_v1 import MobileNetV1
from .registry import (CIFAR_CLASSIFIERS, CLASSIFIER_NAMES, IMAGENET_CLASSIFIERS, build_classifier, classifier_of,
                       feature_dim, pooled_features, register_classifier, registered_classifiers)
from .vgg import CifarVGG
from .wide_resnet import WideResNet

__all__ = ["CifarResNet", "CifarVGG", "MobileNetV1", "WideResNet", "CIFAR_CLASSIFIERS", "IMAGENET_CLASSIFIERS",
           "CLASSIFIER_NAMES", "build_classifier", "load_classifier", "pooled_features", "classifier_of",
           "feature_dim", "register_classifier", "registered_classifiers"]
