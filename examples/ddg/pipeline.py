"""DDG's runs, stages, data, evaluation, logging and checkpoints.

A run of ``train.py`` is every (trial seed, held-out environment, method) combination, one after another; each
combination is one DomainBed training run of ``method.stages``: ERM one stage, align / DDG Stage I then Stage II.
Each stage is a stage of examples/common/checkpoint.py (named ``<combination>-<stage>``): a checkpoint is written
at every evaluation (every ``checkpoint_freq`` steps of the combination), at the end of every stage and at
``--max-steps`` (optimizer steps counted over all stages of all combinations), where the run stops. A stage's
optimizer state lives only in that stage's checkpoints; the next stage starts from the finished stage's product
(student weights, SWAD state, model selection so far) with a fresh optimizer over its own parameters.

Randomness: the student is built from a seed every rank shares; each stage then draws from the rank's own
streams (examples/common/seeding.py): the global generators (DomainBed augmentation) and a generator the stage
owns for the diffusion timesteps, noise and patch-token choices. Minibatch indices are seeded per (trial seed,
domain, step) on the rank's stream, so a resumed stage draws the batches the uninterrupted one draws.

Evaluation (training-domain validation, whose loss closes SWAD's segments, the test domain's accuracy), SWAD, the logs,
``results.json`` and the exported students happen on the main process only (examples/common/main_process.py);
the other processes receive the evaluation's numbers.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddg_models import SWAD

from ..common import checkpoint
from ..common.domainbed import seed_hash, source_environments
from ..common.main_process import on_main
from ..common.runlog import RunLog, write_results
from ..common.seeding import rank_generator, seed_rank_stream, seed_shared
from ..common.staged_run import StagedRun as Run, StopRun
from . import domainbed_output, report
from .data import Environments, SourceBatches, eval_loader, load_environments, per_process_batch
from .export import export_student
from .method import DDGLoss, build_backbone_for, build_module, stages, trainable
from .presets import Preset
from .teachers import Teachers, load_teachers, teacher_samples
from .tiny import teacher_sources, train_tiny_teachers

COLUMNS = ["run", "stage", "step", "run_step", "loss", "ce", "align", "diff", "train_out_acc", "train_out_loss",
           "test_in_acc", "time_s"]
PANELS = {"training loss": ("loss", "ce", "align", "diff"), "accuracy (%)": ("train_out_acc", "test_in_acc")}
RESULT_COLUMNS = ("selected_acc", "swad_acc", "last_acc")


@dataclass
class RunConfig:
    preset: Preset
    out: Path
    methods: Tuple[str, ...]
    seeds: Tuple[int, ...]
    test_envs: Optional[Tuple[int, ...]] = None      # None: the preset's, else every environment
    data_root: Optional[str] = None
    clip_model: Optional[str] = None                 # the CLIP teacher's folder
    pretrained_model: Optional[str] = None           # the Stable Diffusion folder
    student_model: Optional[str] = None              # the CLIP folder of a clip_vit student (default: clip_model)
    backbone_weights: Optional[str] = None
    teachers_per_run: bool = False                   # tiny: train the teachers on each run's own sources
    resume: bool = False
    max_steps: Optional[int] = None
    quiet: bool = False
    attention_backend: str = "sdpa"                  # of the SD teacher's UNet
    mixed_precision: str = "no"
    smoke_assets: Optional[str] = None               # smoke preset: where its fixtures are (default <out>/smoke_assets)
    keep_checkpoints: int = 2

    @property
    def sd_dtype(self) -> Optional[torch.dtype]:
        """The frozen SD teacher's weights: the mixed-precision dtype (as the authors' bf16/fp16 runs load it)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)

    def settings(self) -> Dict:
        """What changes the results (the checkpoint fingerprint): not out, resume, max_steps, quiet."""
        return {"preset": self.preset.to_dict(), "methods": list(self.methods), "seeds": list(self.seeds),
                "test_envs": None if self.test_envs is None else list(self.test_envs),
                "data_root": self.data_root, "clip_model": self.clip_model, "pretrained_model": self.pretrained_model,
                "student_model": self.student_model, "backbone_weights": self.backbone_weights,
                "teachers_per_run": self.teachers_per_run, "mixed_precision": self.mixed_precision}


