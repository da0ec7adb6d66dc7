"""The two pipelines of ``train.py``.

* ``run_distill`` (CIFAR-100 / ImageNet presets): frozen teacher from ``--teacher-ckpt``, stage 1, stage 2
  (GenDD), optional linear probe; final sampling and probe accuracies.
* ``run_tiny`` (digits, CPU): trains a teacher CNN, then the same student three ways under one budget
  (cross-entropy, Hinton KD, GenDD stage 2) for each seed, and writes the accuracy table.
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from accelerate.utils import set_seed

from ..common.tables import markdown_table, write_json
from . import data, models, report
from .evaluate import evaluate_classifier, evaluate_gendd
from .presets import Preset, StageConfig
from .stages import (GenDDModel, ProbeModel, Stage1Model, build_gendd_loss, ce_loss, gendd_loss, kd_loss,
                     load_stage1_backbone, stage1_loss)
from .trainer import RunOptions, Stage, run_stage, summary


@dataclass
class RunConfig:
    preset: Preset
    out: Path
    seeds: Tuple[int, ...] = (0,)
    stages: Tuple[str, ...] = ("stage1", "stage2")
    data_root: Optional[str] = None
    teacher_ckpt: Optional[str] = None
    stage1_ckpt: Optional[str] = None
    resume: bool = False
    max_steps: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    eval_batches: Optional[int] = None
    data_limit: Optional[int] = None
    quiet: bool = False
    methods: Tuple[str, ...] = ("ce", "kd", "gendd")  # tiny preset: which students to train


class RunLog:
    """Collects every stage's epoch rows, rewrites log.csv after each epoch and prints a summary line."""

    def __init__(self, path: Path, accelerator):
        self.path, self.accelerator, self.rows = path, accelerator, []

    def __call__(self, row: Dict, replay: bool = False) -> None:
        self.rows.append(row)
        report.write_csv(self.path, self.rows)
        if not replay:
            self.accelerator.print(summary(row))


def rescale(cfg: StageConfig, epochs: Optional[int]) -> StageConfig:
    """The same schedule over ``epochs``: warmup and milestones scale proportionally."""
    if epochs is None or epochs == cfg.epochs:
        return cfg
    f = epochs / cfg.epochs
    return replace(cfg, epochs=epochs, warmup_epochs=round(cfg.warmup_epochs * f),
                   milestones=tuple(max(1, round(m * f)) for m in cfg.milestones))


def _options(rc: RunConfig, ckpt_dir: Path, log: RunLog, **extra) -> RunOptions:
    return RunOptions(ckpt_dir=ckpt_dir, resume=rc.resume, max_steps=rc.max_steps, steps_per_epoch=rc.steps_per_epoch,
                      quiet=rc.quiet, on_epoch=log, row_extra=extra)


def _gendd_eval(preset: Preset, teacher, test_loader, accelerator, eval_batches, seed: int):
    def evaluate(model, epoch: int, final: bool) -> Dict[str, float]:
        sample = final or epoch % max(preset.val_every, 1) == 0
        return evaluate_gendd(model, teacher, test_loader, num_steps=preset.eval_steps, cfg_scale=preset.eval_cfg,
                              num_samples=preset.eval_samples if final else preset.val_samples, seed=seed,
                              sample=sample, accelerator=accelerator, max_batches=eval_batches)
    return evaluate


def _classifier_eval(test_loader, accelerator, eval_batches, name: str = "acc"):
    return lambda model, epoch, final: evaluate_classifier(model, test_loader, name, accelerator, eval_batches)


def _last(state, *keys) -> Dict[str, float]:
    row = state.rows[-1] if state.rows else {}
    return {k: row.get(k) for k in keys}


# ------------------------------------------------------------------------------------------ CIFAR / ImageNet

