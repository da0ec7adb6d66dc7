"""examples/dpdmd: the tiny 2-D preset end to end with exact resume, the Distiller's updates, the smoke preset's
SD3.5-Medium folder and the SD3 command line. The smoke runs themselves (1 and 2 processes, fp32 and bf16,
straight and resumed) are the conformance case (conformance_dpdmd.py); the FSDP path is test_dpdmd_fsdp.py."""
from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

for _module in ("accelerate", "diffusers", "transformers", "matplotlib", "tqdm"):  # the 'models' extra
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.dpdmd.presets import PRESETS  # noqa: E402
from examples.dpdmd.tiny import condition_metrics, initial_student, run_tiny, train_teacher  # noqa: E402
from examples.dpdmd.toy_data import RingMixture  # noqa: E402
from examples.dpdmd.train import build_preset, main, parse_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(teacher_iters=150, iterations=24, eval_samples=200, eval_every=12, ckpt_every=12, batch=64,
             mass_samples=500)


def test_ring_mixture_and_condition_metrics_on_known_samples():
    data = RingMixture(3, 4, 2.5, 0.15, mode_decay=0.5)
    labels = torch.full((4000,), 1)
    x = data.sample(labels, torch.Generator().manual_seed(0))
    full = condition_metrics(x, x, data, 1, cover_share=0.2)
    assert full["coverage"] == 1.0 and full["on_mode"] > 0.99 and abs(full["energy_to_teacher"]) < 1e-9
    heavy = data.centers()[data.modes_of(1)[0]] + 0.15 * torch.randn(4000, 2)  # all samples in one mode
    dropped = condition_metrics(heavy, x, data, 1, cover_share=0.2)
    assert dropped["coverage"] == 0.25 and dropped["energy_to_teacher"] > 0.5 and dropped["diversity"] < 0.5
    torch.testing.assert_close(data.mode_weights(), torch.tensor([8.0, 4, 2, 1]) / 15)


def test_tiny_preset_runs_and_resumes_exactly(tmp_path):
    p = replace(PRESETS["tiny"], **SMALL)
    straight = run_tiny(p, tmp_path / "a", ["dmd", "dpdmd"], quiet=True)
    table = (tmp_path / "a" / "results.md").read_text()
    assert "| dpdmd | mean |" in table and "| dmd | mean |" in table and "| teacher | mean |" in table
    assert "Mass on each mode" in table and "| data | 0 | 53.33 | 26.67 | 13.33 | 6.67 |" in table  # 8:4:2:1
    for name in ("teacher", "student init", "dmd", "dpdmd"):  # each condition's modes hold <= all its samples
        assert all(len(m) == 4 and 0 < sum(m) <= 100 + 1e-9 for m in straight[name]["mode_mass"])
    assert (tmp_path / "a" / "scatter.png").stat().st_size > 10_000
    rows = list(csv.DictReader(open(tmp_path / "a" / "log.csv")))
    assert [r["iteration"] for r in rows if r["method"] == "dpdmd"] == ["12", "24"]
    assert all(float(r["anchor_loss"]) > 0 for r in rows if r["method"] == "dpdmd" and r["anchor_loss"])
    # Stop after 12 iterations, then resume to 24 with the same teacher: the same students come out.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "teacher.pt").write_bytes((tmp_path / "a" / "teacher.pt").read_bytes())
    run_tiny(replace(p, iterations=12), tmp_path / "b", ["dpdmd"], quiet=True)
    resumed = run_tiny(p, tmp_path / "b", ["dpdmd"], resume=True, quiet=True)
    assert resumed["dpdmd"]["metrics"] == straight["dpdmd"]["metrics"]


def test_student_init_and_the_teacher_cache_key(tmp_path):
    p = replace(PRESETS["tiny"], teacher_iters=3, width=16, depth=2)
    data = RingMixture(p.num_conditions, p.modes_per_condition, p.radius, p.std, p.mode_decay)
    teacher = train_teacher(p, data, tmp_path, quiet=True)
    weights = lambda m: list(m.state_dict().values())  # noqa: E731
    copied = initial_student(p, teacher, data)
    assert all(torch.equal(a, b) for a, b in zip(weights(copied), weights(teacher)))
    assert all(q.requires_grad for q in copied.parameters())
    fresh = initial_student(replace(p, student_init="random"), teacher, data)
    assert not torch.equal(weights(fresh)[0], weights(teacher)[0])
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), weights(initial_student(
        replace(p, student_init="random"), teacher, data))))  # seeded: the same for every method
    with pytest.raises(ValueError, match="initial_student: 'student_init'"):
        initial_student(replace(p, student_init="pretrained"), teacher, data)
    # The cache is reused for the same settings and retrained (not silently reused) for other data.
    assert all(torch.equal(a, b) for a, b in zip(weights(train_teacher(p, data, tmp_path, True)), weights(teacher)))
    other = replace(p, mode_decay=0.25)
    retrained = train_teacher(other, RingMixture(3, 4, 2.5, 0.15, 0.25), tmp_path, True)
    assert not all(torch.equal(a, b) for a, b in zip(weights(retrained), weights(teacher)))


