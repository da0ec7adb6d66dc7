"""The ``tiny`` preset: DDIS' ablation in miniature on CPU. One off-domain digit prior, one BN teacher; three
synthetic sets (vanilla CFG sampling, DAG, DAG + CAT), each distilled into the same student; reported: the
BN loss of each set, the teacher's accuracy on it and the KD student's accuracy on the real digits test
split (plus a reference row: as many real training digits through the same KD).

Each (seed, method) is a run of the pipeline's stages (pipeline.py: run_tokens, run_synthesis, run_distill)
in ``<out>/seed<s>/<method>`` on one process, with the tiny world's models in place of Stable Diffusion's."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddg_models import ClassAlignmentTokens

from ..common.digits import DIGIT_NAMES
from ..common.tables import markdown_table, write_json
from .evaluate import load_image_folder, set_measures
from .models import build_sampler, preprocess_of
from .pipeline import (KDData, Run, RunConfig, TokenContext, classifier_accuracy, fresh_start, run_distill,
                       run_synthesis, run_tokens)
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
    quiet: bool = False
    attention_backend: str = "sdpa"


def shift_augment(x: torch.Tensor) -> torch.Tensor:
    """Random -1..1 pixel shift of the whole batch (cheap augmentation for the tiny KD; the global generator:
    the run's per-rank stream)."""
    dy, dx = torch.randint(-1, 2, (2,)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def _kd(run: Run, world, images: torch.Tensor, rc: TinyRun) -> float:
    x_te, y_te = world["real"][2:]
    kd = KDData(train=TensorDataset(images, torch.zeros(len(images), dtype=torch.long)),
                build_student=lambda: TinyBNNet(rc.world.student_widths),
                evaluate=classifier_accuracy(DataLoader(TensorDataset(x_te, y_te), batch_size=512), "student_test_acc"),
                augment=shift_augment)
    return run_distill(run, world["teacher"], kd)["row"]["student_test_acc"]


def _context(method: str, world, preset, rc: TinyRun) -> TokenContext:
    """The method's sampler (on its own copy of the text stack when tokens are added) and class tokens."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    parts = dict(world)
    tokens = None
    if method == "dag_cat":
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(Path(rc.out) / "world" / "tokenizer")
        parts["text_encoder"] = copy.deepcopy(world["text_encoder"])
    sampler = build_sampler(preset, parts, world["teacher"], DDIMScheduler(**scheduler_config()), rc.attention_backend)
    if method == "dag_cat":
        tokens = ClassAlignmentTokens(parts["tokenizer"], parts["text_encoder"], DIGIT_NAMES)
    with torch.no_grad():
        uncond = sampler.prompt_encoder([""])
    return TokenContext(sampler, tokens, world["teacher"], preprocess_of(preset.ce_preprocess, preset.classifier_size),
                        uncond)


def run_tiny(rc: TinyRun) -> List[list]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    log = accelerator.print
    torch.manual_seed(0)
    world = build_tiny_world(rc.out, rc.world, log=log, quiet=rc.quiet)
    preset = rc.preset
    x_tr, y_tr, x_te, y_te = world["real"]
    real = set_measures(world["teacher"], x_te, y_te, preset.bn_form)
    rows: List[list] = []
    results = {"preset": preset.to_dict(), "world": rc.world.__dict__, "runs": []}

    def sub_run(out: Path, seed: int, stages) -> Run:
        fresh_start(out, stages)  # a rerun regenerates its sets (the world stays cached)
        return Run.start(RunConfig(preset=preset, out=out, seed=seed, stages=stages, quiet=rc.quiet), accelerator,
                         f"DDIS tiny {out.parent.name}/{out.name}")

    for seed in rc.seeds:
        for method in rc.methods:
            out = Path(rc.out) / f"seed{seed}" / method
            run = sub_run(out, seed, ("tokens", "synthesize", "distill") if method == "dag_cat"
                          else ("synthesize", "distill"))
            ctx = _context(method, world, preset, rc)
            prompts = [f"a {n}" for n in DIGIT_NAMES]
            if ctx.tokens is not None:
                run_tokens(run, ctx)
                ctx.tokens.save_pretrained(out / "export" / "class_tokens")
                prompts = [ctx.tokens.prompt(c) for c in range(len(DIGIT_NAMES))]
            run_synthesis(run, ctx, prompts, DIGIT_NAMES, out / "images", guided=method != "vanilla")
            images, labels = load_image_folder(out / "images", channels=1)
            measures = set_measures(world["teacher"], images, labels, preset.bn_form)
            acc = _kd(run, world, images, rc)
            run.finished()
            cat_rows = run.products.get("tokens", {}).get("rows", [])
            rows.append([method, seed, measures["bn_loss"], measures["teacher_acc"], acc])
            results["runs"].append(dict(method=method, seed=seed, **measures, student_acc=acc, cat=cat_rows))
            log(f"{method} seed {seed}: BN loss {measures['bn_loss']:.3f}, teacher acc {measures['teacher_acc']:.1f}, "
                f"student acc {acc:.1f}")
    # The reference: as many real training digits as a synthetic set holds, through the same KD.
    subset = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(rc.seeds[0]))
    subset = subset[:preset.images_per_class * len(DIGIT_NAMES)]
    ref_run = sub_run(Path(rc.out) / "real_kd", rc.seeds[0], ("distill",))
    ref_acc = _kd(ref_run, world, x_tr[subset], rc)
    ref_run.finished()
    rows.append(["real digits (reference)", rc.seeds[0], real["bn_loss"], real["teacher_acc"], ref_acc])
    table = markdown_table(HEADER, _mean_rows(rows, rc.methods) if len(rc.seeds) > 1 else rows)
    results["table"] = table
    results["metrics"] = {f"{r[0]}_seed{r[1]}_student_acc": r[4] for r in rows}
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
