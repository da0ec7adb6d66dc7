"""The ``tiny`` preset: DDIS' ablation in miniature on CPU. One off-domain digit prior, one BN teacher; three
synthetic sets (vanilla CFG sampling, DAG, DAG + CAT), each distilled into the same student; reported: the
BN loss of each set, the teacher's accuracy on it and the KD student's accuracy on the real digits test
split (plus a reference row: as many real training digits through the same KD)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddg_models import ClassAlignmentTokens

from ..common.digits import DIGIT_NAMES
from ..common.tables import markdown_table, write_json
from .cat import TOKENS, load_state, train_class_tokens
from .components import build_sampler, preprocess_of
from .distill import distill
from .evaluate import load_image_folder, set_measures
from .synthesize import save_class_grids, synthesize
from .tiny_world import TinyBNNet, TinyWorldConfig, build_tiny_world, scheduler_config

METHODS = ("vanilla", "dag", "dag_cat")
HEADER = ("method", "seed", "BN loss of the set", "teacher acc on the set (%)", "KD student acc, real test (%)")


@dataclass
class TinyRun:
    preset: object
    out: Path
    seeds: Tuple[int, ...] = (0,)
    methods: Tuple[str, ...] = METHODS
    world: TinyWorldConfig = field(default_factory=TinyWorldConfig)
    resume: bool = False
    quiet: bool = False
    attention_backend: str = "sdpa"


def shift_augment(x: torch.Tensor) -> torch.Tensor:
    """Random -1..1 pixel shift of the whole batch (cheap augmentation for the tiny KD)."""
    dy, dx = torch.randint(-1, 2, (2,)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def _kd(world, images: torch.Tensor, preset, out: Path, seed: int, rc: TinyRun, log) -> float:
    x_te, y_te = world["real"][2:]
    torch.manual_seed(seed)
    student = TinyBNNet(rc.world.student_widths)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)),
                       batch_size=preset.kd_batch, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=512)
    rows = distill(world["teacher"], student, train, preset, out, test_loader=test, augment=shift_augment,
                   resume=rc.resume, quiet=rc.quiet, log=log)
    return rows[-1]["student_test_acc"]


def _prompts_and_sampler(method: str, world, preset, out: Path, rc: TinyRun, log):
    """The method's sampler (on its own copy of the text stack when tokens are added) and class prompts."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    scheduler = DDIMScheduler(**scheduler_config())
    parts = dict(world)
    if method == "dag_cat":
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(Path(rc.out) / "world" / "tokenizer")
        parts["text_encoder"] = copy.deepcopy(world["text_encoder"])
    sampler = build_sampler(preset, parts, world["teacher"], scheduler, rc.attention_backend)
    with torch.no_grad():
        uncond = sampler.prompt_encoder([""])
    if method != "dag_cat":
        return sampler, [f"a {n}" for n in DIGIT_NAMES], uncond, []
    cat_dir = out / "cat"
    tokens = ClassAlignmentTokens(parts["tokenizer"], parts["text_encoder"], DIGIT_NAMES)
    if load_state(cat_dir)["done"]:
        tokens.load_embeddings(cat_dir / TOKENS)
    rows = train_class_tokens(sampler, tokens, world["teacher"], preprocess_of(preset.ce_preprocess,
                                                                              preset.classifier_size),
                              preset, cat_dir, uncond, quiet=rc.quiet, log=log)
    return sampler, [tokens.prompt(c) for c in range(len(DIGIT_NAMES))], uncond, rows


def run_tiny(rc: TinyRun, log: Callable[[str], None] = print) -> List[list]:
    torch.manual_seed(0)
    world = build_tiny_world(rc.out, rc.world, log=log)
    preset = rc.preset
    x_tr, y_tr, x_te, y_te = world["real"]
    real = set_measures(world["teacher"], x_te, y_te, preset.bn_form)
    rows: List[list] = []
    results = {"preset": preset.to_dict(), "world": rc.world.__dict__, "runs": []}
    for seed in rc.seeds:
        for method in rc.methods:
            out = Path(rc.out) / f"seed{seed}" / method
            torch.manual_seed(seed)
            sampler, prompts, uncond, cat_rows = _prompts_and_sampler(method, world, preset, out, rc, log)
            synthesize(sampler, prompts, DIGIT_NAMES, out / "images", per_class=preset.images_per_class,
                       batch_size=preset.synth_batch, steps=preset.steps, seed=seed, uncond=uncond,
                       guided=method != "vanilla", save_size=preset.save_size, quiet=rc.quiet)
            save_class_grids(out / "images", DIGIT_NAMES, preset.images_per_class, out / "grids")
            images, labels = load_image_folder(out / "images", channels=1)
            measures = set_measures(world["teacher"], images, labels, preset.bn_form)
            acc = _kd(world, images, preset, out / "kd", seed, rc, log)
            rows.append([method, seed, measures["bn_loss"], measures["teacher_acc"], acc])
            results["runs"].append(dict(method=method, seed=seed, **measures, student_acc=acc, cat=cat_rows))
            log(f"{method} seed {seed}: BN loss {measures['bn_loss']:.3f}, teacher acc {measures['teacher_acc']:.1f}, "
                f"student acc {acc:.1f}")
    # The reference: as many real training digits as a synthetic set holds, through the same KD.
    subset = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(rc.seeds[0]))
    subset = subset[:preset.images_per_class * len(DIGIT_NAMES)]
    ref_acc = _kd(world, x_tr[subset], preset, Path(rc.out) / "real_kd", rc.seeds[0], rc, log)
    rows.append(["real digits (reference)", rc.seeds[0], real["bn_loss"], real["teacher_acc"], ref_acc])
    table = markdown_table(HEADER, _mean_rows(rows, rc.methods) if len(rc.seeds) > 1 else rows)
    results["table"] = table
    write_json(Path(rc.out) / "results.json", results)
    (Path(rc.out) / "results.md").write_text(table)
    log("\n" + table)
    return rows


def _mean_rows(rows: List[list], methods: Sequence[str]) -> List[list]:
    """Per-seed rows followed by mean +- std per method."""
    out = list(rows)
    for method in methods:
        vals = torch.tensor([r[2:] for r in rows if r[0] == method], dtype=torch.float64)
        mean, std = vals.mean(0), vals.std(0) if len(vals) > 1 else torch.zeros(3)
        out.append([f"{method} (mean ± std)", "all"] + [f"{m:.2f} ± {s:.2f}" for m, s in zip(mean, std)])
    return out