def start_run(rc: RunConfig, accelerator) -> Run:
    return Run.start(rc, accelerator, RunLog(rc.out, accelerator.is_main_process, COLUMNS, x="step", panels=PANELS,
                                             title=f"DDG {rc.preset.name}"))


@dataclass
class Combination:
    """One DomainBed run: a method trained on every environment but ``test_env``, for one trial seed."""
    method: str
    test_env: int
    seed: int
    envs: Environments

    @property
    def sources(self) -> List[int]:
        return source_environments(len(self.envs.names), [self.test_env])

    @property
    def test_name(self) -> str:
        return self.envs.names[self.test_env]

    @property
    def key(self) -> str:
        return f"{self.test_name.replace(' ', '_')}_seed{self.seed}_{self.method}"


@dataclass
class Selection:
    """The state of a combination that crosses its stages: the step within the combination, the
    training-domain-validation choice (its weights on the main process), the last evaluation, SWAD (main)."""
    step: int = 0
    best: Dict = field(default_factory=dict)
    best_state: Optional[Dict[str, torch.Tensor]] = None
    last: Dict = field(default_factory=dict)
    swad: Optional[SWAD] = None

    def position(self) -> Dict:
        return {"step": self.step, "best": dict(self.best), "best_state": self.best_state, "last": dict(self.last),
                "swad": None if self.swad is None else self.swad.state_dict()}

    def restore(self, position: Dict) -> None:
        self.step, self.best, self.last = position["step"], dict(position["best"]), dict(position["last"])
        self.best_state = position["best_state"]
        if self.swad is not None and position["swad"] is not None:
            self.swad.load_state_dict(position["swad"])


@dataclass
class Paths:
    data_root: Optional[str]
    clip_model: Optional[str]
    pretrained_model: Optional[str]
    student_model: Optional[str]


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(student: nn.Module, loaders: Dict[str, object], device) -> Dict[str, float]:
    """Accuracy (%) and mean CE of ``student`` on each named loader (fp32, eval mode)."""
    was_training = student.training
    student.eval()
    out = {}
    for name, loader in loaders.items():
        correct = total = 0
        loss = 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = student(x)
            loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
        out[f"{name}_acc"] = 100.0 * correct / max(total, 1)
        out[f"{name}_loss"] = loss / max(total, 1)
    student.train(was_training)
    return out


@torch.no_grad()
def zero_shot_accuracy(teachers: Teachers, data, batch: int, device) -> float:
    correct = total = 0
    for x, y in eval_loader(data, batch, 0):
        v = teachers.image_embeddings(x.to(device))
        correct += ((v @ teachers.class_text.t()).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1)


class Evaluator:
    """The loaders of a combination's evaluations (main process): the sources' holdouts (training-domain
    validation), the test domain's 'in' split (the reported accuracy) and its 'out' split (DomainBed's oracle)."""

    def __init__(self, combo: Combination, p: Preset, device):
        names, splits = combo.envs.names, combo.envs.splits
        self.val = {f"{names[i]}_out": eval_loader(splits[i].eval_out, p.test_batch, p.num_workers)
                    for i in combo.sources}
        self.test = eval_loader(splits[combo.test_env].eval_in, p.test_batch, p.num_workers)
        self.test_out = eval_loader(splits[combo.test_env].eval_out, p.test_batch, p.num_workers)  # the oracle's
        self.combo, self.device = combo, device

    def __call__(self, student: nn.Module) -> Dict[str, float]:
        """Training-domain validation (accuracy and CE, means over the sources' 'out' splits: DomainBed's and
        SWAD's ``tr_outloss``), each source's accuracy and the test domain's 'in' and 'out' accuracies."""
        metrics = evaluate(student, {**self.val, "test_in": self.test, "test_out": self.test_out}, self.device)
        names = [f"{self.combo.envs.names[i]}_out" for i in self.combo.sources]
        return {"train_out_acc": sum(metrics[f"{n}_acc"] for n in names) / len(names),
                "train_out_loss": sum(metrics[f"{n}_loss"] for n in names) / len(names),
                "test_in_acc": metrics["test_in_acc"], "test_out_acc": metrics["test_out_acc"],
                **{f"{n}_acc": metrics[f"{n}_acc"] for n in names}}  # per source: DomainBed's records

    def test_accuracy(self, student: nn.Module) -> float:
        return evaluate(student, {"test": self.test}, self.device)["test_acc"]


