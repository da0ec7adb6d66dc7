"""A tiny CLIP text stack for the CPU presets: a real ``CLIPTokenizer`` whose BPE vocabulary holds every given
word as one token (built from generated vocab.json / merges.txt files, nothing downloaded) and a small
``CLIPTextModel`` built from a config. Being the real classes, everything that works on Stable Diffusion's
tokenizer and text encoder (``add_tokens``, ``resize_token_embeddings``, ``save_pretrained``) works on these."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

START, END = "<|startoftext|>", "<|endoftext|>"


def build_word_tokenizer(words: Iterable[str], directory: Path, max_length: int = 16):
    """A CLIPTokenizer in which each of ``words`` (lower-case, no spaces) is a single token; any other text is
    spelled out from the characters of ``words``. The vocabulary files are written to ``directory``."""
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words})
    bad = [w for w in words if not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"build_word_tokenizer: 'words' must be non-empty and without spaces, got {bad}")
    chars = sorted(set("".join(words)))
    vocab = {t: i for i, t in enumerate([START, END] + chars + [c + "</w>" for c in chars])}
    merges = []
    for word in words:  # merge left to right: ((w o) r) d</w> -> one token per word
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def tiny_text_encoder(tokenizer, hidden_size: int = 32, layers: int = 2, heads: int = 2, projection_dim: int = 32):
    """A CLIPTextModel sized for CPU, with the tokenizer's vocabulary and maximum length."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads, projection_dim=projection_dim,
                            max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)
