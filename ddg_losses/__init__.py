"""ddg_losses: the distillation losses as nn.Modules over ddg_ops."""
from .dmd import DistributionMatchingLoss

__all__ = ["DistributionMatchingLoss"]