# ------------------------------------------------------------------------------------------------ teachers

class TeacherStore:
    """Teachers by the training domains they may see (tiny: trained on the main process) or loaded once."""

    def __init__(self, rc: RunConfig, accelerator, paths: Paths):
        self.rc, self.acc, self.paths, self.cache, self.losses = rc, accelerator, paths, {}, {}

    def get(self, envs: Environments, sources: Sequence[int], seed: int) -> Teachers:
        p, rc = self.rc.preset, self.rc
        if p.dataset != "RotatedDigits":
            if "all" not in self.cache:
                self.cache["all"] = load_teachers(p, envs, self.paths.clip_model, self.paths.pretrained_model,
                                                  self.acc.device, rc.attention_backend, rc.sd_dtype)
            return self.cache["all"]
        # Teachers differ by trial seed (its holdout), training domains and training steps.
        key = (f"seed{seed}_" + "-".join(envs.names[i] for i in sources) + "_steps"
               + "-".join(map(str, p.teacher_steps)))
        if key not in self.cache:
            directory = rc.out / "teachers" / key

            def train():
                self.acc.print(f"training the tiny CLIP and SD teachers on {', '.join(envs.names[i] for i in sources)}")
                start = time.perf_counter()
                losses = train_tiny_teachers(p, envs, sources, directory, seed, quiet=rc.quiet)
                return {**losses, "seconds": time.perf_counter() - start}

            self.losses[key] = on_main(self.acc, train)
            teachers = load_teachers(p, envs, directory / "clip", directory / "sd", self.acc.device,
                                     rc.attention_backend, rc.sd_dtype)
            if self.acc.is_main_process and not (directory / "samples.png").is_file():
                prompts = [f"a {envs.names[d]} photo of a {c}" for d in sources for c in envs.class_names]
                report.save_grid(directory / "samples.png", teacher_samples(teachers, prompts).cpu(),
                                 nrow=len(envs.class_names))
            self.cache[key] = teachers
        return self.cache[key]


def resolve_paths(rc: RunConfig, accelerator) -> Paths:
    """The folders of the run: the flags, and for the smoke preset its generated fixtures where a flag is unset."""
    paths = Paths(rc.data_root, rc.clip_model, rc.pretrained_model, rc.student_model)
    if rc.preset.name == "smoke":
        from .smoke import build_smoke_assets

        root = Path(rc.smoke_assets) if rc.smoke_assets else Path(rc.out) / "smoke_assets"
        assets = on_main(accelerator, lambda: build_smoke_assets(root))
        paths = Paths(*(getattr(paths, k) or str(assets[k]) for k in ("data_root", "clip_model",
                                                                        "pretrained_model", "student_model")))
    return paths


# ------------------------------------------------------------------------------------------------ training