def test_tiny_overrides_from_the_command_line():
    p = build_preset(parse_args(["--student-init", "random", "--lr-generator", "1e-3", "--lr-fake", "1e-4",
                                 "--mode-decay", "0.25", "--fake-per-generator", "1"]))
    assert (p.student_init, p.lr_generator, p.lr_fake, p.mode_decay) == ("random", 1e-3, 1e-4, 0.25)
    assert p.distill.fake_per_generator == 1
    with pytest.raises(SystemExit, match="--mode-decay is for the tiny preset"):
        build_preset(parse_args(["--preset", "smoke", "--mode-decay", "0.25"]))


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return [not torch.equal(a, b) for a, b in zip(before, module.parameters())]


def test_distiller_updates_route_to_the_right_network():
    """A fake iteration moves only the fake score; a student iteration only the student (teacher frozen), with
    the norm before clipping logged and the clip applied (max-norm 1e-3 bounds the step of plain SGD)."""
    from accelerate import Accelerator

    from ddg_losses import FlowMatchingNoise
    from ddg_models import FewStepGenerator, GuidedTeacher, shifted_flow_sigmas
    from examples.dpdmd.method import DistillConfig, Distiller
    from examples.dpdmd.toy_models import VelocityMLP

    torch.manual_seed(0)
    net = VelocityMLP(3, width=32, depth=2)
    teacher = GuidedTeacher(VelocityMLP(3, width=32, depth=2).requires_grad_(False), "velocity", 2.0)
    teacher.model.load_state_dict(net.state_dict())
    generator, fake = FewStepGenerator(VelocityMLP(3, width=32, depth=2)), VelocityMLP(3, width=32, depth=2)
    lr, clip = 0.5, 1e-3
    gen_opt, fake_opt = (torch.optim.SGD(m.parameters(), lr=lr) for m in (generator, fake))
    schedule = FlowMatchingNoise(shifted_flow_sigmas(1000)[:-1], per_sample=True)
    config = DistillConfig(guidance_scale=2.0, fake_per_generator=1, anchor_steps=3, teacher_steps=6, clip_norm=clip)
    d = Distiller(config, Accelerator(cpu=True), generator, teacher, fake, gen_opt, fake_opt, schedule, schedule)
    labels = torch.randint(0, 3, (16,))
    cond, uncond = {"label": labels}, {"label": torch.full_like(labels, 3)}
    g0, f0, t0 = _params(generator), _params(fake), _params(teacher.model)
    logs = d.step(0, torch.randn(16, 2), cond, uncond)  # ratio 1: iteration 0 is a fake update
    assert set(logs) == {"fake_loss", "fake_grad_norm"}
    assert all(_changed(f0, fake)) and not any(_changed(g0, generator)) and not any(_changed(t0, teacher.model))
    f1 = _params(fake)
    logs = d.step(1, torch.randn(16, 2), cond, uncond)
    assert {"dmd_loss", "anchor_loss", "generator_grad_norm"} <= set(logs) and logs["generator_grad_norm"] > clip
    assert any(_changed(g0, generator)) and not any(_changed(f1, fake)) and not any(_changed(t0, teacher.model))
    step = torch.cat([(a - b).flatten() for a, b in zip(g0, _params(generator))]).norm()
    assert step <= lr * clip * (1 + 1e-4)  # SGD step = lr * clipped gradient


def _rows(path):
    return list(csv.DictReader(open(path)))


def test_bf16_teacher_serves_an_fp32_generator():
    """The SD3 launch's dtypes: a bf16 teacher transformer (not prepared by accelerate) and an fp32 generator
    output; the real score and the anchor rollout come back in fp32 and one generator step updates the student."""
    from accelerate import Accelerator
    from diffusers import SD3Transformer2DModel

    from ddg_losses import FlowMatchingNoise
    from ddg_models import FewStepGenerator, GuidedTeacher, shifted_flow_sigmas
    from examples.dpdmd.method import DistillConfig, Distiller

    def tiny(dtype):
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                     caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8).to(dtype)

    teacher = GuidedTeacher(tiny(torch.bfloat16), "velocity", 3.5)
    generator, fake = FewStepGenerator(tiny(torch.float32), 2), tiny(torch.float32)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (generator, fake)]
    schedule = FlowMatchingNoise(shifted_flow_sigmas(1000)[:-1], per_sample=True)
    config = DistillConfig(guidance_scale=3.5, fake_per_generator=1, anchor_steps=2, teacher_steps=4)
    d = Distiller(config, Accelerator(cpu=True), generator, teacher, fake, *opts, schedule, schedule)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    noise = torch.randn(2, 4, 8, 8)
    z_k, _ = teacher.rollout(noise, cond, uncond, 4, 2)
    assert z_k.dtype == torch.float32
    before = [p.detach().clone() for p in generator.parameters()]
    logs = d.generator_step(noise, cond, uncond, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()) and "anchor_loss" in logs
    assert any(not torch.equal(a, b) for a, b in zip(before, generator.parameters()))


