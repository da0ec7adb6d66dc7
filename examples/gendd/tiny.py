"""The tiny CPU experiment (digits): a teacher CNN is trained, then the same student three ways under one
budget (cross-entropy, Hinton KD, GenDD stage 2, plus GenDD's linear-probe stage) for each seed, and the
accuracy table is written (results.json, results.md)."""
from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from ..common.main_process import on_main
from ..common.runlog import write_results
from ..common.seeding import seed_shared
from ..common.tables import markdown_table
from . import data, models
from .export import save_gendd
from .method import GenDDModel, ProbeModel, build_gendd_loss, ce_loss, kd_loss
from .pipeline import (RunConfig, Stage, classifier_eval, gendd_eval, gendd_evaluation, gendd_step,
                       per_process_batch, run_stage, start_run)

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
    run = start_run(rc, accelerator, f"GenDD tiny preset, seeds {', '.join(map(str, rc.seeds))}")
    rank, world = accelerator.process_index, accelerator.num_processes
    per_seed: Dict[int, Dict[str, float]] = {}
    start = time.perf_counter()
    for seed in rc.seeds:
        train, test = data.digits(limit=rc.data_limit)
        train_loader = data.train_loader(train, per_process_batch(p.batch_size, accelerator), seed, p.num_workers,
                                         rank, world)
        accs: Dict[str, float] = {}
        extra = {"seed": seed}

        seed_shared(seed)
        if rc.teacher_ckpt:
            teacher = models.load(p.teacher, rc.teacher_ckpt, p.num_classes)
        else:
            teacher = models.build(p.teacher, p.num_classes)
            run_stage(run, Stage(f"seed{seed}-teacher", teacher, p.teacher_stage, ce_loss,
                                 classifier_eval(test, p, accelerator, rc.eval_batches, quiet=rc.quiet), train_loader,
                                 seed, extra, "teacher"))
        teacher = models.freeze(teacher).to(accelerator.device)
        accs["teacher"] = classifier_eval(test, p, accelerator, rc.eval_batches, quiet=rc.quiet)(
            teacher, 0, True)["acc"]

        for method in rc.methods:
            seed_shared(seed + 1000)  # the same student initialisation for the three methods
            student = models.build(p.student, p.num_classes)
            if method == "gendd":
                model = GenDDModel(student, build_gendd_loss(p, student, teacher))
                loss_fn = functools.partial(gendd_step, teacher=teacher)
                eval_fn = gendd_eval(p, models.classifier(teacher), test, accelerator, rc.eval_batches, seed, rc.quiet)
            else:
                model = student
                loss_fn = ce_loss if method == "ce" else functools.partial(
                    _kd_step, teacher=teacher, temperature=p.kd_temperature, alpha=p.kd_alpha)
                eval_fn = classifier_eval(test, p, accelerator, rc.eval_batches, quiet=rc.quiet)
            last = run_stage(run, Stage(f"seed{seed}-{method}", model, p.stage2, loss_fn, eval_fn, train_loader,
                                        seed + 1000, extra, method))["row"]
            if method == "gendd":
                for key in ("sample", "sample_skip", "probe"):
                    accs[f"gendd_{key}"] = last.get(f"acc_{key}")
            else:
                accs[method] = last.get("acc")
            if method == "gendd" and "probe" in rc.stages and p.probe is not None:
                seed_shared(seed + 2000)
                last = run_stage(run, Stage(f"seed{seed}-gendd_probe", ProbeModel(model.student), p.probe, ce_loss,
                                            classifier_eval(test, p, accelerator, rc.eval_batches, "acc_probe",
                                                            rc.quiet),
                                            train_loader, seed + 2000, extra, "gendd_probe"))["row"]
                accs["gendd_probe_stage"] = last.get("acc_probe")
            if method == "gendd":  # the final GenDD student of this seed (with the probe stage's fc if it ran)
                on_main(accelerator, lambda: save_gendd(
                    Path(rc.out) / "export" / f"seed{seed}", model, models.classifier(teacher), student=p.student,
                    num_classes=p.num_classes, evaluation=gendd_evaluation(p, seed, rc.eval_batches),
                    measured=_export_measured(accs)))
        per_seed[seed] = accs
        accelerator.print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in accs.items() if v is not None))

    run.finished()
    stage_wall: Dict[str, float] = {}
    for r in run.log.rows:
        name = r["stage"]
        stage_wall[name] = stage_wall.get(name, 0.0) + r.get("epoch_s", 0.0)
    results = {"preset": p.name, "seeds": list(rc.seeds), "per_seed": per_seed, "wall_s": time.perf_counter() - start,
               "stage_wall_s": stage_wall, "processes": world, "mixed_precision": rc.mixed_precision,
               "budget": {"epochs": p.stage2.epochs, "batch_size": p.batch_size,
                          "steps_per_epoch": rc.steps_per_epoch, "optimizer": p.stage2.to_dict()},
               "gendd": {"R": p.batch_mul, "contraction": p.contraction, "head_width": p.head_width,
                         "head_depth": p.head_depth, "eval_steps": p.eval_steps, "eval_samples": p.eval_samples,
                         "eval_cfg": p.eval_cfg}}
    results["summary"] = {key: _mean_std([per_seed[s].get(key) for s in rc.seeds]) for _, key in TABLE_ROWS}
    results["metrics"] = {f"seed{s}_{key}": value for s in rc.seeds for key, value in per_seed[s].items()
                          if value is not None}
    write_results(rc.out, results, accelerator.is_main_process)
    if accelerator.is_main_process:
        table = tiny_table(per_seed, rc.seeds)
        (rc.out / "results.md").write_text(
            f"# GenDD tiny preset (digits): top-1 on the fixed test split (%)\n\n{table}\n"
            f"Same budget for the three students: {p.stage2.epochs} epochs, batch {p.batch_size}, AdamW "
            f"lr {p.stage2.lr}, beta2 {p.stage2.beta2_min}->{p.stage2.beta2}. GenDD: R={p.batch_mul}, "
            f"lambda={p.contraction}, head {p.head_depth}x{p.head_width}, sampling {p.eval_steps} steps, "
            f"CFG {p.eval_cfg}, n_s {p.eval_samples}. The last row adds a linear-probe stage "
            f"({p.probe.epochs if p.probe else 0} epochs, SGD lr {p.probe.lr if p.probe else '-'}, a fresh fc on "
            f"the frozen student). {world} process(es), mixed precision {rc.mixed_precision}. Wall time "
            f"{results['wall_s']:.0f} s.\n")
        accelerator.print("\n" + table)
    return results


def _export_measured(accs: Dict[str, Optional[float]]) -> Dict[str, float]:
    """The exported GenDD student's last evaluation: sampling accuracies of stage 2, the probe accuracy of the
    last stage that trained its fc."""
    measured = {"acc_sample": accs.get("gendd_sample"), "acc_sample_skip": accs.get("gendd_sample_skip"),
                "acc_probe": accs.get("gendd_probe_stage", accs.get("gendd_probe"))}
    return {k: v for k, v in measured.items() if v is not None}


def _kd_step(model, batch, generator, teacher, temperature, alpha):
    return kd_loss(model, teacher, batch, generator, temperature, alpha)


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
