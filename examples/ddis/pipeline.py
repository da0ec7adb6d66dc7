"""DDIS end to end: learn the class tokens (CAT), synthesize the set with DAG, distil the student (KD).

Stages (``--stages``, default all three) and what they leave in the run directory ``<out>``:

* ``tokens``: the classes are independent, so they are dealt over the processes in rounds: in round j rank r
  trains group ``j * world + r``. The ranks step in lockstep, one CAT optimiser step (an epoch of
  ``cat_prompts_per_epoch`` accumulated prompts) per global step, whether or not a rank still has a class to
  train (a rank whose class stopped early waits for the round's end); at the end of a round the learned rows
  are gathered on every rank. A class's noises depend on ``cat_seed`` only (DDIS reseeds every epoch), never
  on the rank that trains it, so the tokens are the same on any number of processes.
* ``synthesize``: image k of class c is job (c, k); rank r makes every world-th job of the fixed list of all
  jobs (skipping images already on disk), so the split never depends on what another rank has written. The
  stage has no optimiser step: its state is the set itself (each image written atomically and a function of
  (seed, c, k)), so it writes no checkpoint; a restarted run regenerates only the missing images. All ranks
  meet in a barrier afterwards, and KD refuses an incomplete set naming the classes that lack images.
* ``distill``: DDP over the processes; the epoch order is a function of (seed, epoch) (EpochSampler, sharded
  here), augmentation draws from the rank's own stream, an in-epoch resume skips the done batches.

``--max-steps N`` counts CAT steps and KD steps (synthesis adds none); checkpoints (examples/common/checkpoint.py)
are written after every CAT round, every KD epoch and at step N. Evaluation, the run log, the exports
(``export/student.safetensors``, ``export/class_tokens/``) and ``results.json`` come from the main process.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ddg_losses import KLDistillationLoss

from ..common import checkpoint
from ..common.epoch_sampler import EpochSampler
from ..common.main_process import on_main
from ..common.runlog import RunLog, write_results
from ..common.seeding import seed_rank_stream, seed_shared
from ..common.staged_run import StagedRun, StopRun
from . import data
from .method import (CATBatch, cat_optimizer, cat_step, class_conditionings, class_groups, kd_optimizer, kd_step,
                     latent_shape, synthesize_batch, top1)

STAGES = ("tokens", "synthesize", "distill")
COLUMNS = ["stage", "step", "rank", "classes", "epochs", "epoch", "loss", "accuracy", "grad_norm", "best_loss",
           "first_class",
           "first_k", "images", "dag_loss_first", "dag_loss_last", "kd_loss", "agreement", "lr", "student_test_acc"]
PANELS = {"loss": ("loss", "kd_loss"), "accuracy": ("accuracy", "student_test_acc")}


@dataclass
class RunConfig:
    preset: object
    out: Path
    pretrained_model: Optional[str] = None
    teacher_ckpt: Optional[str] = None
    class_names_file: Optional[str] = None
    test_root: Optional[str] = None
    stages: Tuple[str, ...] = STAGES
    seed: int = 0
    resume: bool = False
    max_steps: Optional[int] = None
    quiet: bool = False
    attention_backend: str = "sdpa"
    mixed_precision: str = "no"
    keep_checkpoints: int = 2

    def settings(self) -> Dict:
        """What changes the results (the checkpoint fingerprint): not out, resume, max_steps, quiet."""
        return {"preset": self.preset.to_dict(), "stages": list(self.stages), "seed": self.seed,
                "mixed_precision": self.mixed_precision, "pretrained_model": self.pretrained_model,
                "teacher_ckpt": self.teacher_ckpt, "class_names_file": self.class_names_file,
                "test_root": self.test_root, "attention_backend": self.attention_backend}


@dataclass
class Run(StagedRun):
    """The shared run state, plus the step of the last checkpoint written (a stop at ``--max-steps`` right after
    a checkpoint does not write it twice)."""
    saved_at: Optional[int] = None

    @classmethod
    def start(cls, rc: RunConfig, accelerator, title: str) -> "Run":
        run = super().start(rc, accelerator, RunLog(rc.out, accelerator.is_main_process, COLUMNS, x="step",
                                                    panels=PANELS, title=title))
        run.saved_at = run.step if run.resume_from is not None else None
        return run

    def take_resume(self, stage: str) -> Optional[Dict]:
        """This process' ``rank_state`` if the run resumes inside ``stage`` (models, optimizers and RNGs restored)."""
        ckpt = self.resume_from
        if ckpt is None or ckpt.stage != stage:
            return None
        self.resume_from = None
        return checkpoint.load(ckpt, self.accelerator, stage)

    def save(self, stage: str, rank_state: Dict) -> None:
        checkpoint.save(self.ckpt_root, self.accelerator, stage=stage, step=self.step, settings=self.rc.settings(),
                        state={"rows": self.log.rows, "products": self.products}, rank_state=rank_state,
                        keep=self.rc.keep_checkpoints)
        self.saved_at = self.step

    def save_and_stop_if_at_max(self, stage: str, rank_state: Callable[[], Dict]) -> None:
        """At ``--max-steps``: the checkpoint of this step (unless just written), then StopRun."""
        if self.at_max():
            if self.saved_at != self.step:
                self.save(stage, rank_state())
            self.log.close()
            raise StopRun

    def bar(self, **kwargs):
        return tqdm(disable=self.rc.quiet or not self.accelerator.is_local_main_process, leave=False, **kwargs)