def run_all(rc: RunConfig, accelerator) -> Dict:
    p = rc.preset
    per_process_batch(p.batch_per_domain, accelerator.num_processes)  # refused before anything is loaded
    if p.diffusion_batch > 0 and "ddg" in rc.methods:
        per_process_batch(p.diffusion_batch, accelerator.num_processes, "--diffusion-batch")
    Path(rc.out).mkdir(parents=True, exist_ok=True)
    paths = resolve_paths(rc, accelerator)
    run = start_run(rc, accelerator)
    store = TeacherStore(rc, accelerator, paths)
    results: List[Dict] = []
    start = time.perf_counter()
    test_names: List[str] = []
    for seed in rc.seeds:
        envs = load_environments(p, paths.data_root, seed)
        test_envs = list(rc.test_envs or p.test_envs or range(len(envs.names)))
        bad = [t for t in test_envs if not 0 <= t < len(envs.names)]
        if bad:
            raise SystemExit(f"--test-envs {bad}: {p.dataset} has environments 0..{len(envs.names) - 1} "
                             f"({', '.join(envs.names)})")
        if seed == rc.seeds[0] and p.dataset == "RotatedDigits" and accelerator.is_main_process:
            report.save_grid(rc.out / "domains.png", torch.cat([s.eval_in.x[:10] * 0.5 + 0.5 for s in envs.splits]),
                             nrow=10)
        for te in test_envs:
            name = envs.names[te]
            if name not in test_names:
                test_names.append(name)
            teachers = store.get(envs, teacher_sources(rc.teachers_per_run, len(envs.names), test_envs, te), seed)
            zero_shot = on_main(accelerator, lambda: zero_shot_accuracy(teachers, envs.splits[te].eval_in,
                                                                        p.test_batch, accelerator.device))
            results.append({"method": "zeroshot", "test_env": name, "trial_seed": seed, "acc": zero_shot})
            for method in rc.methods:
                combo = Combination(method, te, seed, envs)
                res = train_combination(run, combo, teachers, paths)
                accelerator.print(f"  {method:5s} test={name} seed={seed}: selected {res['selected_acc']:.2f} "
                                  f"SWAD {res.get('swad_acc', float('nan')):.2f} last {res['last_acc']:.2f}")
                results.append(res)
    run.finished()
    table = report.results_table(results, test_names, ("zeroshot",) + tuple(rc.methods))
    summary = {"preset": p.name, "metrics": final_metrics(results), "results": results, "table": table["rows"],
               "header": table["header"], "teacher_losses": store.losses, "processes": accelerator.num_processes,
               "mixed_precision": rc.mixed_precision, "sd_dtype": str(rc.sd_dtype or torch.float32),
               "wall_s": time.perf_counter() - start}
    write_results(rc.out, summary, accelerator.is_main_process)
    if accelerator.is_main_process:
        (rc.out / "results.md").write_text(table["markdown"])
        db_rows = [("CLIP zero-shot", "zeroshot", "acc")]
        for m in rc.methods:
            db_rows.append((domainbed_output.ALGORITHMS[m], m, "selected_acc"))
            if any(r.get("swad_acc") is not None for r in results if r["method"] == m):
                db_rows.append((domainbed_output.ALGORITHMS[m] + " + SWAD", m, "swad_acc"))
        (rc.out / "results_domainbed.md").write_text(
            domainbed_output.domainbed_table(results, test_names, db_rows)["markdown"])
        report.plot_results(rc.out / "results.png", table)
        accelerator.print(table["markdown"])
    return summary


def final_metrics(results: Sequence[Dict]) -> Dict[str, float]:
    """The flat {name: accuracy} of results.json: '<test env>_seed<s>_<method>/<selected|swad|last>_acc' and
    '<test env>_seed<s>_zeroshot/acc'."""
    metrics = {}
    for r in results:
        prefix = f"{r['test_env'].replace(' ', '_')}_seed{r['trial_seed']}_{r['method']}"
        for col in (("acc",) if r["method"] == "zeroshot" else RESULT_COLUMNS):
            if r.get(col) is not None:
                metrics[f"{prefix}/{col}"] = float(r[col])
    return metrics


