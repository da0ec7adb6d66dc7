"""The tiny preset: DMD vs DP-DMD on a 2-D problem whose truth is known (CPU, minutes).

1. Train a conditional flow-matching teacher (VelocityMLP) on ``RingMixture`` (label dropout for CFG).
2. Sample the teacher (30 CFG Euler steps): that distribution is what the students should match.
3. Distil 4-step students from the teacher with plain DMD and with DP-DMD: same iterations, batch,
   optimizers, TTUR and seeds (``Distiller``: the code path of the SD3 pipeline).
4. Per condition: mode coverage, energy distance to the teacher's samples, diversity; a scatter plot.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ddg_losses import FlowMatchingNoise
from ddg_models import FewStepGenerator, GuidedTeacher, shifted_flow_sigmas

from ..common import checkpoint
from ..common.rng import atomic_save
from ..common.runlog import write_csv
from ..common.sample_metrics import energy_distance, mean_pairwise_distance, nearest_center_counts
from ..common.tables import markdown_table, write_json
from .method import Distiller
from .presets import ToyPreset
from .toy_data import RingMixture
from .toy_models import VelocityMLP

# What each student changes from DP-DMD's configuration (both see the same budget and seeds).
METHODS = {
    "dmd": dict(anchor_steps=0, detach_first_step=False),  # plain DMD: no anchor, gradient through all steps
    "dpdmd": {},                                            # anchor loss on step 0 + DMD blocked at step 0
    "detach_only": dict(anchor_steps=0),                    # ablation: the block without the anchor
}

# The preset fields the teacher depends on: the key of its cache (out/teacher.pt).
TEACHER_FIELDS = ("seed", "num_conditions", "modes_per_condition", "radius", "std", "mode_decay", "width", "depth",
                  "teacher_iters", "teacher_batch", "teacher_lr", "label_dropout")


def _conditions(labels: torch.Tensor, null: int):
    return {"label": labels}, {"label": torch.full_like(labels, null)}


def train_teacher(p: ToyPreset, data: RingMixture, out: Path, quiet: bool) -> VelocityMLP:
    """Flow matching on the mixture: x_s = (1 - s) x0 + s eps, target eps - x0, s ~ U(0, 1); labels dropped
    to the null label with probability ``label_dropout`` so that the teacher has an unconditional branch."""
    from tqdm.auto import tqdm

    path = out / "teacher.pt"
    torch.manual_seed(p.seed)
    model = VelocityMLP(data.num_conditions, width=p.width, depth=p.depth)
    # The cached teacher is reused only for the same data and teacher settings (e.g. not after --mode-decay).
    key = {name: getattr(p, name) for name in TEACHER_FIELDS}
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(saved, dict) and saved.get("key") == key:
            model.load_state_dict(saved["state_dict"])
            return model
    gen = torch.Generator().manual_seed(p.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.teacher_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p.teacher_iters)
    for _ in tqdm(range(p.teacher_iters), desc="teacher", disable=quiet):
        labels = torch.randint(0, data.num_conditions, (p.teacher_batch,), generator=gen)
        x0 = data.sample(labels, gen)
        eps = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(p.teacher_batch, 1, generator=gen)
        drop = torch.rand(p.teacher_batch, generator=gen) < p.label_dropout
        labels = torch.where(drop, torch.full_like(labels, data.num_conditions), labels)
        v = model((1 - sigma) * x0 + sigma * eps, 1000 * sigma[:, 0], labels)
        loss = (v - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    atomic_save({"key": key, "state_dict": model.state_dict()}, path)
    return model


def _sample_each_condition(fn, data: RingMixture, n: int, seed: int) -> List[torch.Tensor]:
    """fn(noise, cond, uncond) for n points of every condition, the noise fixed by (seed, condition)."""
    outs = []
    for c in range(data.num_conditions):
        noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + c))
        outs.append(fn(noise, *_conditions(torch.full((n,), c), data.num_conditions)).float())
    return outs


def condition_metrics(samples: torch.Tensor, reference: torch.Tensor, data: RingMixture, condition: int,
                      cover_share: float, paired: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Coverage: the share of the condition's modes that hold >= cover_share of their true weight of the
    samples (nearest-centre assignment); on-mode: the share of samples within 4 std of one of its modes.
    With ``paired`` (the teacher's samples from the same noises): same_mode, the share of noises that
    the model sends to the mode the teacher sends them to."""
    counts = nearest_center_counts(samples, data.centers())[data.modes_of(condition)]
    expected = data.mode_weights().double() * samples.shape[0]
    own = data.centers()[data.modes_of(condition)].to(samples)
    on_mode = (torch.cdist(samples, own).min(dim=1).values < 4 * data.std).float().mean()
    metrics = {"coverage": float((counts >= cover_share * expected).float().mean()),
               "on_mode": float(on_mode),
               "energy_to_teacher": float(energy_distance(samples, reference)),
               "diversity": float(mean_pairwise_distance(samples))}
    if paired is not None:
        nearest = lambda x: torch.cdist(x, data.centers().to(x)).argmin(dim=1)  # noqa: E731
        metrics["same_mode"] = float((nearest(samples) == nearest(paired)).float().mean())
    return metrics


