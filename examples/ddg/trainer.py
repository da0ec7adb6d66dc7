"""One DomainBed run: a method ('erm', 'align' = VL2V's two-stage alignment, 'ddg'), one held-out environment,
one trial seed. Steps with one minibatch per source domain, the Stage I -> II switch, SWAD, evaluation every
``checkpoint_freq`` steps (training-domain validation selection), checkpoints and exact resume.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddg_losses import GuidedDenoisingLoss, ImageTextAlignmentLoss
from ddg_models import (SWAD, CLIPVisionBackbone, DDGStudent, PatchTokenAdapter, ProbabilityWeightedPromptAdapter,
                        StudentConditioning, ZeroShotHead, build_backbone, images_to_sd)

from ..common.domainbed import seed_hash
from ..common.rng import atomic_save, rng_state, set_rng_state
from ..common.tables import write_json
from . import report
from .data import Environments, SourceBatches, eval_loader
from .presets import Preset
from .teachers import Teachers

METHODS = ("erm", "align", "ddg")


class DDGModule(nn.Module):
    """What the optimizer and DDP see: the student and the conditioning adapter (trainable in mode B)."""

    def __init__(self, student: DDGStudent, conditioning: Optional[StudentConditioning]):
        super().__init__()
        self.student = student
        self.conditioning = conditioning

    def forward(self, x: torch.Tensor, context_index: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None):
        logits, z, tokens = self.student.encode(x)
        context = None
        if context_index is not None:
            context = self.conditioning(logits[context_index], tokens[context_index], generator)
        return logits, z, context


def build_module(p: Preset, teachers: Teachers, backbone_weights: Optional[str], method: str) -> DDGModule:
    """A fresh student (CLIP-initialised for clip_vit) with its zero-shot head, and the conditioning adapter."""
    if p.backbone == "clip_vit":
        backbone = CLIPVisionBackbone.from_pretrained(teachers.clip_dir)
    else:
        backbone = build_backbone(p.backbone, backbone_weights)
    student = DDGStudent(backbone, ZeroShotHead(teachers.class_text.cpu(), teachers.logit_scale))
    conditioning = None
    if method == "ddg":
        seq_len, width = teachers.sd.context_shape
        prompts = ProbabilityWeightedPromptAdapter(teachers.sd_class_prompts.cpu())
        patches = PatchTokenAdapter(backbone.token_dim, width, num_tokens=seq_len,
                                    has_cls_token=p.backbone != "resnet50")
        conditioning = StudentConditioning(p.conditioning, prompts=prompts, patches=patches)
    return DDGModule(student, conditioning)


def stage_of(method: str, step: int, p: Preset) -> int:
    return 1 if method == "erm" or step < p.stage1_steps else 2


def trainable(module: DDGModule, method: str, stage: int, p: Preset) -> List[nn.Parameter]:
    """Set requires_grad for the stage and return the optimised parameters.

    ERM: backbone + projection. Stage I (VL2V): P only ('projection') or f and P. Stage II: f only
    ('featurizer', P frozen) or f and P, plus the patch-token adapter when conditioning uses it."""
    module.requires_grad_(False)
    s = module.student
    if method == "erm":
        groups = [s.featurizer_parameters(), s.projection_parameters()]
    elif stage == 1:
        groups = [s.projection_parameters()] + ([s.featurizer_parameters()] if p.stage1_train == "all" else [])
    else:
        groups = [s.featurizer_parameters()] + ([s.projection_parameters()] if p.stage2_train == "all" else [])
        if module.conditioning is not None and module.conditioning.patches is not None:
            groups.append(module.conditioning.patches.parameters())
    params = [q for g in groups for q in g]
    for q in params:
        q.requires_grad_(True)
    return params


@torch.no_grad()
def evaluate(student: nn.Module, loaders: Dict[str, object], device) -> Dict[str, float]:
    """Accuracy (%) and mean CE of ``student`` on each named loader."""
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


@dataclass
class RunSpec:
    method: str
    test_env: int
    trial_seed: int
    sources: Sequence[int]
    directory: Path


class Run:
    """Train one method for one held-out environment and seed; ``result()`` is its results dict."""

    def __init__(self, p: Preset, spec: RunSpec, envs: Environments, teachers: Teachers, accelerator,
                 backbone_weights: Optional[str] = None, max_steps: Optional[int] = None, quiet: bool = False):
        if spec.method not in METHODS:
            raise ValueError(f"Run: method must be one of {METHODS}, got {spec.method!r}")
        self.p, self.spec, self.envs, self.teachers, self.acc = p, spec, envs, teachers, accelerator
        self.device, self.quiet = accelerator.device, quiet
        self.steps = p.steps if max_steps is None else min(p.steps, max_steps)
        torch.manual_seed(seed_hash(spec.trial_seed, "init"))
        self.module = build_module(p, teachers, backbone_weights, spec.method).to(self.device)
        self.align = ImageTextAlignmentLoss(p.lmd)
        self.diffusion = GuidedDenoisingLoss(p.guidance_scale, p.guidance_rescale, p.timesteps_per_image)
        self.swad = SWAD(self.module.student, p.n_converge, p.n_tolerance, p.tolerance_ratio)
        names = envs.names
        # Training-domain validation needs the sources' holdouts; the report needs the test domain's 'in' split.
        self.val_loaders = {f"{names[i]}_out": eval_loader(envs.splits[i].eval_out, p.test_batch, p.num_workers)
                            for i in spec.sources}
        test = names[spec.test_env]
        self.loaders = {**self.val_loaders,
                        f"{test}_in": eval_loader(envs.splits[spec.test_env].eval_in, p.test_batch, p.num_workers)}
        self.rows: List[Dict] = []
        self.best: Dict = {}
        self.step = 0

    # ----------------------------------------------------------------------------------------- checkpoint
    @property
    def _ckpt(self) -> Path:
        return self.spec.directory / "checkpoint.pt"

    def _save(self, optimizer) -> None:
        if self.acc.is_main_process:
            atomic_save({"module": self.module.state_dict(), "optimizer": optimizer.state_dict(), "step": self.step,
                         "swad": self.swad.state_dict(), "best": self.best, "rows": self.rows}, self._ckpt)
        atomic_save(rng_state(), self.spec.directory / f"rng{self.acc.process_index}.pt")
        self.acc.wait_for_everyone()

    def _resume(self) -> Optional[dict]:
        if not self._ckpt.is_file():
            return None
        ckpt = torch.load(self._ckpt, map_location="cpu", weights_only=False)
        self.module.load_state_dict(ckpt["module"])
        self.swad.load_state_dict(ckpt["swad"])
        self.best, self.rows, self.step = ckpt["best"], ckpt["rows"], ckpt["step"]
        set_rng_state(torch.load(self.spec.directory / f"rng{self.acc.process_index}.pt", weights_only=False))
        return ckpt["optimizer"]

    # ------------------------------------------------------------------------------------------ training
    def _optimizer(self, stage: int):
        params = trainable(self.module, self.spec.method, stage, self.p)
        optimizer = torch.optim.Adam(params, lr=self.p.lr, weight_decay=self.p.weight_decay)
        model, optimizer = self.acc.prepare(self.module, optimizer)
        return model, optimizer

    def _diffusion_index(self, per_domain: int, n_domains: int) -> torch.Tensor:
        m = per_domain if self.p.diffusion_batch <= 0 else min(self.p.diffusion_batch, per_domain)
        return torch.cat([torch.arange(k * per_domain, k * per_domain + m) for k in range(n_domains)]).to(self.device)

    def _losses(self, model, x, y, d, stage: int, generator) -> Dict[str, torch.Tensor]:
        p, method = self.p, self.spec.method
        with_diff = method == "ddg" and stage == 2 and p.beta > 0
        per_domain = len(y) // len(self.spec.sources)
        index = self._diffusion_index(per_domain, len(self.spec.sources)) if with_diff else None
        logits, z, context = model(x, context_index=index, generator=generator)
        terms = {"ce": F.cross_entropy(logits.float(), y)}
        if method == "erm":
            terms["loss"] = terms["ce"]
            return terms
        v = self.teachers.image_embeddings(x) if p.lmd > 0 else None
        terms["align"] = self.align(z, v, self.teachers.class_text[y])
        loss = terms["align"] + p.ce_weight * terms["ce"]
        if with_diff:
            x_sd = images_to_sd(x[index], p.mean, p.std, p.sd_resolution, self.teachers.sd.vae.config.in_channels)
            terms["diff"] = self.diffusion(self.teachers.sd, x_sd, context, self.teachers.negatives_for(d[index]),
                                           generator)
            loss = loss + p.beta * terms["diff"]
        terms["loss"] = loss
        return terms

    def _evaluate(self, sums: Dict[str, float], count: int, stage: int, t0: float) -> None:
        student = self.module.student
        metrics = evaluate(student, self.loaders, self.device)
        names, test = self.envs.names, self.envs.names[self.spec.test_env]
        row = {"step": self.step, "stage": stage, **{k: v / max(count, 1) for k, v in sums.items()}}
        row["train_out_acc"] = sum(metrics[f"{names[i]}_out_acc"] for i in self.spec.sources) / len(self.spec.sources)
        row["test_in_acc"] = metrics[f"{test}_in_acc"]
        if self.step > self.p.swad_start and self.swad.segment_start is not None:
            seg = evaluate(self.swad.segment.module, self.val_loaders, self.device)
            row["swad_val_loss"] = sum(v for k, v in seg.items() if k.endswith("_loss")) / len(self.val_loaders)
            self.swad.evaluate(row["swad_val_loss"], self.step)
        row["time_s"] = time.perf_counter() - t0
        self.rows.append(row)
        if not self.best or row["train_out_acc"] > self.best["train_out_acc"]:
            self.best = {"step": self.step, "train_out_acc": row["train_out_acc"], "test_in_acc": row["test_in_acc"]}
        if self.acc.is_main_process:
            report.write_csv(self.spec.directory / "log.csv", self.rows)

    def train(self) -> Dict:
        from tqdm.auto import tqdm

        spec, p = self.spec, self.p
        spec.directory.mkdir(parents=True, exist_ok=True)
        opt_state = self._resume()
        stage = stage_of(spec.method, self.step, p)
        model, optimizer = self._optimizer(stage)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        per_process = max(1, p.batch_per_domain // self.acc.num_processes)
        batches = SourceBatches(self.envs, spec.sources, per_process, spec.trial_seed, self.step,
                                self.acc.process_index, p.num_workers)
        sums: Dict[str, float] = {}
        count, t0 = 0, time.perf_counter()
        bar = tqdm(total=self.steps, initial=self.step, disable=self.quiet or not self.acc.is_local_main_process,
                   desc=f"{spec.method} test={self.envs.names[spec.test_env]} seed={spec.trial_seed}", leave=False)
        model.train()
        while self.step < self.steps:
            if stage_of(spec.method, self.step, p) != stage:  # Stage I -> II: new trainable set and optimizer
                stage = 2
                model, optimizer = self._optimizer(stage)
            x, y, d = (t.to(self.device) for t in next(batches))
            generator = torch.Generator(self.device).manual_seed(
                seed_hash(spec.trial_seed, "noise", self.acc.process_index, self.step))
            terms = self._losses(model, x, y, d, stage, generator)
            optimizer.zero_grad(set_to_none=True)
            self.acc.backward(terms["loss"])
            optimizer.step()
            self.step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            count += 1
            if self.step > p.swad_start:
                self.swad.update(self.module.student, self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
            if self.step % p.checkpoint_freq == 0 or self.step == self.steps:
                self._evaluate(sums, count, stage, t0)
                sums, count = {}, 0
                self._save(optimizer)
        bar.close()
        return self.result()

    def result(self) -> Dict:
        test = self.envs.names[self.spec.test_env]
        loaders = {"test": self.loaders[f"{test}_in"]}
        res = {"method": self.spec.method, "test_env": test, "trial_seed": self.spec.trial_seed,
               "steps": self.step, "last_acc": self.rows[-1]["test_in_acc"] if self.rows else None,
               "selected_acc": self.best.get("test_in_acc"), "selected_step": self.best.get("step")}
        if self.swad.history:
            swad_model = self.swad.final_model().to(self.device)
            res["swad_acc"] = evaluate(swad_model, loaders, self.device)["test_acc"]
            res["swad_converged"] = self.swad.converged
            res["swad_segments"] = [h for h in self.swad.history if h["used"]]
        if self.acc.is_main_process:
            write_json(self.spec.directory / "result.json", res)
        return res
