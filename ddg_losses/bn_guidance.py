"""DDIS' guidance loss: the BN-statistics loss of a pretrained classifier on decoded images.

``BNGuidanceLoss(decoded) -> scalar`` is the guidance-loss callable ``ddg_models.DAGSampler`` descends: the
decoded batch (VAE range [-1, 1]) is preprocessed for the classifier, run through it with
:class:`BNStatAlignmentLoss` hooks on, and the accumulated DeepInversion loss is returned. With
``batch='per_image'`` each image is scored on its own spatial statistics (the DDIS code samples one image at a
time) and the loss is the sum over images; with ``'batch'`` the statistics are over the whole batch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ddg_models.classifier_preprocess import ClassifierPreprocess

from .bn_alignment import BNStatAlignmentLoss

BN_BATCHES = ("per_image", "batch")


class BNGuidanceLoss(nn.Module):
    """Preprocess + classifier + BN-statistics loss, as one callable on decoded images.

    Args:
        classifier: pretrained classifier with BatchNorm layers, in eval mode (the loss aligns to its running
            statistics, which a train-mode forward would overwrite).
        preprocess: decoded image -> classifier input; default :meth:`ClassifierPreprocess.ddis_code`.
        form, layers, first_bn_multiplier: passed to :class:`BNStatAlignmentLoss` (DDIS: unsquared, all BN
            layers, 1).
        batch: 'per_image' (one classifier forward per image) or 'batch'.
    """

    def __init__(self, classifier: nn.Module, preprocess: Optional[nn.Module] = None, *, form: str = "unsquared",
                 layers: Optional[Sequence[str]] = None, first_bn_multiplier: float = 1.0,
                 batch: str = "per_image"):
        super().__init__()
        name = "BNGuidanceLoss"
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"{name}: 'classifier' must be an nn.Module, got {type(classifier).__name__}")
        if classifier.training:
            raise ValueError(f"{name}: 'classifier' must be in eval mode (the loss aligns to its running statistics "
                             f"and a train-mode forward would overwrite them); call classifier.eval()")
        if batch not in BN_BATCHES:
            raise ValueError(f"{name}: 'batch' must be one of {BN_BATCHES}, got {batch!r}")
        self.preprocess = preprocess if preprocess is not None else ClassifierPreprocess.ddis_code()
        self.bn_loss = BNStatAlignmentLoss(classifier, layers=layers, form=form,
                                           first_bn_multiplier=first_bn_multiplier)
        self.bn_loss.enabled = False  # on only inside a call: plain classifier calls add nothing
        self.batch = batch

    @property
    def classifier(self) -> nn.Module:
        return self.bn_loss.model

    def forward(self, decoded: torch.Tensor) -> torch.Tensor:
        """The BN loss of decoded images [N, C, H, W] in [-1, 1]; autograd as the caller."""
        x = self.preprocess(decoded)
        self.bn_loss.reset()
        self.bn_loss.enabled = True
        try:
            for chunk in (x.split(1) if self.batch == "per_image" else (x,)):
                self.classifier(chunk)
            return self.bn_loss()
        finally:
            self.bn_loss.enabled = False

    def extra_repr(self) -> str:
        return f"batch={self.batch!r}"