# ------------------------------------------------------------------------------------------------ CAT

@dataclass
class TokenContext:
    """The models the CAT and synthesis stages use."""
    sampler: object
    tokens: object                 # ddg_models.ClassAlignmentTokens (its text encoder is the sampler's)
    teacher: nn.Module
    ce_preprocess: nn.Module
    uncond: Dict[str, torch.Tensor]


def rounds_of(groups: List[List[int]], world: int) -> List[List[List[int]]]:
    """The groups dealt over ``world`` processes: round j holds groups j*world .. j*world + world - 1."""
    return [groups[i:i + world] for i in range(0, len(groups), world)]


def run_tokens(run: Run, ctx: TokenContext) -> Dict:
    """Train every class token (or what is left after a resume); returns the product {'embeddings', 'rows'}."""
    if "tokens" in run.products:
        run.skip("tokens")
        ctx.tokens.set_learned_embeddings(run.products["tokens"]["embeddings"])
        return run.products["tokens"]
    acc, preset, tokens = run.accelerator, run.rc.preset, ctx.tokens
    rank, world = acc.process_index, acc.num_processes
    rounds = rounds_of(class_groups(len(tokens.tokens), preset.cat_joint), world)
    shape = latent_shape(ctx.sampler)
    pos = {"round": 0, "learned": tokens.learned_embeddings(), "rows": []}
    mine: Optional[Dict] = None
    optimizer = None
    resumed = run.take_resume("tokens")
    if resumed is not None:
        pos, mine = resumed["pos"], resumed["mine"]
        tokens.set_learned_embeddings(pos["learned"])
    bar = run.bar(total=len(rounds), initial=pos["round"], desc="CAT rounds")

    def rank_state() -> Dict:
        current = None if mine is None else dict(mine, optimizer=optimizer.state_dict() if optimizer else None)
        return {"pos": pos, "mine": current}

    while pos["round"] < len(rounds):
        j = pos["round"]
        if mine is None or optimizer is None:  # the round starts, or resumes inside it
            fresh = mine is None
            if fresh:
                group = rounds[j][rank] if rank < len(rounds[j]) else None
                mine = {"group": group, "epoch": 0, "best_loss": math.inf, "best_rows": None, "since_best": 0,
                        "rows": [], "done": group is None, "optimizer": None}
            group = mine["group"]
            if group is not None:
                if not fresh:
                    learned = pos["learned"].clone()
                    learned[group] = mine["current"]
                    tokens.set_learned_embeddings(learned)
                tokens.set_trainable(group)  # every other row is held where it is now
                optimizer = cat_optimizer(tokens, preset.cat_lr, preset.cat_weight_decay)
                if mine.get("optimizer"):
                    optimizer.load_state_dict(mine["optimizer"])
            else:
                optimizer = False  # no class this round: wait in the lockstep
        group = mine["group"]
        while True:
            stepped = 0
            if not mine["done"]:
                before = tokens.learned_embeddings()[group]
                labels = torch.tensor(list(group)).repeat(preset.cat_prompts_per_epoch)
                m = cat_step(ctx.sampler, tokens, ctx.teacher, ctx.ce_preprocess, optimizer,
                             CATBatch(labels, preset.steps, preset.cat_grad_steps, preset.cat_batch, preset.cat_seed),
                             ctx.uncond, preset.cat_max_grad_norm, shape)
                if m["loss"] < mine["best_loss"]:  # keep the rows that produced this epoch's images
                    mine.update(best_loss=m["loss"], best_rows=before, since_best=0)
                else:
                    mine["since_best"] += 1
                mine["epoch"] += 1
                mine["rows"].append(dict(m, epoch=mine["epoch"]))
                mine["current"] = tokens.learned_embeddings()[group]
                mine["done"] = (m["accuracy"] >= preset.cat_threshold or mine["since_best"] >= preset.cat_patience
                                or mine["epoch"] >= preset.cat_epochs)
                stepped = 1
                bar.set_postfix(classes=",".join(map(str, group)), epoch=mine["epoch"], loss=f"{m['loss']:.4f}",
                                acc=f"{m['accuracy']:.2f}")
            flags = acc.reduce(torch.tensor([stepped, int(not mine["done"])], device=acc.device), "sum")
            if int(flags[0]):
                run.step += 1
            if stepped:
                mine["rows"][-1]["step"] = run.step
            if not int(flags[1]):
                break
            run.save_and_stop_if_at_max("tokens", rank_state)
        # the round's end: every rank's kept rows, on every rank
        from accelerate.utils import gather_object

        report = [] if group is None else [{"group": group, "rows": mine["best_rows"], "log": mine["rows"],
                                            "rank": rank, "best_loss": mine["best_loss"]}]
        for r in sorted(gather_object(report) if world > 1 else report, key=lambda r: r["group"][0]):
            pos["learned"][r["group"]] = r["rows"]
            last, classes = r["log"][-1], ",".join(map(str, r["group"]))
            for epoch in r["log"]:  # the class's CAT epochs, then its summary (the kept rows' loss)
                run.log.add({"stage": "tokens", "rank": r["rank"], "classes": classes, **epoch})
            row = {"stage": "tokens", "step": run.step, "rank": r["rank"], "classes": classes,
                   "epochs": len(r["log"]), "loss": last["loss"], "accuracy": last["accuracy"],
                   "best_loss": r["best_loss"]}
            pos["rows"].append(row)
            run.log.add(row)
        tokens.set_learned_embeddings(pos["learned"])
        pos["round"] += 1
        mine, optimizer = None, None
        bar.update(1)
        if pos["round"] == len(rounds):
            run.products["tokens"] = {"embeddings": pos["learned"].clone(), "rows": pos["rows"]}
        run.save("tokens", rank_state())
        run.save_and_stop_if_at_max("tokens", rank_state)
    bar.close()
    tokens.set_trainable()
    return run.products["tokens"]