def train_combination(run: Run, combo: Combination, teachers: Teachers, paths: Paths) -> Dict:
    """Train ``combo``'s stages (what a resume left of them), then select, average and export (main process)."""
    acc, rc, p = run.accelerator, run.rc, run.rc.preset
    if combo.key in run.products:  # finished before the checkpoint this run resumed from
        return run.products[combo.key]["result"]
    per_process = per_process_batch(p.batch_per_domain, acc.num_processes)
    diffusion_images = 0 if p.diffusion_batch <= 0 else per_process_batch(p.diffusion_batch, acc.num_processes,
                                                                          "--diffusion-batch")
    seed_shared(seed_hash(combo.seed, "init"))  # every method of a trial seed starts from the same student
    backbone = build_backbone_for(p, paths.student_model or teachers.clip_dir, rc.backbone_weights)
    module = build_module(p, backbone, teachers.class_text, teachers.logit_scale, teachers.sd_class_prompts,
                          teachers.sd.context_shape, combo.method).to(acc.device)
    loss_fn = DDGLoss(p, combo.method, teachers, len(combo.sources), diffusion_images)
    selection = Selection()
    evaluator = None
    if acc.is_main_process:
        selection.swad = SWAD(module.student, p.n_converge, p.n_tolerance, p.tolerance_ratio)
        evaluator = Evaluator(combo, p, acc.device)
    keys, plan = [], stages(combo.method, p)
    for name, number, first, end in plan:
        key = f"{combo.key}-{name}"
        keys.append(key)
        if key in run.products:  # finished: its product is where the next stage starts
            run.skip(key)
            module.load_state_dict(run.products[key]["module"])
            selection.restore(run.products[key]["selection"])
            continue
        if number == 2 and (run.resume_from is None or run.resume_from.stage != key):
            start_from_selected(acc, module, selection)
        run_stage(run, combo, key, name, number, first, end, module, selection, loss_fn, evaluator, per_process)

    def finish() -> Dict:
        res = {"method": combo.method, "test_env": combo.test_name, "trial_seed": combo.seed,
               "steps": selection.step, "last_acc": selection.last.get("test_in_acc"),
               "selected_acc": selection.best.get("test_in_acc"), "selected_step": selection.best.get("step")}
        if selection.swad.history:
            res["swad_acc"] = evaluator.test_accuracy(selection.swad.final_model().to(acc.device))
            res["swad_converged"] = selection.swad.converged
            res["swad_segments"] = [h for h in selection.swad.final_history() if h["used"]]
        # The final stage's evaluations: DomainBed's selection over them is the run's (within Stage II, VL2V).
        rows = [r for r in run.log.rows if r.get("run") == combo.key and r.get("stage") == plan[-1][0]]
        domainbed_output.write_run(Path(rc.out) / "domainbed" / combo.key, domainbed_output.run_records(
            rows, dataset=p.dataset, method=combo.method, test_env=combo.test_env, env_names=combo.envs.names,
            sources=combo.sources, trial_seed=combo.seed, hparams=p.to_dict()))
        selected = copy.deepcopy(module.student)
        selected.load_state_dict(selection.best_state)
        export_student(Path(rc.out) / "export" / combo.key, selected, p.backbone, combo.envs.class_names,
                       {"image_size": p.image_size, "mean": list(p.mean), "std": list(p.std)})
        return res

    result = on_main(acc, finish)
    for key in keys:  # the stages' weights are not needed once the combination is done
        run.products.pop(key, None)
    run.products[combo.key] = {"result": result}
    return result


def start_from_selected(accelerator, module: nn.Module, selection: Selection) -> None:
    """Stage II starts from Stage I's training-domain-validation choice and selects within Stage II (VL2V's
    protocol: a 'selected' DDG result is always a Stage-II model). The choice's weights live on the main process;
    every process loads them."""
    state = on_main(accelerator, lambda: selection.best_state)
    if state is not None:
        module.student.load_state_dict(state)
    selection.best, selection.best_state = {}, None


