"""DDG's student: a backbone f, a projection P into the CLIP text space and a frozen zero-shot head W.

logits = W(P(f(x))) (specs/ddg.md §2.0, VL2V's ``DFC_STAGE1``). The backbone also returns its token sequence
(patch/class tokens, or a ResNet's flattened last feature map) for the visual-token conditioning adapter.

Backbones (``build_backbone``; nothing is downloaded, weights come from local paths):
* ``clip_vit``: a transformers ``CLIPVisionModelWithProjection`` (CLIP ViT-B/16 from a local folder, or any
  config). The pooled output is the projected class token, as OpenAI CLIP's visual tower returns; the tokens
  are all positions after ``post_layernorm`` and ``visual_projection`` (DIVA's ``ln_post`` + ``proj``).
* ``resnet50``: torchvision ResNet-50 with every BatchNorm frozen (eval statistics, no affine updates); pooled
  2048-d feature, tokens = the 7x7 layer4 map flattened to 49 tokens of 2048.
* ``vit_b16``: torchvision ViT-B/16 (768-d class token; tokens = the final-LayerNorm sequence).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
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


class ZeroShotHead(nn.Module):
    """W: logits = logit_scale * normalize(z) @ normalize(T)^T, T = one CLIP text embedding per class.

    The class embeddings and the scale are buffers: they are saved with the student but no optimizer sees them
    (VL2V's ``ClassificationHead(normalize=True)`` from CLIP's zero-shot weights).
    """

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float = 100.0):
        super().__init__()
        if not isinstance(class_embeddings, torch.Tensor) or class_embeddings.dim() != 2:
            raise ValueError("ZeroShotHead: 'class_embeddings' must be a [num_classes, dim] tensor, got "
                             f"{getattr(class_embeddings, 'shape', type(class_embeddings).__name__)}")
        if not logit_scale > 0:
            raise ValueError(f"ZeroShotHead: 'logit_scale' must be > 0, got {logit_scale}")
        self.register_buffer("weight", F.normalize(class_embeddings.detach().float(), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"ZeroShotHead: input width {z.shape[-1]} != class embedding width {self.weight.shape[1]}")
        return self.logit_scale * F.normalize(z.float(), dim=-1) @ self.weight.t()


@torch.no_grad()
def encode_class_prompts(text_model, tokenizer, class_names: Sequence[str],
                         template: str = "a photo of a {}") -> torch.Tensor:
    """L2-normalised CLIP text embeddings [C, D] of ``template`` per class ('_' in a name reads as a space).

    ``text_model``: a transformers CLIPModel or CLIPTextModelWithProjection (its ``get_text_features`` /
    ``text_embeds`` is CLIP's joint-space text embedding).
    """
    if not class_names:
        raise ValueError("encode_class_prompts: 'class_names' is empty")
    if "{}" not in template:
        raise ValueError(f"encode_class_prompts: 'template' must contain '{{}}', got {template!r}")
    prompts = [template.format(c.replace("_", " ")) for c in class_names]
    device = next(text_model.parameters()).device
    tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").to(device)
    if hasattr(text_model, "get_text_features"):
        emb = text_model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        emb = getattr(emb, "pooler_output", emb)  # transformers 5 may return an output object
    else:
        emb = text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds
    return F.normalize(emb.float(), dim=-1)


class DDGStudent(nn.Module):
    """f -> P -> W. ``forward(x)`` gives logits; ``encode(x)`` gives (logits, z, tokens) for the DDG losses.

    Args:
        backbone: a module whose forward returns (pooled [B, out_dim], tokens [B, N, token_dim]) and which has
            ``out_dim`` / ``token_dim`` attributes (the classes of ``build_backbone``).
        head: the ZeroShotHead; its embedding width is the projection's output width (d_clip).
    """

    def __init__(self, backbone: nn.Module, head: ZeroShotHead):
        super().__init__()
        for attr in ("out_dim", "token_dim"):
            if not isinstance(getattr(backbone, attr, None), int):
                raise TypeError(f"DDGStudent: 'backbone' must have an int attribute {attr!r} "
                                f"({type(backbone).__name__} has not)")
        if not isinstance(head, ZeroShotHead):
            raise TypeError(f"DDGStudent: 'head' must be a ZeroShotHead, got {type(head).__name__}")
        self.backbone = backbone
        self.projection = nn.Linear(backbone.out_dim, head.weight.shape[1])
        self.head = head

    @property
    def embed_dim(self) -> int:
        return self.head.weight.shape[1]

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, C], z = P(f(x)) [B, d_clip] unnormalised, tokens [B, N, token_dim])."""
        pooled, tokens = self.backbone(x)
        z = self.projection(pooled)
        return self.head(z), z, tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]

    def featurizer_parameters(self):
        """The backbone's trainable parameters (a frozen-BN ResNet leaves its BatchNorm out)."""
        return getattr(self.backbone, "trainable_parameters", self.backbone.parameters)()

    def projection_parameters(self):
        return self.projection.parameters()