def mode_mass(samples: List[torch.Tensor], data: RingMixture) -> List[List[float]]:
    """Per condition, the % of its samples that lie on each of its modes (within 4 std of the centre; in
    ``modes_of`` order: heaviest first). Stray samples between modes are not counted: a student can send
    samples towards a light mode without landing on it. Measured on many samples, it shows how much of a
    light mode a model keeps, which the thresholded coverage of ``condition_metrics`` (a few samples per
    light mode at 2000 samples) cannot resolve."""
    masses = []
    for c, x in enumerate(samples):
        on_mode = torch.cdist(x, data.centers().to(x)).min(dim=1).values < 4 * data.std
        counts = nearest_center_counts(x[on_mode], data.centers())[data.modes_of(c)]
        masses.append((100.0 * counts.double() / x.shape[0]).tolist())
    return masses


def evaluate(samples: List[torch.Tensor], reference: List[torch.Tensor], data: RingMixture, cover_share: float,
             paired: Optional[List[torch.Tensor]] = None) -> List[Dict[str, float]]:
    paired = paired or [None] * len(samples)
    return [condition_metrics(s, r, data, c, cover_share, q)
            for c, (s, r, q) in enumerate(zip(samples, reference, paired))]


def initial_student(p: ToyPreset, teacher_net: VelocityMLP, data: RingMixture) -> VelocityMLP:
    """The trainable student network: the teacher's weights ('teacher', as DP-DMD does) or a fresh MLP
    ('random', seeded by p.seed + 2, the same for every method)."""
    if p.student_init == "teacher":
        return copy.deepcopy(teacher_net).requires_grad_(True)
    if p.student_init != "random":
        raise ValueError(f"initial_student: 'student_init' must be 'teacher' or 'random', got {p.student_init!r}")
    torch.manual_seed(p.seed + 2)
    return VelocityMLP(data.num_conditions, width=p.width, depth=p.depth)


