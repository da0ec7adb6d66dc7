"""Conditioning adapters: the student's output as Stable Diffusion cross-attention tokens c(x) [B, L, D_sd].

docs/methods/ddg.md §2.2 step 4 (both options are configuration):
* A ``ProbabilityWeightedPromptAdapter`` (Diffusion-TTA's "implicit" conditioning): c = sum_k p_k E_k with
  p = softmax(student logits) and E the SD text encoder's hidden states of one prompt per class. The gradient
  reaches the student only through p.
* B ``PatchTokenAdapter`` (DIVA's explicit visual tokens): the class token plus L-1 randomly sampled patch
  tokens through a learned Linear(token_dim -> D_sd).
``StudentConditioning`` combines them: 'prompts' (A), 'patches' (B) or 'both' (A + B, DIVA's sum).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

CONDITIONING_MODES = ("prompts", "patches", "both")


class ProbabilityWeightedPromptAdapter(nn.Module):
    """c = einsum('bc,cld->bld', softmax(logits / temperature), E) with E [C, L, D] a frozen buffer.

    The einsum never materialises [B, C, L, D] (7.8 GB in fp32 for DomainNet's C = 345 at B = 160).
    """

    def __init__(self, prompt_embeddings: torch.Tensor, temperature: float = 1.0):
        super().__init__()
        if not isinstance(prompt_embeddings, torch.Tensor) or prompt_embeddings.dim() != 3:
            raise ValueError("ProbabilityWeightedPromptAdapter: 'prompt_embeddings' must be a [num_classes, "
                             f"seq_len, dim] tensor, got {getattr(prompt_embeddings, 'shape', prompt_embeddings)}")
        if not temperature > 0:
            raise ValueError(f"ProbabilityWeightedPromptAdapter: 'temperature' must be > 0, got {temperature}")
        # Not persistent: E is derived from the frozen teacher (81 MB for DomainNet), rebuilt, never checkpointed.
        self.register_buffer("prompt_embeddings", prompt_embeddings.detach().clone(), persistent=False)
        self.temperature = temperature

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        num_classes = self.prompt_embeddings.shape[0]
        if logits.dim() != 2 or logits.shape[1] != num_classes:
            raise ValueError(f"ProbabilityWeightedPromptAdapter: 'logits' must be [B, {num_classes}], "
                             f"got {tuple(logits.shape)}")
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.einsum("bc,cld->bld", probs, self.prompt_embeddings.float()).to(self.prompt_embeddings.dtype)


class PatchTokenAdapter(nn.Module):
    """The class token plus ``num_tokens - 1`` patch tokens (random per sample in training, the first ones in
    eval), through Linear(token_dim -> context_dim).

    Sequences shorter than ``num_tokens`` keep all their tokens and are zero-padded after the projection, so
    that added to the prompt context they leave its tail untouched. ``has_cls_token=False`` (a ResNet's
    flattened map) samples among all tokens.
    """

    def __init__(self, token_dim: int, context_dim: int, num_tokens: int = 77, has_cls_token: bool = True):
        super().__init__()
        for name, value in (("token_dim", token_dim), ("context_dim", context_dim), ("num_tokens", num_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PatchTokenAdapter: {name!r} must be a positive int, got {value!r}")
        self.num_tokens = num_tokens
        self.has_cls_token = has_cls_token
        self.proj = nn.Linear(token_dim, context_dim)

    def forward(self, tokens: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.proj.in_features:
            raise ValueError(f"PatchTokenAdapter: 'tokens' must be [B, N, {self.proj.in_features}], "
                             f"got {tuple(tokens.shape)}")
        b, n, _ = tokens.shape
        keep_first = 1 if self.has_cls_token else 0
        pool = n - keep_first
        take = min(self.num_tokens - keep_first, pool)
        if self.training and take < pool:
            # DIVA: a fresh random subset of patch tokens per sample and step.
            scores = torch.rand(b, pool, generator=generator, device=tokens.device)  # generator on tokens' device
            idx = scores.argsort(dim=1)[:, :take] + keep_first
        else:
            idx = torch.arange(keep_first, keep_first + take, device=tokens.device).expand(b, -1)
        if keep_first:
            idx = torch.cat([torch.zeros(b, 1, dtype=idx.dtype, device=idx.device), idx], dim=1)
        picked = torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        out = self.proj(picked)
        if out.shape[1] < self.num_tokens:
            out = nn.functional.pad(out, (0, 0, 0, self.num_tokens - out.shape[1]))
        return out


class StudentConditioning(nn.Module):
    """c(x) from the student's (logits, tokens): mode 'prompts' (A), 'patches' (B) or 'both' (A + B)."""

    def __init__(self, mode: str, prompts: Optional[ProbabilityWeightedPromptAdapter] = None,
                 patches: Optional[PatchTokenAdapter] = None):
        super().__init__()
        if mode not in CONDITIONING_MODES:
            raise ValueError(f"StudentConditioning: 'mode' must be one of {CONDITIONING_MODES}, got {mode!r}")
        if mode in ("prompts", "both") and prompts is None:
            raise ValueError(f"StudentConditioning: mode {mode!r} needs 'prompts' (a ProbabilityWeightedPromptAdapter)")
        if mode in ("patches", "both") and patches is None:
            raise ValueError(f"StudentConditioning: mode {mode!r} needs 'patches' (a PatchTokenAdapter)")
        if mode == "both" and patches.num_tokens != prompts.prompt_embeddings.shape[1]:
            raise ValueError(f"StudentConditioning: 'both' adds the two contexts, but the patch adapter makes "
                             f"{patches.num_tokens} tokens and the prompts have {prompts.prompt_embeddings.shape[1]}")
        self.mode = mode
        self.prompts = prompts if mode != "patches" else None
        self.patches = patches if mode != "prompts" else None

    def forward(self, logits: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.patches is not None and tokens is None:
            raise ValueError(f"StudentConditioning: mode {self.mode!r} needs the backbone 'tokens'")
        context = self.prompts(logits) if self.prompts is not None else None
        if self.patches is not None:
            visual = self.patches(tokens, generator)
            context = visual if context is None else context + visual.to(context.dtype)
        return context
