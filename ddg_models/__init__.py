"""ddg_models: nn.Modules and samplers built on ddg_ops (teachers with CFG, samplers, heads)."""
from .guided_sampling import CFGSampler, FusedGuidanceStep, unet_denoiser

__all__ = ["CFGSampler", "FusedGuidanceStep", "unet_denoiser"]
