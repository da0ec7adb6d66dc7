"""Vision backbones that return a pooled feature and their token sequence: forward(x) -> (pooled [B, out_dim],
tokens [B, N, token_dim]).

The tokens (patch/class tokens, or a ResNet's flattened last feature map) feed a visual-token conditioning
adapter; the pooled feature feeds a projection or classifier. Nothing is downloaded, weights come from local paths.

* ``clip_vit``: a transformers ``CLIPVisionModelWithProjection`` (CLIP ViT-B/16 from a local folder, or any
  config). The pooled output is the projected class token, as OpenAI CLIP's visual tower returns; the tokens
  are all positions after ``post_layernorm`` and ``visual_projection`` (DIVA's ``ln_post`` + ``proj``).
* ``resnet50``: torchvision ResNet-50 with every BatchNorm frozen (eval statistics, no affine updates); pooled
  2048-d feature, tokens = the 7x7 layer4 map flattened to 49 tokens of 2048.
* ``vit_b16``: torchvision ViT-B/16 (768-d class token; tokens = the final-LayerNorm sequence).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

BACKBONES = ("clip_vit", "resnet50", "vit_b16")


class CLIPVisionBackbone(nn.Module):
    """f = a transformers CLIPVisionModelWithProjection; pooled = image_embeds, tokens = projected sequence."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.out_dim = self.token_dim = model.config.projection_dim

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "CLIPVisionBackbone":
        """Load the vision tower of a local CLIP folder (a CLIPModel or CLIPVisionModelWithProjection)."""
        from transformers import CLIPVisionModelWithProjection

        _require_dir("CLIPVisionBackbone.from_pretrained", path)
        return cls(CLIPVisionModelWithProjection.from_pretrained(str(path)))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.model.vision_model(pixel_values=x)
        tokens = self.model.visual_projection(self.model.vision_model.post_layernorm(out.last_hidden_state))
        # The pooled output is the class token through post_layernorm + projection: tokens[:, 0].
        return tokens[:, 0], tokens


class FrozenBNResNetBackbone(nn.Module):
    """f = a torchvision ResNet without its fc; BatchNorm frozen (DomainBed's ``freeze_bn``)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        if not isinstance(getattr(resnet, "fc", None), nn.Linear):
            raise TypeError(f"FrozenBNResNetBackbone: expected a torchvision ResNet (with an nn.Linear fc), "
                            f"got {type(resnet).__name__}")
        self.out_dim = self.token_dim = resnet.fc.in_features
        resnet.fc = nn.Identity()
        self.resnet = resnet
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)

    def trainable_parameters(self):
        """Every parameter but the frozen BatchNorm affines."""
        frozen = {id(q) for m in self.modules() if isinstance(m, nn.BatchNorm2d) for q in m.parameters()}
        return (q for q in self.parameters() if id(q) not in frozen)

    def train(self, mode: bool = True) -> "FrozenBNResNetBackbone":
        super().train(mode)
        for m in self.modules():  # BN keeps its ImageNet statistics whatever the mode
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        fmap = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        return fmap.mean(dim=(2, 3)), fmap.flatten(2).transpose(1, 2)


class TorchvisionViTBackbone(nn.Module):
    """f = a torchvision VisionTransformer; pooled = class token, tokens = the final-LayerNorm sequence."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        vit.heads = nn.Identity()
        self.vit = vit
        self.out_dim = self.token_dim = vit.hidden_dim

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        v = self.vit
        x = v._process_input(x)
        x = torch.cat([v.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        tokens = v.encoder(x)
        return tokens[:, 0], tokens


def _require_dir(where: str, path) -> None:
    if not Path(path).exists():
        raise FileNotFoundError(f"{where}: {path} does not exist (weights are loaded from local paths only)")


def build_backbone(name: str, weights: Optional[Union[str, Path]] = None) -> nn.Module:
    """Backbone ``name`` (one of BACKBONES). ``weights``: a local CLIP folder for ``clip_vit`` (required), a
    torchvision state_dict file for ``resnet50`` / ``vit_b16`` (None: random initialisation)."""
    if name == "clip_vit":
        if weights is None:
            raise ValueError("build_backbone: 'clip_vit' needs weights= a local CLIP folder "
                             "(or build CLIPVisionBackbone(CLIPVisionModelWithProjection(config)) yourself)")
        return CLIPVisionBackbone.from_pretrained(weights)
    if name in ("resnet50", "vit_b16"):
        import torchvision

        model = getattr(torchvision.models, name.replace("vit_b16", "vit_b_16"))(weights=None)
        if weights is not None:
            _require_dir("build_backbone", weights)
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return FrozenBNResNetBackbone(model) if name == "resnet50" else TorchvisionViTBackbone(model)
    raise ValueError(f"build_backbone: 'name' must be one of {BACKBONES}, got {name!r}")