def run_distill(rc: RunConfig, accelerator) -> Dict:
    p, seed = rc.preset, rc.seeds[0]
    set_seed(seed)
    rc.out.mkdir(parents=True, exist_ok=True)
    log, ckpt_dir = RunLog(rc.out / "log.csv", accelerator), rc.out / "checkpoints"
    if not rc.teacher_ckpt:
        raise SystemExit(f"--teacher-ckpt is required for {p.name}: the {p.teacher} teacher is loaded from a local "
                         "file (nothing is downloaded)")
    if not Path(rc.teacher_ckpt).is_file():
        raise FileNotFoundError(f"--teacher-ckpt {rc.teacher_ckpt}: no such file (the {p.teacher} teacher's weights)")
    teacher = models.freeze(models.load(p.teacher, rc.teacher_ckpt, p.num_classes)).to(accelerator.device)
    batch = p.batch_size // accelerator.num_processes

    cache: Dict[object, tuple] = {}

    def loaders_for(cfg: StageConfig):  # the datasets are read once per crop scale (ImageFolder scans are slow)
        if cfg.crop_scale not in cache:
            cache[cfg.crop_scale] = data.datasets_for(p.dataset, rc.data_root, cfg.crop_scale, rc.data_limit)
        train_loader, test_loader = data.loaders(*cache[cfg.crop_scale], batch, seed, p.num_workers)
        return train_loader, accelerator.prepare(test_loader)

    results: Dict[str, object] = {"preset": p.name, "teacher": p.teacher, "student": p.student}
    start = time.perf_counter()
    _, test_loader = loaders_for(p.stage2)
    results["teacher_acc"] = evaluate_classifier(teacher, test_loader, "acc", accelerator, rc.eval_batches)["acc"]
    accelerator.print(f"teacher {p.teacher}: top-1 {results['teacher_acc']:.2f}")

    stage1_state = None
    if "stage1" in rc.stages and p.stage1 is not None:
        m1 = Stage1Model(models.build(p.student, p.num_classes), teacher)
        train_loader, test_loader = loaders_for(p.stage1)
        st = run_stage(Stage("stage1", m1, p.stage1, stage1_loss, _classifier_eval(test_loader, accelerator,
                                                                                       rc.eval_batches),
                             train_loader), accelerator, _options(rc, ckpt_dir, log))
        stage1_state, results["stage1_acc"] = m1.state_dict(), _last(st, "acc")["acc"]
        accelerator.free_memory()
    elif rc.stage1_ckpt:
        stage1_state = torch.load(rc.stage1_ckpt, map_location="cpu", weights_only=False)["model"]

    student = models.build(p.student, p.num_classes)
    m2 = None
    if "stage2" in rc.stages:
        if stage1_state is not None:
            info = load_stage1_backbone(student, stage1_state)
            accelerator.print(f"stage 2 starts from the stage-1 backbone (dropped: {info['dropped']}, "
                              f"missing: {info['missing']})")
        m2 = GenDDModel(student, build_gendd_loss(p, student, teacher))
        train_loader, test_loader = loaders_for(p.stage2)
        st = run_stage(Stage("stage2", m2, p.stage2, functools.partial(_gendd_step, teacher=teacher),
                             _gendd_eval(p, teacher, test_loader, accelerator, rc.eval_batches, seed), train_loader),
                       accelerator, _options(rc, ckpt_dir, log))
        results.update({f"gendd_{k}": v for k, v in _last(st, "acc_sample", "acc_sample_skip", "acc_probe").items()})
        if accelerator.is_main_process:
            m2.gendd.head.save_pretrained(rc.out / "head")
        accelerator.free_memory()

    if "probe" in rc.stages and p.probe is not None:
        if m2 is None:  # the probe alone: the student of an earlier stage-2 run
            m2 = GenDDModel(student, build_gendd_loss(p, student, teacher))
            m2.load_state_dict(torch.load(ckpt_dir / "stage2.pt", map_location="cpu", weights_only=False)["model"])
        probe = ProbeModel(m2.student)
        train_loader, test_loader = loaders_for(p.stage2)
        st = run_stage(Stage("probe", probe, p.probe, ce_loss,
                             _classifier_eval(test_loader, accelerator, rc.eval_batches, "acc_probe"), train_loader),
                       accelerator, _options(rc, ckpt_dir, log))
        results["probe_acc"] = _last(st, "acc_probe")["acc_probe"]
        accelerator.free_memory()

    results["wall_s"] = time.perf_counter() - start
    if accelerator.is_main_process:
        _write_results(rc.out, results, log.rows, p)
    return results


