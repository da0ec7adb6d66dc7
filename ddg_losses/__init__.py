"""ddg_losses: the distillation losses as nn.Modules over ddg_ops."""
from .bn_alignment import BNStatAlignmentLoss
from .dmd import DistributionMatchingLoss

__all__ = ["DistributionMatchingLoss", "BNStatAlignmentLoss"]