def test_sd3_preset_needs_local_weights(tmp_path):
    with pytest.raises(SystemExit, match="needs --pretrained-model"):
        main(["--preset", "sd35m", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a local StableDiffusion3Pipeline folder"):
        main(["--preset", "sd35m", "--out", str(tmp_path), "--pretrained-model", str(tmp_path), "--prompts",
              __file__, "--cpu"])
    with pytest.raises(SystemExit, match="one seed"):
        main(["--preset", "smoke", "--out", str(tmp_path), "--seeds", "0,1"])


def test_prompt_files_and_the_prompts_of_each_rank(tmp_path):
    from examples.dpdmd.pipeline import prompts_of, read_prompts

    path = tmp_path / "p.txt"
    path.write_text("0 --- a café at night\n\n  a red cat \n12 --- a dog\n", encoding="utf-8")
    assert read_prompts(path) == ["a café at night", "a red cat", "a dog"]
    prompts = [f"p{i}" for i in range(6)]
    # 2 ranks x 1 prompt: one epoch is 3 steps, every prompt once; the next epoch is another permutation
    epoch = [prompts_of(s, r, 2, 1, prompts, 0)[0] for s in range(3) for r in range(2)]
    assert sorted(epoch) == prompts
    second = [prompts_of(s, r, 2, 1, prompts, 0)[0] for s in range(3, 6) for r in range(2)]
    assert sorted(second) == prompts and second != epoch
    with pytest.raises(ValueError, match="prompts_of: expected"):
        prompts_of(0, 2, 2, 1, prompts, 0)


def test_bf16_adamw_rounds_away_the_updates_that_fp32_master_weights_keep():
    """Why the student and the fake score keep fp32 master weights (bf16 compute only): one AdamW step at the
    sd35m learning rate moves a weight by ~1e-5, far below bf16's spacing at transformer-weight scale (|w| ~ 0.05:
    2.4e-4), so pure-bf16 weights keep almost all of their values (all but the ~4% smallest)."""
    torch.manual_seed(0)
    weights, grads = 0.05 * torch.randn(20_000), torch.randn(20_000)
    moved = {}
    for dtype in (torch.bfloat16, torch.float32):
        p = torch.nn.Parameter(weights.to(dtype, copy=True))
        p.grad = grads.to(dtype)
        torch.optim.AdamW([p], lr=PRESETS["sd35m"].lr_generator, weight_decay=0.0).step()
        moved[dtype] = float((p.detach() != weights.to(dtype)).float().mean())
    assert moved[torch.bfloat16] < 0.1 and moved[torch.float32] == 1.0, moved


def test_distiller_runs_the_dmd2_epsilon_variant():
    """Epsilon teacher + backward-simulation generator + DDPM noise (DM loss t in [20, 980), fake loss
    [0, 1000)) + TTUR every step: both networks update on the generator's iterations."""
    from accelerate import Accelerator

    from ddg_losses import DDPMNoise
    from ddg_models import BackwardSimulationGenerator, GuidedTeacher
    from examples.dpdmd.method import DistillConfig, Distiller
    from examples.dpdmd.toy_models import VelocityMLP

    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    teacher = GuidedTeacher(VelocityMLP(3, width=32, depth=2), "epsilon", 1.75)
    generator = BackwardSimulationGenerator(VelocityMLP(3, width=32, depth=2), ab)
    fake = VelocityMLP(3, width=32, depth=2)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (generator, fake)]
    config = DistillConfig(guidance_scale=1.75, fake_per_generator=2, ttur_mode="every_step", anchor_steps=0)
    d = Distiller(config, Accelerator(cpu=True), generator, teacher, fake, *opts, DDPMNoise(ab, 20, 980),
                  DDPMNoise(ab))
    labels = torch.randint(0, 3, (8,))
    cond, uncond = {"label": labels}, {"label": torch.full_like(labels, 3)}
    assert {"dmd_loss", "fake_loss"} <= set(d.step(0, torch.randn(8, 2), cond, uncond))
    assert set(d.step(1, torch.randn(8, 2), cond, uncond)) == {"fake_loss", "fake_grad_norm"}
    with pytest.raises(ValueError, match="anchor_steps > 0 needs a generator that returns its first velocity"):
        Distiller(replace(config, anchor_steps=2), Accelerator(cpu=True), generator, teacher, fake, *opts,
                  DDPMNoise(ab, 20, 980), DDPMNoise(ab)).generator_step(torch.randn(8, 2), cond, uncond)
