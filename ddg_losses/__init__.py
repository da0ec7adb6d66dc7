"""ddg_losses: the distillation losses as nn.Modules over ddg_ops."""
from .bn_alignment import BNStatAlignmentLoss
from .dmd import DistributionMatchingLoss
from .gendd import GenDDDraws, GenDDLoss, GenDDLossOutput

__all__ = ["DistributionMatchingLoss", "BNStatAlignmentLoss", "GenDDLoss", "GenDDLossOutput", "GenDDDraws"]
