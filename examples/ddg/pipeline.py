"""All runs of ``train.py``: trial seeds x held-out environments x methods, then the results table.

Teachers are loaded once (DomainBed presets) or trained per set of training domains (tiny preset), the CLIP
zero-shot accuracy is recorded as a reference, finished runs are read back from their result.json.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..common.domainbed import source_environments
from ..common.tables import write_json
from . import report
from .data import Environments, eval_loader, load_environments
from .presets import Preset
from .teachers import Teachers, load_teachers, teacher_samples, train_tiny_teachers
from .trainer import Run, RunSpec


@dataclass
class RunConfig:
    preset: Preset
    out: Path
    methods: Tuple[str, ...]
    trial_seeds: Tuple[int, ...]
    test_envs: Optional[Tuple[int, ...]] = None      # None: every environment
    data_dir: Optional[str] = None
    clip_dir: Optional[str] = None
    sd_dir: Optional[str] = None
    backbone_weights: Optional[str] = None
    teachers_per_run: bool = False                   # tiny: train the teachers on each run's own sources
    resume: bool = False
    max_steps: Optional[int] = None
    quiet: bool = False
    attention_backend: str = "sdpa"                  # of the SD teacher's UNet


@torch.no_grad()
def zero_shot_accuracy(teachers: Teachers, data, batch: int, device) -> float:
    correct = total = 0
    for x, y in eval_loader(data, batch, 0):
        v = teachers.image_embeddings(x.to(device))
        correct += ((v @ teachers.class_text.t()).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1)


class TeacherStore:
    """Teachers by the training domains they may see (tiny) or loaded once (DomainBed)."""

    def __init__(self, rc: RunConfig, accelerator):
        self.rc, self.acc, self.cache, self.losses = rc, accelerator, {}, {}

    def get(self, envs: Environments, sources: Sequence[int], seed: int) -> Teachers:
        p, rc = self.rc.preset, self.rc
        if p.dataset != "RotatedDigits":
            if "all" not in self.cache:
                self.cache["all"] = load_teachers(p, envs, rc.clip_dir, rc.sd_dir, self.acc.device,
                                                  rc.attention_backend)
            return self.cache["all"]
        # Teachers differ by trial seed (its holdout), training domains and training steps.
        key = (f"seed{seed}_" + "-".join(envs.names[i] for i in sources) + "_steps"
               + "-".join(map(str, p.teacher_steps)))
        if key not in self.cache:
            directory = rc.out / "teachers" / key
            if self.acc.is_main_process:
                self.acc.print(f"training the tiny CLIP and SD teachers on {', '.join(envs.names[i] for i in sources)}")
                start = time.perf_counter()
                self.losses[key] = train_tiny_teachers(p, envs, sources, directory, seed, quiet=rc.quiet)
                self.losses[key]["seconds"] = time.perf_counter() - start
            self.acc.wait_for_everyone()
            teachers = load_teachers(p, envs, directory / "clip", directory / "sd", self.acc.device,
                                     rc.attention_backend)
            if self.acc.is_main_process and not (directory / "samples.png").is_file():
                prompts = [f"a {envs.names[d]} photo of a {c}" for d in sources for c in envs.class_names]
                report.save_grid(directory / "samples.png", teacher_samples(teachers, prompts).cpu(),
                                 nrow=len(envs.class_names))
            self.cache[key] = teachers
        return self.cache[key]


def teacher_sources(rc: RunConfig, n_envs: int, test_envs: Sequence[int], test_env: int) -> List[int]:
    """The tiny teachers' domains: the run's sources, or (shared) the domains no run tests on."""
    if rc.teachers_per_run:
        return source_environments(n_envs, [test_env])
    return source_environments(n_envs, test_envs)


def run_all(rc: RunConfig, accelerator) -> Dict:
    p = rc.preset
    rc.out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        write_json(rc.out / "config.json", {"preset": p.to_dict(), "methods": rc.methods,
                                            "trial_seeds": rc.trial_seeds})
    store = TeacherStore(rc, accelerator)
    results: List[Dict] = []
    start = time.perf_counter()
    test_names: List[str] = []
    for seed in rc.trial_seeds:
        envs = load_environments(p, rc.data_dir, seed)
        test_envs = list(rc.test_envs or p.test_envs or range(len(envs.names)))
        bad = [t for t in test_envs if not 0 <= t < len(envs.names)]
        if bad:
            raise SystemExit(f"--test-envs {bad}: {p.dataset} has environments 0..{len(envs.names) - 1} "
                             f"({', '.join(envs.names)})")
        if seed == rc.trial_seeds[0] and p.dataset == "RotatedDigits" and accelerator.is_main_process:
            report.save_grid(rc.out / "domains.png", torch.cat([s.eval_in.x[:10] * 0.5 + 0.5 for s in envs.splits]),
                             nrow=10)
        for te in test_envs:
            name = envs.names[te]
            if name not in test_names:
                test_names.append(name)
            sources = source_environments(len(envs.names), [te])
            teachers = store.get(envs, teacher_sources(rc, len(envs.names), test_envs, te), seed)
            results.append({"method": "zeroshot", "test_env": name, "trial_seed": seed,
                            "acc": zero_shot_accuracy(teachers, envs.splits[te].eval_in, p.test_batch,
                                                      accelerator.device)})
            for method in rc.methods:
                directory = rc.out / "runs" / f"{name}_seed{seed}_{method}"
                done = directory / "result.json"
                if done.is_file() and rc.resume:
                    results.append(json.loads(done.read_text()))
                    continue
                if directory.exists() and not rc.resume and accelerator.is_main_process:
                    for f in directory.glob("*"):
                        f.unlink()
                accelerator.wait_for_everyone()
                run = Run(p, RunSpec(method, te, seed, sources, directory), envs, teachers, accelerator,
                          rc.backbone_weights, rc.max_steps, rc.quiet)
                res = run.train()
                accelerator.print(f"  {method:5s} test={name} seed={seed}: selected {res['selected_acc']:.2f} "
                                  f"SWAD {res.get('swad_acc', float('nan')):.2f} last {res['last_acc']:.2f}")
                results.append(res)
    table = report.results_table(results, test_names, ("zeroshot",) + tuple(rc.methods))
    summary = {"preset": p.name, "results": results, "table": table["rows"], "header": table["header"],
               "teacher_losses": store.losses, "wall_s": time.perf_counter() - start}
    if accelerator.is_main_process:
        write_json(rc.out / "results.json", summary)
        (rc.out / "results.md").write_text(table["markdown"])
        report.plot_results(rc.out / "results.png", table)
        accelerator.print(table["markdown"])
    return summary