# ------------------------------------------------------------------------------------------------ synthesis

def run_synthesis(run: Run, ctx: TokenContext, prompts: Sequence[str], names: Sequence[str], images: Path,
                  guided: bool = True) -> Dict:
    """Generate this rank's missing images of the set; all ranks meet afterwards and the set must be complete."""
    if "synthesize" in run.products:
        return run.products["synthesize"]
    acc, preset = run.accelerator, run.rc.preset
    jobs = data.all_jobs(len(names), preset.images_per_class)[acc.process_index::acc.num_processes]
    todo = [(c, k) for c, k in jobs if not data.image_path(images, c, names[c], k).is_file()]
    embeds = class_conditionings(ctx.sampler, prompts)
    batches = [todo[i:i + preset.synth_batch] for i in range(0, len(todo), preset.synth_batch)]
    mine = []
    for batch in run.bar(iterable=batches, desc=f"synthesize ({len(todo)} images)"):
        pictures, losses = synthesize_batch(ctx.sampler, embeds, ctx.uncond, batch, seed=run.rc.seed,
                                            steps=preset.steps, guided=guided)
        for (c, k), image in zip(batch, pictures.cpu()):
            data.save_image_atomic(image, data.image_path(images, c, names[c], k), preset.save_size)
        mine.append({"first_class": batch[0][0], "first_k": batch[0][1], "images": len(batch),
                     "dag_loss_first": losses[0] if losses else math.nan,
                     "dag_loss_last": losses[-1] if losses else math.nan, "rank": acc.process_index})
    acc.wait_for_everyone()  # every rank's images are on disk before anyone reads the set
    from accelerate.utils import gather_object

    rows = gather_object(mine) if acc.num_processes > 1 else mine
    for row in sorted(rows, key=lambda r: (r["first_k"], r["first_class"])):
        run.log.add({"stage": "synthesize", "step": run.step, **row})
    data.check_complete(images, names, preset.images_per_class)
    on_main(acc, lambda: data.save_class_grids(images, names, preset.images_per_class, Path(run.rc.out) / "grids"))
    run.products["synthesize"] = {"generated": sum(r["images"] for r in rows),
                                  "total": preset.images_per_class * len(names)}
    return run.products["synthesize"]