def distill(method: str, p: ToyPreset, teacher_net: VelocityMLP, data: RingMixture, reference, paired, out: Path,
            resume: bool, quiet: bool, cpu: bool, mixed_precision: str = "no") -> Dict:
    """Train one student (initial weights: ``initial_student``); checkpoints in out/<method>/checkpoints
    (examples/common/checkpoint.py, one stage named after the method), resumable. ``paired``: the teacher's samples
    from the noises of the final evaluation (seed + 200)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    config = replace(p.distill, **METHODS[method])
    # one per student: its save_state holds this student's modules only
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    torch.manual_seed(p.seed)
    teacher = GuidedTeacher(copy.deepcopy(teacher_net), "velocity", config.guidance_scale).to(accelerator.device)
    # The fake score starts from the teacher's weights (as in DP-DMD); the student from p.student_init.
    generator = FewStepGenerator(initial_student(p, teacher_net, data), p.student_steps, config.shift,
                                 config.detach_first_step)
    fake = copy.deepcopy(teacher_net).requires_grad_(True)
    gen_opt = torch.optim.AdamW(generator.parameters(), lr=p.lr_generator, weight_decay=0.0)
    fake_opt = torch.optim.AdamW(fake.parameters(), lr=p.lr_fake, weight_decay=0.0)
    generator, fake, gen_opt, fake_opt = accelerator.prepare(generator, fake, gen_opt, fake_opt)
    schedule = FlowMatchingNoise(shifted_flow_sigmas(1000, config.shift)[:-1], per_sample=p.per_sample_timesteps)
    distiller = Distiller(config, accelerator, generator, teacher, fake, gen_opt, fake_opt, schedule, schedule)

    root = out / method / "checkpoints"
    # --iterations is where a run stops, so a run resumed with more iterations continues the same one
    settings = {"preset": {k: v for k, v in asdict(p).items() if k != "iterations"}, "method": method,
                "mixed_precision": mixed_precision}
    gen = torch.Generator().manual_seed(p.seed + 1)  # noise and labels: identical streams for every method
    state = {"iteration": 0, "rows": [], "seconds": 0.0, "products": {}}
    ckpt = checkpoint.latest(root, settings) if resume else None
    if ckpt is not None:
        checkpoint.load(ckpt, accelerator, method, {"data": gen})
        state = ckpt.state
    start = time.perf_counter() - state["seconds"]
    for it in tqdm(range(state["iteration"], p.iterations), desc=method, disable=quiet):
        labels = torch.randint(0, data.num_conditions, (p.batch,), generator=gen)
        noise = torch.randn(p.batch, 2, generator=gen)
        logs = distiller.step(it, noise, *_conditions(labels, data.num_conditions))
        if (it + 1) % p.eval_every == 0 or it + 1 == p.iterations:
            samples = _sample_each_condition(lambda z, c, u: generator(z, c).sample.detach(), data,
                                             p.eval_samples // 4, p.seed + 100)
            metrics = evaluate(samples, reference, data, p.cover_share)
            state["rows"].append({"method": method, "iteration": it + 1, **logs,
                                  **_mean(metrics)})
        if (it + 1) % p.ckpt_every == 0 or it + 1 == p.iterations:
            state.update(iteration=it + 1, seconds=time.perf_counter() - start)
            checkpoint.save(root, accelerator, stage=method, step=it + 1, settings=settings, state=state,
                            generators={"data": gen})
    with torch.no_grad():
        samples = _sample_each_condition(lambda z, c, u: generator(z, c).sample, data, p.eval_samples, p.seed + 200)
        many = _sample_each_condition(lambda z, c, u: generator(z, c).sample, data, p.mass_samples, p.seed + 400)
    return {"samples": samples, "rows": state["rows"], "seconds": state["seconds"],
            "mode_mass": mode_mass(many, data),
            "metrics": evaluate(samples, reference, data, p.cover_share, paired), "config": asdict(config)}


def scatter_plot(path: Path, panels: Dict[str, List[torch.Tensor]], data: RingMixture) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = data.num_conditions, len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    lim = data.radius + 1.5
    for j, (name, per_condition) in enumerate(panels.items()):
        for c in range(rows):
            ax = axes[c][j]
            pts = per_condition[c][:1000].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4)
            own = data.centers()[data.modes_of(c)].numpy()
            ax.scatter(own[:, 0], own[:, 1], marker="x", color="red", s=30)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[])
            ax.set_aspect("equal")
            if c == 0:
                ax.set_title(name)
            if j == 0:
                ax.set_ylabel(f"condition {c}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_tiny(p: ToyPreset, out: Path, methods, resume: bool = False, quiet: bool = False, cpu: bool = True,
             mixed_precision: str = "no") -> Dict:
    # Matrices of 256 x 128: intra-op threads only add synchronisation (measured: 5x slower on a busy 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_tiny(p, out, methods, resume, quiet, cpu, mixed_precision)
    finally:
        torch.set_num_threads(threads)


def _run_tiny(p: ToyPreset, out: Path, methods, resume: bool, quiet: bool, cpu: bool, mixed_precision: str) -> Dict:
    out.mkdir(parents=True, exist_ok=True)
    data = RingMixture(p.num_conditions, p.modes_per_condition, p.radius, p.std, p.mode_decay)
    t0 = time.perf_counter()
    teacher_net = train_teacher(p, data, out, quiet)
    teacher = GuidedTeacher(copy.deepcopy(teacher_net), "velocity", p.distill.guidance_scale)
    sample_teacher = lambda z, c, u: teacher.rollout(z, c, u, p.distill.teacher_steps,  # noqa: E731
                                                      p.distill.teacher_steps, p.distill.shift)[0]
    # Two independent teacher sample sets: one is the reference, the other shows the metrics' noise floor.
    reference = _sample_each_condition(sample_teacher, data, p.eval_samples, p.seed + 300)
    panels = {"data": [data.sample(torch.full((p.eval_samples,), c), torch.Generator().manual_seed(c))
                       for c in range(data.num_conditions)]}
    panels["teacher (30 steps)"] = _sample_each_condition(sample_teacher, data, p.eval_samples, p.seed + 200)
    results = {"teacher": {"metrics": evaluate(panels["teacher (30 steps)"], reference, data, p.cover_share),
                           "seconds": time.perf_counter() - t0}}
    results["data"] = {"metrics": evaluate(panels["data"], reference, data, p.cover_share),
                       "mode_mass": [(100 * data.mode_weights().double()).tolist()] * data.num_conditions}
    results["teacher"]["mode_mass"] = mode_mass(
        _sample_each_condition(sample_teacher, data, p.mass_samples, p.seed + 400), data)
    # Where both students start (4 Euler steps, no CFG).
    init = FewStepGenerator(initial_student(p, teacher_net, data), p.student_steps, p.distill.shift)
    sample_init = lambda z, c, u: init.sample(z, c)  # noqa: E731
    panels["student init (4 steps)"] = _sample_each_condition(sample_init, data, p.eval_samples, p.seed + 200)
    results["student init"] = {"metrics": evaluate(panels["student init (4 steps)"], reference, data,
                                                   p.cover_share, panels["teacher (30 steps)"]),
                               "mode_mass": mode_mass(_sample_each_condition(sample_init, data, p.mass_samples,
                                                                             p.seed + 400), data)}
    for method in methods:
        res = distill(method, p, teacher_net, data, reference, panels["teacher (30 steps)"], out, resume, quiet, cpu,
                      mixed_precision)
        panels[f"{method} (4 steps)"] = res.pop("samples")
        results[method] = res
    scatter_plot(out / "scatter.png", panels, data)
    return report(results, p, out)


def report(results: Dict, p: ToyPreset, out: Path) -> Dict:
    header = ["model", "condition", "modes covered", "on-mode %", "energy dist. to teacher", "diversity",
              "same mode as teacher %"]
    rows = []
    for name, res in results.items():
        for c, m in enumerate(res["metrics"] + [_mean(res["metrics"])]):
            rows.append([name, "mean" if c == len(res["metrics"]) else str(c),
                         f"{m['coverage'] * p.modes_per_condition:.2f}/{p.modes_per_condition}",
                         100 * m["on_mode"], f"{m['energy_to_teacher']:.4f}", m["diversity"],
                         100 * m["same_mode"] if "same_mode" in m else "-"])
    table = markdown_table(header, rows)
    # Where each model puts its samples among a condition's modes ("data": the true weights).
    mass_header = ["model", "condition"] + [f"mode {j} %" for j in range(p.modes_per_condition)]
    mass_rows = [[name, str(c)] + [f"{v:.2f}" for v in masses]
                 for name, res in results.items() for c, masses in enumerate(res["mode_mass"])]
    table += f"\n\nMass on each mode (% of {p.mass_samples} samples per condition within 4 std of the mode; " \
        "heaviest first):\n\n" + \
        markdown_table(mass_header, mass_rows)
    (out / "results.md").write_text(table)
    history = [r for res in results.values() for r in res.get("rows", [])]
    if history:
        write_csv(out / "log.csv", history, ("method", "iteration"))
    write_json(out / "results.json", {name: {k: v for k, v in res.items() if k != "rows"}
                                      for name, res in results.items()})
    print(table)
    return results


def _mean(metrics: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
