"""Class Alignment Token training (docs/methods/ddis.md §3): sample with DAG, classify the final image with the
teacher, and backpropagate the cross-entropy into the class token through the last denoising step only.

Per group of classes (one class at a time as DDIS, or all classes together with ``cat_joint``): each epoch
draws the same initial noises (DDIS reseeds the generator every epoch), accumulates the cross-entropy over
``cat_prompts_per_epoch`` prompts per class into one optimiser step, clips the token gradient after the
backward (the reference's clipping was dead), and stops when the epoch's accuracy reaches ``cat_threshold``
or after ``cat_patience`` epochs without a new lowest loss. The rows of the lowest-loss epoch are kept.
Finished groups are saved (``tokens/`` + ``cat_state.json``), so a restart continues with the next group.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .components import teacher_logits

STATE = "cat_state.json"
TOKENS = "tokens"


def latent_shape(sampler):
    cfg = sampler.teacher.model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    return (cfg.in_channels,) + ((size, size) if isinstance(size, int) else size)


def class_groups(num_classes: int, joint: bool) -> List[List[int]]:
    return [list(range(num_classes))] if joint else [[c] for c in range(num_classes)]


def load_state(out: Path) -> dict:
    path = Path(out) / STATE
    return json.loads(path.read_text()) if path.is_file() else {"done": [], "rows": []}


def train_class_tokens(sampler, tokens, teacher, ce_preprocess, preset, out: Path, uncond: Dict[str, torch.Tensor], *,
                       quiet: bool = False, log: Callable[[str], None] = print) -> List[dict]:
    """Train every group not yet in ``<out>/cat_state.json``; returns the per-epoch log rows of all groups."""
    out = Path(out)
    state = load_state(out)
    shape = latent_shape(sampler)
    for group in class_groups(len(tokens.tokens), preset.cat_joint):
        key = ",".join(map(str, group))
        if key in state["done"]:
            continue
        state["rows"] += _train_group(sampler, tokens, teacher, ce_preprocess, preset, group, shape, uncond, quiet)
        last = state["rows"][-1]
        log(f"CAT classes [{key}]: {last['epoch'] + 1} epochs, accuracy {last['accuracy']:.2f}, "
            f"best loss {last['best_loss']:.4f}")
        tokens.save_pretrained(out / TOKENS)
        state["done"].append(key)
        out.mkdir(parents=True, exist_ok=True)
        (out / STATE).write_text(json.dumps(state, indent=1))
    return state["rows"]


def _train_group(sampler, tokens, teacher, ce_preprocess, preset, group: Sequence[int], shape, uncond,
                 quiet: bool) -> List[dict]:
    tokens.set_trainable(group)
    opt = torch.optim.AdamW(tokens.parameters(), lr=preset.cat_lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=preset.cat_weight_decay)
    labels = torch.tensor(list(group)).repeat(preset.cat_prompts_per_epoch)
    device = sampler.codec.device
    best_loss, best_rows, since_best, rows = math.inf, None, 0, []
    bar = tqdm(range(preset.cat_epochs), desc=f"CAT {group if len(group) < 4 else 'all'}", disable=quiet,
               leave=False)
    for epoch in bar:
        g = torch.Generator().manual_seed(preset.cat_seed)  # the same noises every epoch, as DDIS
        before = tokens.learned_embeddings()
        opt.zero_grad(set_to_none=True)
        total, correct = 0.0, 0
        for chunk in labels.split(preset.cat_batch):
            latents = torch.randn((len(chunk),) + shape, generator=g).to(device)
            cond = sampler.prompt_encoder(tokens.prompts(chunk.tolist()))
            out = sampler(cond, uncond, latents=latents, num_inference_steps=preset.steps,
                          grad_steps=preset.cat_grad_steps)
            logits = teacher_logits(teacher, ce_preprocess, out.images)
            loss = F.cross_entropy(logits.float(), chunk.to(device), reduction="sum") / len(labels)
            loss.backward()
            total += loss.item()
            correct += int((logits.argmax(1).cpu() == chunk).sum())
        grad_norm = float(tokens.clip_grad_norm_(preset.cat_max_grad_norm))
        opt.step()
        tokens.restore_frozen_rows()
        accuracy = correct / len(labels)
        if total < best_loss:  # the rows that produced this epoch's images
            best_loss, best_rows, since_best = total, before, 0
        else:
            since_best += 1
        rows.append(dict(classes=",".join(map(str, group)), epoch=epoch, loss=total, accuracy=accuracy,
                         grad_norm=grad_norm, best_loss=best_loss))
        bar.set_postfix(loss=f"{total:.3f}", acc=f"{accuracy:.2f}")
        if accuracy >= preset.cat_threshold or since_best >= preset.cat_patience:
            break
    learned = tokens.learned_embeddings()
    learned[list(group)] = best_rows[list(group)]
    tokens.set_learned_embeddings(learned)
    return rows
