"""GenDD's stages, data, logging and checkpoints.

* ``run_stage``: the epoch loop of one stage (AdamW/SGD with the per-epoch LR schedule and GenDD's
  per-iteration beta2 ramp, accelerate for devices / DDP / mixed precision, tqdm, one log row per epoch).
  A checkpoint (``examples.common.checkpoint``) is written after every epoch, and at ``--max-steps`` (a
  global optimizer-step count over all stages of the run), where the run then stops (``StopRun``).
* ``run_distill`` (CIFAR-100 / ImageNet presets and their smoke cuts): frozen teacher from ``--teacher-ckpt``,
  stage 1, stage 2 (GenDD), optional linear probe; ``results.json``'s ``metrics`` (final accuracies and losses
  of every stage) and ``export/`` (``export.py``), written once by the main process. The tiny CPU experiment
  is ``tiny.py``.

Randomness: models are built from a seed shared by every rank; each stage then trains from the rank's own
stream (``examples.common.seeding``): the global generators (augmentation) and a generator the stage owns for
GenDD's timesteps, noise, CFG-drop masks and mixup. A resumed stage restores all of them.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..common import checkpoint
from ..common.main_process import on_main
from ..common.runlog import RunLog, write_results
from ..common.seeding import rank_generator, seed_rank_stream, seed_shared
from ..common.staged_run import StagedRun as Run, StopRun
from ..common.tables import markdown_table
from . import data, models
from .evaluate import evaluate_classifier, evaluate_gendd
from .export import save_gendd
from .method import (GenDDModel, ProbeModel, Stage1Model, build_gendd_loss, ce_loss, gendd_loss,
                     load_stage1_backbone, stage1_loss)
from .optim import beta2_at, build_optimizer, build_scheduler, set_beta2
from .presets import Preset, StageConfig

LossFn = Callable[[nn.Module, object, torch.Generator], tuple]  # (prepared module, batch, generator) -> (loss, metrics)
EvalFn = Callable[[nn.Module, int, bool], Dict[str, float]]      # (unwrapped module, epoch, final) -> metrics

COLUMNS = ["stage", "epoch", "step", "seed", "loss", "diff", "mse", "vb", "ce", "kd", "train_acc", "lr", "beta2",
           "acc", "acc_sample", "acc_sample_skip", "acc_probe", "epoch_s"]
PANELS = {"training loss": ("loss", "diff"), "test top-1 (%)": ("acc", "acc_probe", "acc_sample", "acc_sample_skip")}
TIMING = ("epoch_s",)  # columns that differ between two runs of the same settings


@dataclass
class RunConfig:
    preset: Preset
    out: Path
    seeds: Tuple[int, ...] = (0,)
    stages: Tuple[str, ...] = ("stage1", "stage2")
    data_root: Optional[str] = None
    teacher_ckpt: Optional[str] = None
    from_checkpoint: Optional[str] = None     # an earlier run's checkpoint: its finished stages are reused
    resume: bool = False
    max_steps: Optional[int] = None          # global optimizer steps (all stages); stop after that checkpoint
    steps_per_epoch: Optional[int] = None
    eval_batches: Optional[int] = None
    data_limit: Optional[int] = None
    quiet: bool = False
    methods: Tuple[str, ...] = ("ce", "kd", "gendd")  # tiny preset: which students to train
    mixed_precision: str = "no"
    keep_checkpoints: int = 2

    def settings(self) -> Dict:
        """What changes the results (the checkpoint fingerprint): not out, resume, max_steps, quiet."""
        return {"preset": self.preset.to_dict(), "seeds": list(self.seeds), "stages": list(self.stages),
                "methods": list(self.methods), "mixed_precision": self.mixed_precision,
                "steps_per_epoch": self.steps_per_epoch, "eval_batches": self.eval_batches,
                "data_limit": self.data_limit, "teacher_ckpt": self.teacher_ckpt,
                "from_checkpoint": self.from_checkpoint,
                "deterministic": torch.are_deterministic_algorithms_enabled()}


def start_run(rc: RunConfig, accelerator, title: str) -> Run:
    return Run.start(rc, accelerator, RunLog(rc.out, accelerator.is_main_process, COLUMNS, x="step", panels=PANELS,
                                             title=title, log_y=("training loss",)))


@dataclass
class Stage:
    key: str                      # unique in the run: names its checkpoints and products
    model: nn.Module              # the trainable module (unwrapped); the frozen teacher stays outside
    cfg: StageConfig
    loss_fn: LossFn
    eval_fn: Optional[EvalFn] = None
    train_loader: object = None
    seed: int = 0                 # the training streams: rank_seed(seed, rank)
    row_extra: Dict[str, object] = field(default_factory=dict)
    name: Optional[str] = None    # the log's stage column (default: key)


def run_stage(run: Run, stage: Stage) -> Dict:
    """Train ``stage`` (or what is left of it after a resume) and return its product: the trained weights
    (``stage.model`` holds them afterwards too) and its last log row. A stage finished before the resume point
    only loads its product."""
    acc, rc, cfg = run.accelerator, run.rc, stage.cfg
    if stage.key in run.products:
        run.skip(stage.key)  # a checkpoint written as the stage finished
        stage.model.load_state_dict(run.products[stage.key]["model"])
        return run.products[stage.key]
    run.stop_if_at_max()
    optimizer = build_optimizer(stage.model, cfg)
    scheduler = build_scheduler(optimizer, cfg)  # per epoch: not handed to accelerate (it steps per iteration)
    model, optimizer = acc.prepare(stage.model, optimizer)
    unwrapped = acc.unwrap_model(model)
    generator = rank_generator(stage.seed, acc.process_index)  # GenDD's timesteps, noise, masks, mixup
    generators = {"method": generator}
    loader, sampler = stage.train_loader, stage.train_loader.sampler
    sampler.set_epoch(0)
    per_epoch = len(loader) if rc.steps_per_epoch is None else min(len(loader), rc.steps_per_epoch)
    total_steps = max(cfg.epochs * per_epoch, 1)
    pos = {"epoch": 0, "batch": 0, "stage_step": 0, "sums": {}, "count": 0, "beta2": cfg.beta2, "elapsed": 0.0}
    ckpt = run.resume_point(stage.key)
    if ckpt is not None:
        rank_state = checkpoint.load(ckpt, acc, stage.key, generators)
        pos = rank_state["position"]
        scheduler.load_state_dict(rank_state["scheduler"])
        run.resume_from = None
    else:
        seed_rank_stream(stage.seed, acc.process_index)

    def save():
        checkpoint.save(run.ckpt_root, acc, stage=stage.key, step=run.step, settings=rc.settings(),
                        state={"rows": run.log.rows, "products": run.products}, generators=generators,
                        rank_state={"position": pos, "scheduler": scheduler.state_dict()}, keep=rc.keep_checkpoints)

    try:  # the prepared objects are released whether the stage ends, stops at --max-steps or fails
        while pos["epoch"] < cfg.epochs:
            epoch = pos["epoch"]
            sampler.set_epoch(epoch, pos["batch"] * loader.batch_size)  # the batches done before a resume
            model.train()
            lr = optimizer.param_groups[0]["lr"]
            start, stop = time.perf_counter(), False
            bar = tqdm(total=per_epoch, initial=pos["batch"], desc=f"{stage.key} {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=rc.quiet or not acc.is_local_main_process)
            for batch in loader:
                if cfg.beta2_min is not None:  # rescheduled every iteration (docs/methods/gendd.md §2.10)
                    pos["beta2"] = beta2_at(pos["stage_step"], total_steps - 1, cfg.beta2_min, cfg.beta2)
                    set_beta2(optimizer, pos["beta2"])
                batch = tuple(t.to(acc.device) for t in batch)
                with acc.autocast():
                    loss, metrics = stage.loss_fn(model, batch, generator)
                optimizer.zero_grad(set_to_none=True)
                acc.backward(loss)
                optimizer.step()
                run.step += 1
                pos["stage_step"] += 1
                pos["batch"] += 1
                pos["count"] += 1
                for k, v in metrics.items():
                    pos["sums"][k] = pos["sums"].get(k, 0.0) + v.detach().float()
                bar.update(1)
                if pos["batch"] % 20 == 1:
                    current = float(loss.detach())
                    if not math.isfinite(current):
                        raise FloatingPointError(f"[{stage.key}] non-finite loss {current} at epoch {epoch + 1}, "
                                                 f"step {run.step}")
                    bar.set_postfix(loss=f"{current:.4f}")
                if rc.max_steps is not None and run.step >= rc.max_steps:
                    stop = True
                    if pos["batch"] < per_epoch:  # inside the epoch: checkpoint here and stop
                        bar.close()
                        pos["elapsed"] += time.perf_counter() - start
                        save()
                        run.log.close()
                        raise StopRun
                if pos["batch"] >= per_epoch or stop:  # before the next fetch, whose augmentation draws no step uses
                    break
            bar.close()
            scheduler.step()
            count = max(pos["count"], 1)
            row = {"stage": stage.name or stage.key, "epoch": epoch + 1, "step": run.step, **stage.row_extra}
            for k, v in pos["sums"].items():
                row[k] = float(acc.reduce(torch.as_tensor(v, device=acc.device) / count, "mean"))
            if not all(math.isfinite(row[k]) for k in pos["sums"]):
                raise FloatingPointError(f"[{stage.key}] non-finite training metrics at epoch {epoch + 1}: {row}")
            row.update(lr=lr, beta2=pos["beta2"], epoch_s=pos["elapsed"] + time.perf_counter() - start)
            pos = {"epoch": epoch + 1, "batch": 0, "stage_step": pos["stage_step"], "sums": {}, "count": 0,
                   "beta2": pos["beta2"], "elapsed": 0.0}
            final = pos["epoch"] == cfg.epochs
            if stage.eval_fn is not None:
                row.update(stage.eval_fn(unwrapped, epoch + 1, final))
            run.log.add(row)
            if not rc.quiet:
                acc.print(summary(row))
            if final:
                weights = {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}
                run.products[stage.key] = {"model": weights, "row": row}
            save()
            if stop:
                run.log.close()
                raise StopRun
    finally:
        # a module leaves its stage plain: accelerate's mixed-precision forward wrapper would otherwise keep
        # autocasting it in later stages (a trained teacher), unlike the same module loaded on a resume
        acc.unwrap_model(model, keep_fp32_wrapper=False)
        acc.free_memory()
    return run.products[stage.key]


def summary(row: Dict) -> str:
    keys = ("loss", "diff", "ce", "kd", "train_acc", "acc", "acc_probe", "acc_sample", "acc_sample_skip", "lr",
            "beta2")
    parts = [f"{k} {row[k]:.4g}" for k in keys if isinstance(row.get(k), float)]
    return f"[{row['stage']}] epoch {row['epoch']} step {row['step']}: " + ", ".join(parts)


def per_process_batch(total: int, accelerator) -> int:
    """The per-process share of a total batch size (refused when it does not divide)."""
    if total % accelerator.num_processes:
        raise SystemExit(f"--batch-size {total} is not divisible by the {accelerator.num_processes} processes")
    return total // accelerator.num_processes


def gendd_evaluation(preset: Preset, seed: int, eval_batches: Optional[int], final: bool = True) -> Dict:
    """The keyword arguments of ``evaluate_gendd`` of a stage-2 evaluation (the final one: n_s of the preset's
    final evaluation; the others: its per-epoch n_s); recorded with the export."""
    return dict(num_steps=preset.eval_steps, cfg_scale=preset.eval_cfg,
                num_samples=preset.eval_samples if final else preset.val_samples, seed=seed,
                batch_size=preset.eval_batch_size, max_batches=eval_batches)


def gendd_eval(preset: Preset, teacher_fc: nn.Linear, test_set, accelerator, eval_batches, seed: int,
               quiet: bool = False) -> EvalFn:
    def evaluate(model, epoch: int, final: bool) -> Dict[str, float]:
        sample = final or epoch % max(preset.val_every, 1) == 0
        return evaluate_gendd(model, teacher_fc, test_set, sample=sample, accelerator=accelerator,
                              num_workers=preset.num_workers, desc=None if quiet else "sampling evaluation",
                              **gendd_evaluation(preset, seed, eval_batches, final))
    return evaluate


def classifier_eval(test_set, preset: Preset, accelerator, eval_batches, name: str = "acc",
                    quiet: bool = False) -> EvalFn:
    return lambda model, epoch, final: evaluate_classifier(
        model, test_set, preset.eval_batch_size, name, accelerator, eval_batches, preset.num_workers,
        None if quiet else "evaluation")


def gendd_step(model, batch, generator, teacher):
    return gendd_loss(model, teacher, batch, generator)


FINAL_COLUMNS = ("acc", "acc_sample", "acc_sample_skip", "acc_probe", "loss", "diff", "mse", "vb", "ce", "kd",
                 "train_acc")


def final_row_metrics(prefix: str, row: Dict) -> Dict[str, float]:
    """``<prefix>_<column>`` of a stage's last log row: its test accuracies and its last epoch's mean training
    losses (deterministic given the settings; no timings)."""
    return {f"{prefix}_{k}": float(row[k]) for k in FINAL_COLUMNS if isinstance(row.get(k), (int, float))}


def earlier_products(path: Optional[str]) -> Dict[str, Dict]:
    """The finished stages of an earlier run's checkpoint (a ``step-*`` folder, or a ``checkpoints`` folder:
    its latest), for ``--from-checkpoint``."""
    if not path:
        return {}
    path = Path(path)
    if (path / checkpoint.LATEST).is_file():
        path = path / (path / checkpoint.LATEST).read_text().strip()
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"--from-checkpoint {path}: not a checkpoint (no state.pt)")
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)["products"]


def run_distill(rc: RunConfig, accelerator) -> Dict:
    """CIFAR-100 / ImageNet: stage 1, stage 2 (GenDD) and the optional probe, from a frozen local teacher."""
    p, seed = rc.preset, rc.seeds[0]
    if not rc.teacher_ckpt:
        raise SystemExit(f"--teacher-ckpt is required for {p.name}: the {p.teacher} teacher is loaded from a local "
                         "file (nothing is downloaded)")
    if not Path(rc.teacher_ckpt).is_file():
        raise FileNotFoundError(f"--teacher-ckpt {rc.teacher_ckpt}: no such file (the {p.teacher} teacher's weights)")
    run = start_run(rc, accelerator, f"GenDD {p.name}")
    teacher = models.freeze(models.load(p.teacher, rc.teacher_ckpt, p.num_classes)).to(accelerator.device)
    teacher_fc = models.classifier(teacher)
    batch = per_process_batch(p.batch_size, accelerator)
    earlier = earlier_products(rc.from_checkpoint)

    cache: Dict[object, tuple] = {}

    def loaders_for(cfg: StageConfig):  # the datasets are read once per crop scale (ImageFolder scans are slow)
        if cfg.crop_scale not in cache:
            cache[cfg.crop_scale] = data.datasets_for(p.dataset, rc.data_root, cfg.crop_scale, rc.data_limit,
                                                      p.image_size)
        train, test = cache[cfg.crop_scale]
        return data.train_loader(train, batch, seed, p.num_workers, accelerator.process_index,
                                 accelerator.num_processes), test

    results: Dict[str, object] = {"preset": p.name, "teacher": p.teacher, "student": p.student}
    metrics: Dict[str, float] = {}
    start = time.perf_counter()
    _, test_set = loaders_for(p.stage2)
    metrics["teacher_acc"] = classifier_eval(test_set, p, accelerator, rc.eval_batches, "acc", rc.quiet)(
        teacher, 0, True)["acc"]
    accelerator.print(f"teacher {p.teacher}: top-1 {metrics['teacher_acc']:.2f}")

    stage1_state = None
    if "stage1" in rc.stages and p.stage1 is not None:
        seed_shared(seed)
        m1 = Stage1Model(models.build(p.student, p.num_classes), teacher)
        train_loader, test_set = loaders_for(p.stage1)
        prod = run_stage(run, Stage("stage1", m1, p.stage1, stage1_loss,
                                    classifier_eval(test_set, p, accelerator, rc.eval_batches, quiet=rc.quiet),
                                    train_loader, seed))
        stage1_state = prod["model"]
        metrics.update(final_row_metrics("stage1", prod["row"]))
    elif "stage1" in earlier:
        stage1_state = earlier["stage1"]["model"]

    seed_shared(seed + 1)
    student = models.build(p.student, p.num_classes)
    m2 = prod2 = None
    if "stage2" in rc.stages:
        if stage1_state is not None:
            info = load_stage1_backbone(student, stage1_state)
            accelerator.print(f"stage 2 starts from the stage-1 backbone (dropped: {info['dropped']}, "
                              f"missing: {info['missing']})")
        m2 = GenDDModel(student, build_gendd_loss(p, student, teacher))
        train_loader, test_set = loaders_for(p.stage2)
        prod = run_stage(run, Stage("stage2", m2, p.stage2, functools.partial(gendd_step, teacher=teacher),
                                    gendd_eval(p, teacher_fc, test_set, accelerator, rc.eval_batches, seed, rc.quiet),
                                    train_loader, seed + 1))
        prod2 = prod
        metrics.update(final_row_metrics("stage2", prod["row"]))

    if "probe" in rc.stages and p.probe is not None:
        if m2 is None:  # the probe alone: the student of an earlier stage-2 run
            if "stage2" not in earlier:
                raise SystemExit("--stages probe without stage2 needs --from-checkpoint: a checkpoint of a run that "
                                 "finished stage 2")
            m2 = GenDDModel(student, build_gendd_loss(p, student, teacher))
            m2.load_state_dict(earlier["stage2"]["model"])
        seed_shared(seed + 2)
        probe = ProbeModel(m2.student)
        train_loader, test_set = loaders_for(p.stage2)
        prod = run_stage(run, Stage("probe", probe, p.probe, ce_loss,
                                    classifier_eval(test_set, p, accelerator, rc.eval_batches, "acc_probe", rc.quiet),
                                    train_loader, seed + 2))
        metrics.update(final_row_metrics("probe", prod["row"]))

    run.finished()
    if m2 is not None:  # the final student (with the probe stage's fc when that ran), its condition and head
        # stage 2's last evaluation (of this run, or of the earlier run the probe started from)
        stage2_row = prod2["row"] if prod2 is not None else earlier["stage2"]["row"]
        measured = {k: float(stage2_row[k]) for k in ("acc_sample", "acc_sample_skip", "acc_probe")
                    if isinstance(stage2_row.get(k), (int, float))}
        if "probe_acc_probe" in metrics:
            measured["acc_probe"] = metrics["probe_acc_probe"]
        on_main(accelerator, lambda: save_gendd(Path(rc.out) / "export", m2, teacher_fc, student=p.student,
                                                num_classes=p.num_classes, measured=measured,
                                                evaluation=gendd_evaluation(p, seed, rc.eval_batches)))
    results.update(metrics=metrics, wall_s=time.perf_counter() - start)
    write_results(rc.out, results, accelerator.is_main_process)
    if accelerator.is_main_process:
        table = [(k, v) for k, v in metrics.items()]
        (Path(rc.out) / "results.md").write_text(f"# GenDD {p.name}: {p.teacher} -> {p.student}\n\n"
                                                 + markdown_table(["metric", "value"], table))
    return results
