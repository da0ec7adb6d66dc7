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
    "BNGuidanceLoss": "bn_guidance",
    # DP-DMD (issue 7)
    "NoisedDMDOutput": "dmd", "FakeScoreLoss": "dpdmd_fake_score", "FakeScoreOutput": "dpdmd_fake_score",
    "AnchorLoss": "dpdmd_anchor", "anchor_target": "dpdmd_anchor", "TwoTimeScaleSchedule": "dpdmd_schedule",
    "FlowMatchingNoise": "dpdmd_noise", "DDPMNoise": "dpdmd_noise", "NoiseLevel": "dpdmd_noise",
    # DDG (issue 8)
    "AlignmentLoss": "ddg", "DiffusionDistillationLoss": "ddg",
}

__all__ = ["DistributionMatchingLoss", "BNStatAlignmentLoss", "GenDDLoss", "GenDDLossOutput", "GenDDDraws"]
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
