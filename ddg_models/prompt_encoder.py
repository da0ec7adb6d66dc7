"""Text prompts -> the conditioning dict a ``GuidedTeacher`` takes (docs/teacher.md, "Prompt encoding").

Two layouts cover the teachers the methods use:

* 'clip' (Stable Diffusion 1.x and 2.x): the tokenizer pads to its ``model_max_length`` (77) and the text
  encoder's last hidden state is ``encoder_hidden_states`` [N, 77, D], as StableDiffusionPipeline.encode_prompt
  does without clip_skip. SD 2.x uses OpenCLIP ViT-H's penultimate layer; diffusers' SD2 folders already hold
  that tower cut after the penultimate block (text_encoder/config.json: 23 layers) and converted to
  ``CLIPTextModel``, so its last hidden state is the penultimate OpenCLIP state and the same 'clip' path serves
  both.
* 'sd3' (Stable Diffusion 3.x): CLIP-L and CLIP-G penultimate hidden states concatenated on the feature axis,
  zero-padded to T5's width and stacked in front of T5's last hidden state along the sequence
  (``encoder_hidden_states`` [N, 77 + T, joint_attention_dim]); the two CLIPs' projected pooled outputs
  concatenated (``pooled_projections``). Without T5 its place is taken by zeros of the right shape. This is
  StableDiffusion3Pipeline.encode_prompt (clip_skip None), dtypes included.

Autograd is the caller's: wrap a call in ``torch.no_grad()`` for frozen encoders; DDIS's class alignment
tokens train through it.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

LAYOUTS = ("clip", "sd3")


class PromptEncoder:
    """Tokenizer(s) + text encoder(s) of a text-conditioned teacher; build with :meth:`clip`, :meth:`sd3` or
    :meth:`from_pipeline`. A plain object like the teacher (the encoders are not registered as submodules)."""

    def __init__(self, layout: str, tokenizers: Sequence, text_encoders: Sequence, *,
                 joint_attention_dim: Optional[int] = None, max_sequence_length: int = 256):
        if layout not in LAYOUTS:
            raise ValueError(f"PromptEncoder: 'layout' must be one of {LAYOUTS}, got {layout!r}")
        expected = 1 if layout == "clip" else 3
        if len(tokenizers) != expected or len(text_encoders) != expected:
            raise ValueError(f"PromptEncoder: layout {layout!r} takes {expected} tokenizer(s) and text encoder(s), "
                             f"got {len(tokenizers)} and {len(text_encoders)}")
        for i in range(2 if layout == "sd3" else 1):
            if tokenizers[i] is None or text_encoders[i] is None:
                raise ValueError(f"PromptEncoder: tokenizer/text encoder {i + 1} of layout {layout!r} is required")
        if layout == "sd3":
            if (tokenizers[2] is None) != (text_encoders[2] is None):
                raise ValueError("PromptEncoder.sd3: give both T5's tokenizer and encoder, or neither")
            if not isinstance(joint_attention_dim, int) or joint_attention_dim < 1:
                raise ValueError(f"PromptEncoder.sd3: 'joint_attention_dim' (the transformer's T5 width) must be a "
                                 f"positive int, got {joint_attention_dim!r}")
            if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
                raise ValueError(f"PromptEncoder.sd3: 'max_sequence_length' must be a positive int, got "
                                 f"{max_sequence_length!r}")
        self.layout = layout
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.joint_attention_dim, self.max_sequence_length = joint_attention_dim, max_sequence_length

    @classmethod
    def clip(cls, tokenizer, text_encoder) -> "PromptEncoder":
        return cls("clip", [tokenizer], [text_encoder])

    @classmethod
    def sd3(cls, tokenizer, text_encoder, tokenizer_2, text_encoder_2, tokenizer_3=None, text_encoder_3=None, *,
            joint_attention_dim: int, max_sequence_length: int = 256) -> "PromptEncoder":
        return cls("sd3", [tokenizer, tokenizer_2, tokenizer_3], [text_encoder, text_encoder_2, text_encoder_3],
                   joint_attention_dim=joint_attention_dim, max_sequence_length=max_sequence_length)

    @classmethod
    def from_pipeline(cls, pipe, max_sequence_length: int = 256) -> "PromptEncoder":
        """The encoders of a diffusers StableDiffusionPipeline or StableDiffusion3Pipeline."""
        if hasattr(pipe, "text_encoder_3"):
            return cls.sd3(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2,
                           pipe.tokenizer_3, pipe.text_encoder_3,
                           joint_attention_dim=pipe.transformer.config.joint_attention_dim,
                           max_sequence_length=max_sequence_length)
        return cls.clip(pipe.tokenizer, pipe.text_encoder)

    # ------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The first (for 'clip' the only) tokenizer."""
        return self.tokenizers[0]

    @property
    def text_encoder(self):
        """The first (for 'clip' the only) text encoder."""
        return self.text_encoders[0]

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "PromptEncoder":
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for encoder in self.text_encoders:
            if encoder is not None:
                encoder.to(**kwargs)
        return self

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """The 'clip' layout's token ids [N, L] (padded to the tokenizer's max length), on the encoder's device."""
        self._need_clip("token_ids")
        return _pad_ids(self.tokenizers[0], _check_prompts("PromptEncoder.token_ids", prompts),
                        self.tokenizers[0].model_max_length, self.device)

    def encode_ids(self, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The 'clip' layout's conditioning of token ids from :meth:`token_ids` (a training loop can tokenize
        once and encode batches of rows)."""
        self._need_clip("encode_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"PromptEncoder.encode_ids: 'ids' must be integer token ids [N, L], got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} of shape {tuple(getattr(ids, 'shape', ()))}")
        return {"encoder_hidden_states": self.text_encoders[0](ids.to(self.device))[0]}

    def __call__(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The conditioning dict of ``prompts`` (one row per prompt); autograd as the caller."""
        prompts = _check_prompts("PromptEncoder", prompts)
        if self.layout == "clip":
            return self.encode_ids(self.token_ids(prompts))
        return self._sd3(prompts)

    # ------------------------------------------------------------------------------------------------
    def _need_clip(self, op: str) -> None:
        if self.layout != "clip":
            raise ValueError(f"PromptEncoder.{op}: only the 'clip' layout encodes one token-id tensor, this "
                             f"encoder is {self.layout!r}")

    def _sd3(self, prompts) -> Dict[str, torch.Tensor]:
        device = self.device
        dtype = self.text_encoders[0].dtype
        hidden, pooled = [], []
        length = self.tokenizers[0].model_max_length  # both CLIPs pad to the first tokenizer's length
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            out = encoder(_pad_ids(tokenizer, prompts, length, device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(dtype=dtype, device=device))
        clip_states = torch.cat(hidden, dim=-1)
        if self.text_encoders[2] is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim, device=device,
                             dtype=dtype)
        else:
            encoder = self.text_encoders[2]
            ids = _pad_ids(self.tokenizers[2], prompts, self.max_sequence_length, device, add_special_tokens=True)
            t5 = encoder(ids)[0].to(dtype=encoder.dtype, device=device)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip_states, t5], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}


def _check_prompts(op: str, prompts) -> list:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts \
            or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{op}: 'prompts' must be a non-empty list of str, got {prompts!r}")
    return list(prompts)


def _pad_ids(tokenizer, prompts, max_length: int, device, **kwargs) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt",
                    **kwargs).input_ids
    return ids.to(device)