def run_stage(run: Run, combo: Combination, key: str, name: str, number: int, first: int, end: int, module: nn.Module,
              selection: Selection, loss_fn: DDGLoss, evaluator: Optional[Evaluator], per_process: int) -> None:
    """Train stage ``key`` of ``combo``, the combination's steps ``first`` to ``end`` (from where a resume left
    it)."""
    acc, rc, p = run.accelerator, run.rc, run.rc.preset
    run.stop_if_at_max()
    optimizer = torch.optim.Adam(trainable(module, combo.method, number, p), lr=p.lr, weight_decay=p.weight_decay)
    model, optimizer = acc.prepare(module, optimizer)
    stage_seed = seed_hash(combo.seed, combo.test_env, combo.method, name)
    generator = rank_generator(stage_seed, acc.process_index, acc.device)  # diffusion timesteps, noise, patches
    ckpt = run.resume_point(key)
    if ckpt is not None:
        selection.restore(ckpt.state["position"])
    # Built before the RNGs are set: a loader's iterator draws its base seed from the global generator.
    batches = SourceBatches(combo.envs, combo.sources, per_process, combo.seed, selection.step, acc.process_index,
                            p.num_workers)
    sums = {"sums": {}, "count": 0}
    if ckpt is not None:
        sums = checkpoint.load(ckpt, acc, key, {"noise": generator})["sums"]
        run.resume_from = None
    else:
        seed_rank_stream(stage_seed, acc.process_index)
    bar = tqdm(total=end - first, initial=selection.step - first, desc=f"{combo.key} {name}", leave=False,
               disable=rc.quiet or not acc.is_local_main_process)

    def save():
        checkpoint.save(run.ckpt_root, acc, stage=key, step=run.step, settings=rc.settings(),
                        state={"rows": run.log.rows, "products": run.products,
                               # a finished stage resumes from its product, which holds the same position
                               "position": None if key in run.products else selection.position()},
                        generators={"noise": generator}, rank_state={"sums": sums}, keep=rc.keep_checkpoints)

    try:
        model.train()
        start = time.perf_counter()
        while selection.step < end:
            x, y, d = (t.to(acc.device) for t in next(batches))
            with acc.autocast():
                terms = loss_fn(model, x, y, d, number, generator)
            optimizer.zero_grad(set_to_none=True)
            acc.backward(terms["loss"])
            optimizer.step()
            selection.step += 1
            run.step += 1
            for k, v in terms.items():
                sums["sums"][k] = sums["sums"].get(k, 0.0) + float(v.detach())
            sums["count"] += 1
            if selection.swad is not None and selection.step > p.swad_start:
                selection.swad.update(module.student, selection.step)
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}")
            at_eval = selection.step % p.checkpoint_freq == 0 or selection.step == end
            if at_eval:
                log_evaluation(run, combo, name, module, selection, evaluator, sums, time.perf_counter() - start)
                sums, start = {"sums": {}, "count": 0}, time.perf_counter()
            if selection.step == end:
                run.products[key] = {"module": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                                     "selection": copy.deepcopy(selection.position())}  # SWAD goes on
            stop = rc.max_steps is not None and run.step >= rc.max_steps
            if at_eval or stop:
                save()
            if stop:
                run.log.close()
                raise StopRun
    finally:
        bar.close()
        # the module leaves its stage plain (no DDP, no autocast wrapper): the next stage prepares it afresh,
        # as a resumed run does
        acc.unwrap_model(model, keep_fp32_wrapper=False)
        acc.free_memory()


def log_evaluation(run: Run, combo: Combination, stage: str, module: nn.Module, selection: Selection,
                   evaluator: Optional[Evaluator], sums: Dict, seconds: float) -> None:
    """One log row: the period's training losses (mean over steps and processes), the main process'
    evaluation (and SWAD's segment), the selection update."""
    acc, p = run.accelerator, run.rc.preset
    count = max(sums["count"], 1)
    row = {"run": combo.key, "stage": stage, "step": run.step, "run_step": selection.step}
    for k in sorted(sums["sums"]):
        row[k] = float(acc.reduce(torch.tensor(sums["sums"][k] / count, device=acc.device), "mean"))

    def main_evaluation() -> Dict[str, float]:
        metrics = evaluator(module.student)
        if selection.step > p.swad_start and selection.swad.segment_start is not None:
            # The segment closes with the current weights' validation loss, as khanrc/swad's trainer feeds it
            # (docs/methods/ddg.md §2.4), not the loss of the segment's average.
            selection.swad.evaluate(metrics["train_out_loss"], selection.step)
        return metrics

    row.update(on_main(acc, main_evaluation))
    row["time_s"] = seconds
    selection.last = {"step": selection.step, "test_in_acc": row["test_in_acc"]}
    if not selection.best or row["train_out_acc"] > selection.best["train_out_acc"]:
        selection.best = {"step": selection.step, "train_out_acc": row["train_out_acc"],
                          "test_in_acc": row["test_in_acc"]}
        if acc.is_main_process:
            selection.best_state = {k: v.detach().cpu().clone() for k, v in module.student.state_dict().items()}
    run.log.add(row)
