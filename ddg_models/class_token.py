"""DDIS' Class Alignment Token (CAT): one learned pseudo-word per class in a CLIP text encoder.

Textual-inversion style (docs/methods/ddis.md §3): a new token S_c per class is added to the tokenizer and to the
text encoder's input embedding (initialised from the embedding of ``initializer``, "a" in DDIS), the prompt
is ``"a {S_c} {class name}"``, and only the new rows of the embedding matrix train. Everything else in the
text encoder is frozen, the gradient of the embedding matrix is masked to the new rows (so clipping norms
and optimiser moments see only them), and :meth:`restore_frozen_rows` undoes what an optimiser step with
weight decay does to the other rows. Learned rows are saved as safetensors plus a json description.
"""
from __future__ import annotations

import json
import math
from numbers import Real
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

_NAME = "ClassAlignmentTokens"
WEIGHTS_NAME = "learned_embeds.safetensors"
CONFIG_NAME = "class_tokens.json"


class ClassAlignmentTokens:
    """Adds one token per class to ``tokenizer`` / ``text_encoder`` (in place) and manages their training.

    Args:
        tokenizer: a transformers tokenizer (e.g. ``CLIPTokenizer``) supporting ``add_tokens``.
        text_encoder: a transformers text model (e.g. ``CLIPTextModel``) with ``get_input_embeddings`` and
            ``resize_token_embeddings``.
        class_names: one name per class (the words after the token in the prompt).
        token_format: the new tokens' strings, formatted with the class index ``i``; must not be in the vocabulary.
        initializer: the word whose (single-token) embedding initialises every new row.
        template: the prompt, formatted with ``token`` and ``name``.
    """

    def __init__(self, tokenizer, text_encoder, class_names: Sequence[str], *, token_format: str = "<cat-{i}>",
                 initializer: str = "a", template: str = "a {token} {name}"):
        names = list(class_names) if not isinstance(class_names, str) else None
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{_NAME}: 'class_names' must be a non-empty list of non-empty str, got {class_names!r}")
        for what, fmt, keys in (("token_format", token_format, {"i": 0}),
                                ("template", template, {"token": "T", "name": "N"})):
            try:
                fmt.format(**keys)
            except (KeyError, IndexError, AttributeError) as e:
                raise ValueError(f"{_NAME}: '{what}' must be a format string using only {sorted(keys)}, "
                                 f"got {fmt!r}") from e
        tokens = [token_format.format(i=i) for i in range(len(names))]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"{_NAME}: 'token_format' must give distinct tokens per class (use '{{i}}'), "
                             f"got {token_format!r}")
        vocab = tokenizer.get_vocab()
        clash = [t for t in tokens if t in vocab or len(tokenizer.tokenize(t)) == 1]
        if clash:
            raise ValueError(f"{_NAME}: the new tokens must not be in the vocabulary already, got {clash[:5]}")
        init_ids = tokenizer.encode(initializer, add_special_tokens=False)
        if len(init_ids) != 1:
            raise ValueError(f"{_NAME}: 'initializer' must be a single token of the tokenizer, got {initializer!r} "
                             f"-> {len(init_ids)} tokens")
        added = tokenizer.add_tokens(tokens)
        if added != len(tokens):
            raise ValueError(f"{_NAME}: the tokenizer added {added} of {len(tokens)} tokens")
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set below
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.class_names, self.tokens = names, tokens
        self.template, self.initializer, self.token_format = template, initializer, token_format
        self.token_ids = tokenizer.convert_tokens_to_ids(tokens)
        weight = self.embedding_weight
        with torch.no_grad():
            weight[self.token_ids] = weight[init_ids[0]].clone()
        for p in text_encoder.parameters():
            p.requires_grad_(False)
        weight.requires_grad_(True)
        self._mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        self._reference = weight.detach().clone()
        self.set_trainable()
        self._hook = weight.register_hook(lambda grad: grad * self._mask.to(grad.device, grad.dtype))

    # -- access --------------------------------------------------------------------------------
    @property
    def embedding_weight(self) -> torch.nn.Parameter:
        return self.text_encoder.get_input_embeddings().weight

    def parameters(self) -> List[torch.nn.Parameter]:
        """What the optimiser gets: the embedding matrix (its gradient is zero outside the token rows)."""
        return [self.embedding_weight]

    def prompt(self, class_index: int) -> str:
        if isinstance(class_index, bool) or not isinstance(class_index, int) or not 0 <= class_index < len(self.tokens):
            raise ValueError(f"{_NAME}.prompt: 'class_index' must be an int in [0, {len(self.tokens)}), "
                             f"got {class_index!r}")
        return self.template.format(token=self.tokens[class_index], name=self.class_names[class_index])

    def prompts(self, class_indices: Sequence[int]) -> List[str]:
        return [self.prompt(int(c)) for c in class_indices]

    def learned_embeddings(self) -> torch.Tensor:
        """[num_classes, hidden] the current token rows (detached copy)."""
        return self.embedding_weight.detach()[self.token_ids].clone()

    # -- training ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_trainable(self, class_indices: Optional[Sequence[int]] = None) -> None:
        """Train only the rows of ``class_indices`` (default: every class token) from now on; every other row,
        the already learned tokens of other classes included, is held at its current value."""
        indices = range(len(self.tokens)) if class_indices is None else list(class_indices)
        bad = [c for c in indices if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < len(self.tokens)]
        if bad or not indices:
            raise ValueError(f"{_NAME}.set_trainable: 'class_indices' must be a non-empty list of ints in "
                             f"[0, {len(self.tokens)}), got {class_indices!r}")
        weight = self.embedding_weight
        self._mask.zero_()
        self._mask[[self.token_ids[c] for c in indices]] = 1
        # What restore_frozen_rows writes back: every row as it is now.
        self._reference = weight.detach().clone()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the token rows' gradient to a total norm of ``max_norm`` (call after ``backward``: the reference
        called it before, with a string max-norm, so it never clipped). Returns the norm before clipping."""
        if isinstance(max_norm, bool) or not isinstance(max_norm, Real) or not (0 < max_norm < math.inf):
            raise ValueError(f"{_NAME}.clip_grad_norm_: 'max_norm' must be a finite number > 0, got {max_norm!r}")
        return torch.nn.utils.clip_grad_norm_(self.parameters(), float(max_norm))

    @torch.no_grad()
    def restore_frozen_rows(self) -> None:
        """Write back every row that is not trainable (after ``optimizer.step()``: decoupled weight decay
        shrinks rows whose gradient is zero)."""
        weight = self.embedding_weight
        frozen = ~self._mask.squeeze(1).bool().to(weight.device)  # the encoder may have moved since __init__
        weight[frozen] = self._reference.to(weight.device, weight.dtype)[frozen]

    @torch.no_grad()
    def set_learned_embeddings(self, embeddings: torch.Tensor) -> None:
        weight = self.embedding_weight
        if not isinstance(embeddings, torch.Tensor) or tuple(embeddings.shape) != (len(self.tokens), weight.shape[1]):
            raise ValueError(f"{_NAME}: embeddings must be [{len(self.tokens)}, {weight.shape[1]}], got "
                             f"{tuple(getattr(embeddings, 'shape', ()))}")
        weight[self.token_ids] = embeddings.to(weight.device, weight.dtype)

    def remove_hook(self) -> None:
        """Stop masking the embedding gradient (e.g. before fine-tuning the text encoder otherwise)."""
        self._hook.remove()

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """``learned_embeds.safetensors`` ({token: row}) and ``class_tokens.json`` in ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows = self.learned_embeddings().float().cpu()
        save_file({t: rows[i].contiguous() for i, t in enumerate(self.tokens)}, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(
            {"tokens": self.tokens, "token_format": self.token_format, "class_names": self.class_names,
             "template": self.template, "initializer": self.initializer}, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], tokenizer, text_encoder,
                        class_names: Optional[Sequence[str]] = None) -> "ClassAlignmentTokens":
        """Add the saved tokens to ``tokenizer`` / ``text_encoder`` and load their learned rows."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{_NAME}.from_pretrained: {path} not found (written by save_pretrained)")
        config = json.loads(config_path.read_text())
        names = list(class_names) if class_names is not None else config["class_names"]
        if len(names) != len(config["tokens"]):
            raise ValueError(f"{_NAME}.from_pretrained: {len(config['tokens'])} saved tokens, got "
                             f"{len(names)} class names")
        self = cls(tokenizer, text_encoder, names, token_format=config["token_format"],
                   initializer=config["initializer"], template=config["template"])
        self.load_embeddings(directory)
        return self

    def load_embeddings(self, directory: Union[str, Path]) -> None:
        """Set the token rows from a ``save_pretrained`` directory whose tokens are these tokens."""
        from safetensors.torch import load_file

        path = Path(directory) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{_NAME}.load_embeddings: {path} not found (written by save_pretrained)")
        rows: Dict[str, torch.Tensor] = load_file(str(path))
        if sorted(rows) != sorted(self.tokens):
            raise ValueError(f"{_NAME}.load_embeddings: {path} holds tokens {sorted(rows)[:3]}..., these tokens "
                             f"are {self.tokens[:3]}... ({len(rows)} vs {len(self.tokens)})")
        self.set_learned_embeddings(torch.stack([rows[t] for t in self.tokens]))
        self.set_trainable()

