"""examples/ddg: DomainBed splits (determinism, layouts), per-domain batches, the stage switch's trainable sets,
the tiny preset end to end on a few steps (outputs, checkpoints without teachers, exports that reload)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

for _module in ("accelerate", "sklearn", "matplotlib", "tqdm", "diffusers", "transformers", "torchvision"):
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.common.domainbed import (domainbed_environments, holdout_split, seed_hash,  # noqa: E402
                                       source_environments)
from examples.common.rotated_digits import rotated_digits  # noqa: E402
from examples.ddg import train  # noqa: E402
from examples.ddg.data import SourceBatches, StepBatchSampler, load_environments, per_process_batch  # noqa: E402
from examples.ddg.export import load_student  # noqa: E402
from examples.ddg.method import build_module, trainable  # noqa: E402
from examples.ddg.pipeline import evaluate  # noqa: E402
from examples.ddg.presets import PRESETS  # noqa: E402
from examples.ddg.teachers import load_teachers  # noqa: E402
from examples.ddg.tiny import teacher_sources  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = PRESETS["tiny"]


# ------------------------------------------------------------------------------------------------ splits

def test_seed_hash_and_holdout_split_are_deterministic_and_disjoint():
    assert seed_hash(0, 3) == int(hashlib.md5(str((0, 3)).encode()).hexdigest(), 16) % 2 ** 31
    out_a, in_a = holdout_split(101, 0.2, seed_hash(0, 1))
    out_b, in_b = holdout_split(101, 0.2, seed_hash(0, 1))
    assert (out_a == out_b).all() and (in_a == in_b).all()
    assert len(out_a) == 20 and len(in_a) == 81 and sorted([*out_a, *in_a]) == list(range(101))
    out_c, _ = holdout_split(101, 0.2, seed_hash(1, 1))
    assert set(out_c) != set(out_a)
    with pytest.raises(ValueError, match="holdout_split: 'fraction'"):
        holdout_split(10, 1.0, 0)
    assert source_environments(4, [2]) == [0, 1, 3]
    with pytest.raises(ValueError, match="source_environments"):
        source_environments(4, [4])


def test_rotated_digits_environments():
    names, envs = rotated_digits((0, 45, 90), size=8)
    names2, envs2 = rotated_digits((0, 45, 90), size=8)
    assert names == ["rot0", "rot45", "rot90"]
    assert sum(len(y) for _, y in envs) == 1797
    for (x, y), (x2, y2) in zip(envs, envs2):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # rot90 of a subset is the exact transpose-flip of the upright digits (bilinear at 90 degrees is exact)
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images, dtype=torch.float32) / 16
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(envs[0][0][:, 0], digits[perm[0::3]])
    torch.testing.assert_close(envs[2][0][:, 0], torch.rot90(digits[perm[2::3]], 1, dims=(1, 2)), atol=1e-5,
                               rtol=0)


def test_load_environments_holdout_depends_on_trial_seed_only():
    a, b, c = (load_environments(TINY, None, s) for s in (0, 0, 1))
    assert a.names == [f"rot{x}" for x in TINY.angles] and a.class_names[0] == "zero"
    for sa, sb, sc in zip(a.splits, b.splits, c.splits):
        assert torch.equal(sa.eval_out.x, sb.eval_out.x)
        assert not torch.equal(sa.eval_out.y, sc.eval_out.y) or not torch.equal(sa.eval_out.x, sc.eval_out.x)
        assert len(sa.eval_out) == int(0.2 * (len(sa.eval_out) + len(sa.eval_in)))


def test_domainbed_folder_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "PACS"
    for env in ("sketch", "art_painting", "photo", "cartoon"):
        for cls in ("dog", "horse"):
            (root / env / cls).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(root / env / cls / "0.png")
    names, envs = domainbed_environments(str(tmp_path), "PACS")
    assert names == ["art_painting", "cartoon", "photo", "sketch"]  # sorted: DomainBed's env indices
    assert envs[0].classes == ["dog", "horse"] and len(envs[3]) == 2
    (root / "photo" / "dog" / "0.png").unlink()
    (root / "photo" / "dog").rmdir()
    with pytest.raises(ValueError, match="environment 'photo' has classes"):
        domainbed_environments(str(tmp_path), "PACS")
    with pytest.raises(FileNotFoundError, match="VLCS"):
        domainbed_environments(str(tmp_path), "VLCS")


def test_step_batches_resume_exactly_and_come_one_block_per_domain():
    full = StepBatchSampler(50, 4, seed=7, start=0)
    resumed = StepBatchSampler(50, 4, seed=7, start=3)
    first = [b for _, b in zip(range(6), full)]
    assert first[3:] == [b for _, b in zip(range(3), resumed)]
    envs = load_environments(TINY, None, 0)
    x, y, d = next(SourceBatches(envs, [1, 3, 4], batch=5, seed=0, start=0, rank=0, num_workers=0))
    assert x.shape == (15, 1, 16, 16) and d.tolist() == [1] * 5 + [3] * 5 + [4] * 5
    x1, _, _ = next(SourceBatches(envs, [1, 3, 4], batch=5, seed=0, start=0, rank=1, num_workers=0))
    assert not torch.equal(x, x1)  # every process draws its own minibatches


def test_per_process_batch_divides_or_refuses():
    assert per_process_batch(32, 4) == 8 and per_process_batch(5, 1) == 5
    with pytest.raises(SystemExit, match="--batch-per-domain 32 is not divisible by the 3 processes.*30, 33"):
        per_process_batch(32, 3)
    with pytest.raises(ValueError, match="per_process_batch: 'total'"):
        per_process_batch(0, 1)


# -------------------------------------------------------------------------------------- training pieces

SHORT = ["--preset", "tiny", "--quiet", "--test-envs", "0", "--methods", "erm,ddg", "--steps", "4",
         "--stage1-steps", "2", "--swad-start", "1", "--checkpoint-freq", "1", "--teacher-steps", "3,3,3",
         "--batch-per-domain", "4", "--n-converge", "1", "--n-tolerance", "2"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddg_short")
    summary = train.main([*SHORT, "--out", str(out)])
    return out, summary


@pytest.fixture(scope="module")
def tiny_setup(smoke_run):
    out, _ = smoke_run
    envs = load_environments(TINY, None, 0)
    teacher_dir = next((out / "teachers").iterdir())
    teachers = load_teachers(TINY, envs, teacher_dir / "clip", teacher_dir / "sd", "cpu")
    return envs, teachers


def test_short_run_writes_table_logs_images_and_exports(smoke_run):
    from safetensors.torch import load_file

    out, summary = smoke_run
    assert summary["header"][:3] == ["test domain", "CLIP zero-shot", "ERM"]
    assert [r[0] for r in summary["table"]] == ["rot0", "avg"]
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["results"]} == {"zeroshot", "erm", "ddg"}
    ddg = next(r for r in results["results"] if r["method"] == "ddg")
    assert ddg["steps"] == 4 and 0 <= ddg["selected_acc"] <= 100 and "swad_acc" in ddg
    assert results["metrics"]["rot0_seed0_ddg/selected_acc"] == ddg["selected_acc"]
    assert set(results["metrics"]) == {f"rot0_seed0_{m}/{c}" for m in ("erm", "ddg")
                                       for c in ("selected_acc", "swad_acc", "last_acc")} | {"rot0_seed0_zeroshot/acc"}
    assert "| rot0 |" in (out / "results.md").read_text()
    for png in ("results.png", "domains.png", "curves.png"):
        assert (out / png).stat().st_size > 0
    assert any((out / "teachers").glob("*/samples.png"))
    rows = json.loads((out / "log.json").read_text())
    ddg_rows = [r for r in rows if r["run"] == "rot0_seed0_ddg"]
    assert [r["run_step"] for r in ddg_rows] == [1, 2, 3, 4] and "diff" in ddg_rows[-1] and "diff" not in ddg_rows[0]
    assert [r["stage"] for r in ddg_rows] == ["stage1", "stage1", "stage2", "stage2"]
    # Stage II starts from Stage I's choice and selects within Stage II (VL2V): the selected row is a Stage-II row
    stage2 = [r for r in ddg_rows if r["stage"] == "stage2"]
    best = max(stage2, key=lambda r: r["train_out_acc"])  # the first of equal maxima, as the selection keeps it
    assert (ddg["selected_step"], ddg["selected_acc"]) == (best["run_step"], best["test_in_acc"])
    # DomainBed's records: its training-domain-validation selection over them is the run's selection
    lines = (out / "domainbed" / "rot0_seed0_ddg" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [3, 4] and (out / "domainbed" / "rot0_seed0_ddg" / "done").is_file()
    assert records[0]["args"] == {"dataset": "RotatedDigits", "algorithm": "DDG", "test_envs": [0], "trial_seed": 0,
                                  "hparams_seed": 0}

    def iid(record):  # DomainBed's IIDAccuracySelectionMethod: env{i}_out_acc counted up from 0, test env skipped
        keys, i = [], 0
        while f"env{i}_out_acc" in record:
            keys += [f"env{i}_out_acc"] if i != 0 else []
            i += 1
        return sum(record[k] for k in keys) / len(keys)

    assert len([k for k in records[0] if k.endswith("_out_acc")]) == 6  # every environment, the test one too
    chosen = max(records, key=iid)
    assert chosen["env0_in_acc"] * 100 == pytest.approx(ddg["selected_acc"], abs=1e-9)
    assert "| DDG |" in (out / "results_domainbed.md").read_text()
    # SWAD's segments close with the current weights' training-domain validation loss (khanrc/swad's trainer)
    assert ddg["swad_segments"]
    loss_at = {r["run_step"]: r["train_out_loss"] for r in ddg_rows}
    for segment in ddg["swad_segments"]:
        assert segment["loss"] == pytest.approx(loss_at[segment["end"]], rel=1e-6)
    # checkpoints hold the student and its adapter, never the frozen teachers
    last = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    keys = [k for f in last.glob("*/model*.safetensors") for k in load_file(str(f))]
    assert keys and not any(part in k for k in keys for part in ("unet", "vae", "text_encoder", "prompt_embeddings"))
    # the exported selected student reloads and reproduces its evaluation
    envs = load_environments(TINY, None, 0)
    student = load_student(out / "export" / "rot0_seed0_ddg")
    from examples.ddg.data import eval_loader

    acc = evaluate(student, {"test": eval_loader(envs.splits[0].eval_in, 512, 0)}, "cpu")["test_acc"]
    assert acc == ddg["selected_acc"]


def test_stage_switch_trainable_sets(tiny_setup):
    envs, teachers = tiny_setup
    p = TINY.with_overrides(conditioning="both")

    def module(preset, method):
        from ddg_models import CLIPVisionBackbone

        return build_module(preset, CLIPVisionBackbone.from_pretrained(teachers.clip_dir), teachers.class_text,
                            teachers.logit_scale, teachers.sd_class_prompts, teachers.sd.context_shape, method)

    m = module(p, "ddg")
    s = m.student
    ids = lambda params: {id(q) for q in params}  # noqa: E731
    assert ids(trainable(m, "ddg", 1, p)) == ids(s.projection.parameters())
    stage2 = ids(trainable(m, "ddg", 2, p))
    assert stage2 == ids(s.backbone.parameters()) | ids(m.conditioning.patches.parameters())
    assert not s.projection.weight.requires_grad
    assert ids(trainable(m, "erm", 1, p)) == ids(s.backbone.parameters()) | ids(s.projection.parameters())
    # without the diffusion term (beta 0) nothing of the adapter is built or trained: DDP would wait for it
    no_diff = p.with_overrides(beta=0.0)
    m0 = module(no_diff, "ddg")
    assert m0.conditioning is None
    assert ids(trainable(m0, "ddg", 2, no_diff)) == ids(m0.student.backbone.parameters())
    assert module(TINY, "ddg").conditioning.patches is None  # conditioning A alone: no patch adapter


def test_cfg_negatives_per_domain_or_empty(tiny_setup):
    envs, teachers = tiny_setup
    assert teachers.sd_negatives.shape[0] == len(envs.names)  # tiny preset: negative='domain'
    picked = teachers.negatives_for(torch.tensor([4, 1, 4]))
    torch.testing.assert_close(picked[0], teachers.sd.encode_prompts(["a rot60 photo"])[0])
    torch.testing.assert_close(picked[1], teachers.sd_negatives[1])
    clip_dir, sd_dir = teachers.clip_dir, teachers.clip_dir.parent / "sd"
    empty = load_teachers(TINY.with_overrides(negative="empty"), envs, clip_dir, sd_dir, "cpu")
    assert empty.sd_negatives.shape[0] == 1
    torch.testing.assert_close(empty.negatives_for(torch.tensor([0, 5])), teachers.sd.encode_prompts([""]))


def test_bf16_sd_teacher_keeps_the_denoising_loss_and_its_gradient(tiny_setup):
    """Under bf16 mixed precision the SD teacher loads in bf16 (rc.sd_dtype) while the student's context, the
    latents and the loss stay fp32: the loss and its gradient on the context match the fp32 teacher's within bf16's
    rounding, and the gradient reaches the context in fp32."""
    from ddg_losses import GuidedDenoisingLoss
    from examples.ddg.pipeline import RunConfig

    envs, teachers = tiny_setup
    assert RunConfig(TINY, Path("."), ("ddg",), (0,), mixed_precision="bf16").sd_dtype == torch.bfloat16
    assert RunConfig(TINY, Path("."), ("ddg",), (0,)).sd_dtype is None
    clip_dir, sd_dir = teachers.clip_dir, teachers.clip_dir.parent / "sd"
    half = load_teachers(TINY, envs, clip_dir, sd_dir, "cpu", sd_dtype=torch.bfloat16)
    assert half.sd.unet.dtype == torch.bfloat16 and teachers.sd.unet.dtype == torch.float32
    loss_fn = GuidedDenoisingLoss(TINY.guidance_scale)
    g = torch.Generator().manual_seed(0)
    x_sd = torch.rand(6, half.sd.vae.config.in_channels, 16, 16, generator=g) * 2 - 1
    base = teachers.sd_class_prompts[torch.arange(6) % teachers.sd_class_prompts.shape[0]]
    results = []
    for t in (teachers, half):
        context = (base + 0.1 * torch.randn(base.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
        loss = loss_fn(t.sd, x_sd, context, t.negatives_for(torch.arange(6) % len(envs.names)),
                       torch.Generator().manual_seed(2))
        loss.backward()
        assert loss.dtype == torch.float32 and context.grad.dtype == torch.float32
        results.append((loss.detach(), context.grad))
    (l32, g32), (l16, g16) = results
    assert torch.isfinite(g16).all() and g16.abs().sum() > 0
    torch.testing.assert_close(l16, l32, rtol=0.05, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
    assert cos > 0.95, f"bf16 teacher's context gradient points elsewhere: cosine {cos:.3f}"


def test_stage2_starts_from_the_stage1_choice():
    from types import SimpleNamespace

    from examples.ddg.pipeline import Selection, start_from_selected

    module = SimpleNamespace(student=torch.nn.Linear(3, 2))
    chosen = {k: torch.full_like(v, 0.5) for k, v in module.student.state_dict().items()}
    selection = Selection(step=7, best={"step": 5, "train_out_acc": 60.0, "test_in_acc": 40.0}, best_state=chosen,
                          last={"step": 7, "test_in_acc": 41.0})
    single = SimpleNamespace(is_main_process=True, num_processes=1, wait_for_everyone=lambda: None)
    start_from_selected(single, module, selection)
    assert all(torch.equal(v, chosen[k]) for k, v in module.student.state_dict().items())
    assert (selection.best, selection.best_state, selection.step, selection.last["step"]) == ({}, None, 7, 7)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    start_from_selected(single, module, selection)  # nothing chosen (no evaluation in Stage I): weights stay
    assert all(torch.equal(v, before[k]) for k, v in module.student.state_dict().items())


def test_domainbed_table_is_mean_and_standard_error_over_trials():
    from examples.ddg.domainbed_output import domainbed_table

    results = [{"method": "ddg", "test_env": "A", "trial_seed": s, "selected_acc": a}
               for s, a in enumerate((50, 60, 70))]
    results += [{"method": "ddg", "test_env": "B", "trial_seed": 0, "selected_acc": 80.0}]
    table = domainbed_table(results, ["A", "B"], [("DDG", "ddg", "selected_acc"), ("ERM", "erm", "selected_acc")])
    assert table["header"] == ["algorithm", "A", "B", "Avg"]
    # DomainBed: 100 * mean, 100 * std(ddof=0) / sqrt(n); Avg = the mean of the environments' means, no error
    assert table["rows"] == [["DDG", "60.0 ± 4.7", "80.0 ± 0.0", "70.0"], ["ERM", "-", "-", "-"]]


def test_teacher_domains_never_include_a_test_domain():
    assert teacher_sources(False, 6, [0, 5], 0) == [1, 2, 3, 4]
    assert teacher_sources(True, 6, [0, 5], 5) == [0, 1, 2, 3, 4]


def test_cli_vocabulary():
    args = train.parse_args(["--preset", "pacs", "--data-root", "/d", "--clip-model", "/c", "--pretrained-model",
                             "/s", "--seeds", "0,1,2", "--mixed-precision", "bf16", "--max-steps", "5"])
    rc = train.build_config(args)
    assert (rc.data_root, rc.clip_model, rc.pretrained_model) == ("/d", "/c", "/s")
    assert rc.seeds == (0, 1, 2) and rc.mixed_precision == "bf16" and rc.max_steps == 5
    assert train.build_config(train.parse_args(["--preset", "pacs", "--seed", "3"])).seeds == (3,)
    with pytest.raises(SystemExit, match="--backbone resnet50 needs --backbone-weights"):
        train.build_config(train.parse_args(["--preset", "pacs", "--backbone", "resnet50"]))
    random_init = train.build_config(train.parse_args(["--preset", "pacs", "--backbone", "resnet50",
                                                       "--backbone-weights", "random"]))
    assert random_init.preset.backbone == "resnet50" and random_init.backbone_weights is None
    assert train.build_config(train.parse_args(["--preset", "pacs"])).seeds == PRESETS["pacs"].trial_seeds
    for old in ("--data-dir", "--sd-dir", "--clip-dir", "--trial-seeds", "--smoke"):
        with pytest.raises(SystemExit):
            train.parse_args([old, "x"] if old != "--smoke" else [old])
    assert "smoke" in PRESETS and PRESETS["smoke"].dataset == PRESETS["pacs"].dataset
