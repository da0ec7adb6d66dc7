"""ddg_losses: the distillation losses as nn.Modules over ddg_ops.

The losses of the method-specific modules are imported on first use.
"""
import importlib

from .bn_alignment import BNStatAlignmentLoss
from .dmd import DistributionMatchingLoss
from .gendd import GenDDDraws, GenDDLoss, GenDDLossOutput

# Name -> submodule, imported on first use.
_LAZY = {
    # DDIS (issue 6)
    "KLDistillationLoss": "kd",
    # DP-DMD (issue 7)
    "NoisedDMDOutput": "dmd", "FakeScoreLoss": "fake_score", "FakeScoreOutput": "fake_score",
    "AnchorLoss": "dpdmd_anchor", "anchor_target": "dpdmd_anchor", "TwoTimeScaleSchedule": "two_time_scale",
    "FlowMatchingNoise": "noise_levels", "DDPMNoise": "noise_levels", "NoiseLevel": "noise_levels",
    # DDG (issue 8)
    "ImageTextAlignmentLoss": "image_text_alignment", "GuidedDenoisingLoss": "guided_denoising",
}

__all__ = ["DistributionMatchingLoss", "BNStatAlignmentLoss", "GenDDLoss", "GenDDLossOutput", "GenDDDraws"]
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
