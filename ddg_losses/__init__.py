"""ddg_losses: the distillation losses as nn.Modules over ddg_ops.

The less common losses are imported on first use; ``dir(ddg_losses)`` lists them all the same.
"""
import importlib

from .bn_alignment import BNStatAlignmentLoss
from .dmd import DistributionMatchingLoss
from .gendd import GenDDDraws, GenDDLoss, GenDDLossOutput

# Name -> submodule, imported on first use.
_LAZY = {
    # Logit distillation
    "KLDistillationLoss": "kd",
    # Distribution matching: the DMD loss's noised form, the fake score, the noise levels both draw, the
    # two-time-scale update of generator and fake score, and DP-DMD's anchor loss on the first step
    "NoisedDMDOutput": "dmd", "FakeScoreLoss": "fake_score", "FakeScoreOutput": "fake_score",
    "FlowMatchingNoise": "noise_levels", "DDPMNoise": "noise_levels", "NoiseLevel": "noise_levels",
    "TwoTimeScaleSchedule": "two_time_scale", "AnchorLoss": "dpdmd_anchor", "anchor_target": "dpdmd_anchor",
    # Guidance losses on decoded images (DAG's BN-statistics guidance)
    "BNGuidanceLoss": "bn_guidance",
    # Losses through embeddings and a guided teacher
    "ImageTextAlignmentLoss": "image_text_alignment", "GuidedDenoisingLoss": "guided_denoising",
}

__all__ = ["DistributionMatchingLoss", "BNStatAlignmentLoss", "GenDDLoss", "GenDDLossOutput", "GenDDDraws"]
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