# ------------------------------------------------------------------------------------------------ KD

@dataclass
class KDData:
    """KD's inputs: the synthetic training set (any map-style dataset of (image, label)), the student's builder
    (called after the shared seed), an optional batch augmentation and the evaluation of a student (main process;
    its metrics go into the epoch's log row)."""
    train: object
    build_student: Callable[[], nn.Module]
    evaluate: Optional[Callable[[nn.Module], Dict[str, float]]] = None
    augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def run_distill(run: Run, teacher: nn.Module, kd: KDData) -> Dict:
    """Distil ``teacher`` into the student on ``kd.train``; returns the product {'student', 'row'}."""
    if "distill" in run.products:
        run.skip("distill")
        return run.products["distill"]
    acc, preset, rc = run.accelerator, run.rc.preset, run.rc
    if preset.kd_batch % acc.num_processes:
        raise SystemExit(f"--kd-batch {preset.kd_batch} is not divisible by the {acc.num_processes} processes")
    per_process = preset.kd_batch // acc.num_processes
    sampler = EpochSampler(len(kd.train), rc.seed, acc.process_index, acc.num_processes)
    # The loader's own generator: a new iterator draws its workers' base seed from it, not from the global
    # stream (an iterator started by a resume would otherwise shift every later augmentation draw).
    loader = DataLoader(kd.train, batch_size=per_process, sampler=sampler, num_workers=preset.num_workers,
                        drop_last=True, generator=torch.Generator().manual_seed(rc.seed))
    per_epoch = len(kd.train) // acc.num_processes // per_process
    if per_epoch < 1:
        raise SystemExit(f"KD: {len(kd.train)} images give no full batch of {per_process} per process")
    total = preset.kd_epochs * per_epoch
    seed_shared(rc.seed)
    student = kd.build_student()
    optimizer = kd_optimizer(preset.kd_optimizer, student.parameters(), preset.kd_lr, preset.kd_weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model, optimizer = acc.prepare(student, optimizer)
    criterion = KLDistillationLoss(temperature=preset.kd_temperature)
    teacher.eval()
    pos = {"epoch": 0, "batch": 0, "sums": {}, "count": 0}
    resumed = run.take_resume("distill")
    if resumed is not None:
        pos = resumed["position"]
        scheduler.load_state_dict(resumed["scheduler"])
    else:
        seed_rank_stream(rc.seed + 1, acc.process_index)  # augmentation: the rank's own stream

    def rank_state() -> Dict:
        return {"position": pos, "scheduler": scheduler.state_dict()}

    try:
        while pos["epoch"] < preset.kd_epochs:
            epoch = pos["epoch"]
            sampler.set_epoch(epoch, pos["batch"] * per_process)
            model.train()
            lr = optimizer.param_groups[0]["lr"]
            bar = run.bar(total=per_epoch, initial=pos["batch"], desc=f"KD {epoch + 1}/{preset.kd_epochs}")
            for x, _ in loader:
                x = x.to(acc.device)
                if kd.augment is not None:
                    x = kd.augment(x)
                with acc.autocast():
                    loss, metrics = kd_step(model, teacher, x, criterion)
                optimizer.zero_grad(set_to_none=True)
                acc.backward(loss)
                optimizer.step()
                scheduler.step()
                run.step += 1
                pos["batch"] += 1
                pos["count"] += 1
                for k, v in metrics.items():
                    pos["sums"][k] = pos["sums"].get(k, 0.0) + float(v)
                bar.update(1)
                if not math.isfinite(float(metrics["kd_loss"])):
                    raise FloatingPointError(f"KD: non-finite loss {float(metrics['kd_loss'])} at step {run.step}")
                if pos["batch"] >= per_epoch:
                    break  # before the next fetch: its augmentation draws belong to no step
                run.save_and_stop_if_at_max("distill", rank_state)
            bar.close()
            count = max(pos["count"], 1)
            row = {"stage": "distill", "epoch": epoch + 1, "step": run.step, "lr": lr}
            for k, v in pos["sums"].items():
                row[k] = float(acc.reduce(torch.tensor(v / count, device=acc.device), "mean"))
            weights = {k: v.detach().cpu().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
            if kd.evaluate is not None:
                row.update(on_main(acc, lambda: kd.evaluate(_plain_student(kd, weights))))
            pos = {"epoch": epoch + 1, "batch": 0, "sums": {}, "count": 0}
            run.log.add(row)
            if pos["epoch"] == preset.kd_epochs:
                run.products["distill"] = {"student": weights, "row": row}
            run.save("distill", rank_state())
            run.save_and_stop_if_at_max("distill", rank_state)
    finally:
        acc.unwrap_model(model, keep_fp32_wrapper=False)
        acc.free_memory()
    return run.products["distill"]


def _plain_student(kd: KDData, weights: Dict[str, torch.Tensor]) -> nn.Module:
    """A fresh fp32 student holding ``weights``: what a user loads from the export, so the evaluation is the
    export's (the prepared model may autocast)."""
    with torch.random.fork_rng(devices=[]):
        student = kd.build_student()
    student.load_state_dict(weights)
    return student.eval()


def classifier_accuracy(loader, name: str, device="cpu") -> Callable[[nn.Module], Dict[str, float]]:
    """Top-1 (%) of a classifier on ``loader``'s (image, label) batches."""
    def evaluate(model: nn.Module) -> Dict[str, float]:
        correct, total = top1(model.to(device), loader, device)
        return {name: 100.0 * correct / max(total, 1)}
    return evaluate


# ------------------------------------------------------------------------------------------------ a run

def export_tokens(tokens, out: Path) -> Path:
    return tokens.save_pretrained(Path(out) / "export" / "class_tokens")


def export_student(weights: Dict[str, torch.Tensor], out: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(out) / "export" / "student.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return path


def fresh_start(out: Path, stages: Sequence[str]) -> None:
    """A run without --resume starts its stages over: what they wrote in ``out`` before (the set, checkpoints,
    exports) would otherwise be taken as this run's. Products of stages it does not run (the set of an earlier
    run that a ``--stages distill`` run distils on) and generated assets (smoke_assets/) are kept."""
    import shutil

    out = Path(out)
    doomed = [out / "checkpoints"]
    if "tokens" in stages:
        doomed.append(out / "export" / "class_tokens")
    if "synthesize" in stages:
        doomed += [out / "images", out / "grids"]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    if "distill" in stages:
        (out / "export" / "student.safetensors").unlink(missing_ok=True)


def run_ddis(rc: RunConfig, accelerator) -> Dict:
    """The SD presets (imagenet_r34_r18, pacs, smoke): tokens -> synthesize -> distill, then the exports and
    results.json."""
    from ddg_models import ClassAlignmentTokens, build_classifier, load_classifier

    from .models import build_sampler, load_stable_diffusion, preprocess_of

    preset, out, device = rc.preset, Path(rc.out), accelerator.device
    names = data.read_class_names(preset, rc.class_names_file)
    if not rc.teacher_ckpt:
        raise FileNotFoundError(f"preset {preset.name} needs --teacher-ckpt (a local {preset.teacher} checkpoint)")
    teacher = load_classifier(preset.teacher, rc.teacher_ckpt, preset.num_classes).to(device).eval()
    teacher.requires_grad_(False)
    if not rc.resume:
        on_main(accelerator, lambda: fresh_start(out, rc.stages))
    run = Run.start(rc, accelerator, f"DDIS {preset.name}")
    start = time.perf_counter()
    tokens = None
    if "tokens" in rc.stages or "synthesize" in rc.stages:
        parts = load_stable_diffusion(rc.pretrained_model, preset.scheduler, rc.mixed_precision)
        for name in ("unet", "vae", "text_encoder"):
            parts[name].to(device)
        sampler = build_sampler(preset, parts, teacher, parts["scheduler"], rc.attention_backend)
        with torch.no_grad():
            uncond = sampler.prompt_encoder([""])
        tokens = ClassAlignmentTokens(parts["tokenizer"], parts["text_encoder"], names)
        ctx = TokenContext(sampler, tokens, teacher, preprocess_of(preset.ce_preprocess, preset.classifier_size),
                           uncond)
        if "tokens" in rc.stages:
            run_tokens(run, ctx)
        else:
            saved = out / "export" / "class_tokens"
            if not saved.is_dir():
                raise SystemExit(f"--stages without tokens: the class tokens of an earlier run are read from {saved}, "
                                 f"which does not exist (run the tokens stage first)")
            tokens.load_embeddings(saved)
        if "synthesize" in rc.stages:
            run_synthesis(run, ctx, [tokens.prompt(c) for c in range(len(names))], names, out / "images")
    test = None
    if rc.test_root:
        test = DataLoader(data.image_folder(Path(rc.test_root), preset.classifier_size, train=False), batch_size=64)
    results: Dict[str, object] = {"preset": preset.name, "teacher": preset.teacher, "student": preset.student}
    metrics: Dict[str, float] = {}
    if "distill" in rc.stages:
        accelerator.wait_for_everyone()
        data.check_complete(out / "images", names, preset.images_per_class)
        kd = KDData(train=data.image_folder(out / "images", preset.classifier_size, train=True),
                    build_student=lambda: build_classifier(preset.student, preset.num_classes),
                    evaluate=classifier_accuracy(test, "student_test_acc") if test is not None else None)
        product = run_distill(run, teacher, kd)
        metrics.update({k: v for k, v in product["row"].items() if k in ("kd_loss", "agreement", "student_test_acc")})
        on_main(accelerator, lambda: export_student(product["student"], out))
    if test is not None:
        metrics.update(on_main(accelerator, lambda: classifier_accuracy(test, "teacher_test_acc", device)(teacher)))
    if "tokens" in run.products:
        cat_rows = run.products["tokens"]["rows"]
        metrics["cat_best_loss_mean"] = sum(r["best_loss"] for r in cat_rows) / len(cat_rows)
        metrics["cat_accuracy_mean"] = sum(r["accuracy"] for r in cat_rows) / len(cat_rows)
    if tokens is not None and "tokens" in rc.stages:
        on_main(accelerator, lambda: export_tokens(tokens, out))
    run.finished()
    results.update(metrics=metrics, steps=run.step, wall_s=time.perf_counter() - start,
                   synthesis=run.products.get("synthesize"))
    write_results(out, results, accelerator.is_main_process)
    return results