def _gendd_step(model, batch, teacher):
    return gendd_loss(model, teacher, batch)


def _write_results(out: Path, results: Dict, rows: List[Dict], p: Preset) -> None:
    write_json(out / "results.json", results)
    table = [(k, v) for k, v in results.items() if isinstance(v, float)]
    (out / "results.md").write_text(f"# GenDD {p.name}: {p.teacher} -> {p.student}\n\n"
                                    + markdown_table(["metric", "value"], table))
    if rows:
        report.plot(out / "curves.png", rows, f"GenDD {p.name}")


# ------------------------------------------------------------------------------------------ tiny (digits)

METHODS = ("ce", "kd", "gendd")
TABLE_ROWS = (("teacher (CE)", "teacher"),
              ("student, cross-entropy", "ce"),
              ("student, KD (T=4, alpha=0.9)", "kd"),
              ("student, GenDD: sampling as coded (chain starts at t=999)", "gendd_sample"),
              ("student, GenDD: sampling without the t=999 step", "gendd_sample_skip"),
              ("student, GenDD: stage-2 linear probe (Acc_new)", "gendd_probe"),
              ("student, GenDD + linear-probe stage (frozen features, extra)", "gendd_probe_stage"))


def run_tiny(rc: RunConfig, accelerator) -> Dict:
    p = rc.preset
    rc.out.mkdir(parents=True, exist_ok=True)
    log = RunLog(rc.out / "log.csv", accelerator)
    per_seed: Dict[int, Dict[str, float]] = {}
    times: Dict[str, float] = {}
    start = time.perf_counter()
    for seed in rc.seeds:
        ckpt_dir = rc.out / f"seed{seed}"
        set_seed(seed)
        train, test = data.digits(limit=rc.data_limit)
        train_loader, test_loader = data.loaders(train, test, p.batch_size // accelerator.num_processes, seed,
                                                 p.num_workers, eval_batch_size=512)
        test_loader = accelerator.prepare(test_loader)
        accs: Dict[str, float] = {}

        t0 = time.perf_counter()
        if rc.teacher_ckpt:
            teacher = models.load(p.teacher, rc.teacher_ckpt, p.num_classes)
        else:
            teacher = models.build(p.teacher, p.num_classes)
            run_stage(Stage("teacher", teacher, p.teacher_stage, ce_loss,
                            _classifier_eval(test_loader, accelerator, rc.eval_batches), train_loader),
                      accelerator, _options(rc, ckpt_dir, log, seed=seed))
        teacher = models.freeze(accelerator.unwrap_model(teacher)).to(accelerator.device)
        accs["teacher"] = evaluate_classifier(teacher, test_loader, "acc", accelerator, rc.eval_batches)["acc"]
        times["teacher"] = times.get("teacher", 0.0) + time.perf_counter() - t0

        for method in rc.methods:
            t0 = time.perf_counter()
            set_seed(seed + 1000)  # the same student initialisation for the three methods
            student = models.build(p.student, p.num_classes)
            if method == "gendd":
                model = GenDDModel(student, build_gendd_loss(p, student, teacher))
                loss_fn = functools.partial(_gendd_step, teacher=teacher)
                eval_fn = _gendd_eval(p, teacher, test_loader, accelerator, rc.eval_batches, seed)
            else:
                model = student
                loss_fn = ce_loss if method == "ce" else functools.partial(
                    _kd_step, teacher=teacher, temperature=p.kd_temperature, alpha=p.kd_alpha)
                eval_fn = _classifier_eval(test_loader, accelerator, rc.eval_batches)
            st = run_stage(Stage(method, model, p.stage2, loss_fn, eval_fn, train_loader), accelerator,
                           _options(rc, ckpt_dir, log, seed=seed))
            last = st.rows[-1] if st.rows else {}
            if method == "gendd":
                for key in ("sample", "sample_skip", "probe"):
                    accs[f"gendd_{key}"] = last.get(f"acc_{key}")
            else:
                accs[method] = last.get("acc")
            times[method] = times.get(method, 0.0) + time.perf_counter() - t0
            accelerator.free_memory()
            if method == "gendd" and "probe" in rc.stages and p.probe is not None:
                t0 = time.perf_counter()
                st = run_stage(Stage("gendd_probe", ProbeModel(model.student), p.probe, ce_loss,
                                     _classifier_eval(test_loader, accelerator, rc.eval_batches, "acc_probe"),
                                     train_loader), accelerator, _options(rc, ckpt_dir, log, seed=seed))
                accs["gendd_probe_stage"] = st.rows[-1].get("acc_probe") if st.rows else None
                times["gendd_probe"] = times.get("gendd_probe", 0.0) + time.perf_counter() - t0
                accelerator.free_memory()
        per_seed[seed] = accs
        accelerator.print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in accs.items() if v is not None))

    results = {"preset": p.name, "seeds": list(rc.seeds), "per_seed": per_seed, "wall_s": time.perf_counter() - start,
               "stage_wall_s": times, "budget": {"epochs": p.stage2.epochs, "batch_size": p.batch_size,
                                                 "steps_per_epoch": rc.steps_per_epoch, "max_steps": rc.max_steps,
                                                 "optimizer": p.stage2.to_dict()},
               "gendd": {"R": p.batch_mul, "contraction": p.contraction, "head_width": p.head_width,
                         "head_depth": p.head_depth, "eval_steps": p.eval_steps, "eval_samples": p.eval_samples,
                         "eval_cfg": p.eval_cfg}}
    results["summary"] = {key: _mean_std([per_seed[s].get(key) for s in rc.seeds]) for _, key in TABLE_ROWS}
    if accelerator.is_main_process:
        write_json(rc.out / "results.json", results)
        table = tiny_table(per_seed, rc.seeds)
        (rc.out / "results.md").write_text(
            f"# GenDD tiny preset (digits): top-1 on the fixed test split (%)\n\n{table}\n"
            f"Same budget for the three students: {p.stage2.epochs} epochs, batch {p.batch_size}, AdamW "
            f"lr {p.stage2.lr}, beta2 {p.stage2.beta2_min}->{p.stage2.beta2}. GenDD: R={p.batch_mul}, "
            f"lambda={p.contraction}, head {p.head_depth}x{p.head_width}, sampling {p.eval_steps} steps, "
            f"CFG {p.eval_cfg}, n_s {p.eval_samples}. The last row adds a linear-probe stage "
            f"({p.probe.epochs if p.probe else 0} epochs, SGD lr {p.probe.lr if p.probe else '-'}, a fresh fc on "
            f"the frozen student). Wall time {results['wall_s']:.0f} s.\n")
        accelerator.print("\n" + table)
        if log.rows:
            first = [r for r in log.rows if r.get("seed") == rc.seeds[0]]
            report.plot(rc.out / "curves.png", first, f"GenDD tiny preset, seed {rc.seeds[0]}")
    return results


def _kd_step(model, batch, teacher, temperature, alpha):
    return kd_loss(model, teacher, batch, temperature, alpha)


def _mean_std(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def tiny_table(per_seed: Dict[int, Dict[str, float]], seeds: Sequence[int]) -> str:
    header = ["method"] + [f"seed {s}" for s in seeds] + (["mean ± std"] if len(seeds) > 1 else [])
    rows = []
    for label, key in TABLE_ROWS:
        values = [per_seed[s].get(key) for s in seeds]
        row = [label] + [v if v is not None else "-" for v in values]
        if len(seeds) > 1:
            ms = _mean_std(values)
            row.append("-" if ms["mean"] is None else f"{ms['mean']:.2f} ± {ms['std']:.2f}")
        rows.append(row)
    return markdown_table(header, rows)
