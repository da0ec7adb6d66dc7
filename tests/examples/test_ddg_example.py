"""examples/ddg: DomainBed splits (determinism, layouts), per-domain batches, the stage switch's trainable sets,
exact resume, and the tiny preset end to end (smoke)."""
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
from examples.ddg.data import SourceBatches, StepBatchSampler, load_environments  # noqa: E402
from examples.ddg.pipeline import RunConfig, teacher_sources  # noqa: E402
from examples.ddg.presets import PRESETS  # noqa: E402
from examples.ddg.teachers import load_teachers  # noqa: E402
from examples.ddg.trainer import Run, RunSpec, build_module, trainable  # noqa: E402

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


# -------------------------------------------------------------------------------------- training pieces

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddg_smoke")
    summary = train.main(["--preset", "tiny", "--smoke", "--out", str(out), "--quiet", "--test-envs", "0",
                          "--methods", "erm,ddg", "--batch-per-domain", "4"])
    return out, summary


@pytest.fixture(scope="module")
def tiny_setup(smoke_run):
    out, _ = smoke_run
    envs = load_environments(TINY, None, 0)
    teacher_dir = next((out / "teachers").iterdir())
    teachers = load_teachers(TINY, envs, teacher_dir / "clip", teacher_dir / "sd", "cpu")
    return envs, teachers


def test_smoke_writes_table_logs_images_and_resumes(smoke_run):
    out, summary = smoke_run
    assert summary["header"][:3] == ["test domain", "CLIP zero-shot", "ERM"]
    assert [r[0] for r in summary["table"]] == ["rot0", "avg"]
    results = json.loads((out / "results.json").read_text())["results"]
    assert {r["method"] for r in results} == {"zeroshot", "erm", "ddg"}
    ddg = next(r for r in results if r["method"] == "ddg")
    assert ddg["steps"] == 6 and 0 <= ddg["selected_acc"] <= 100 and "swad_acc" in ddg
    assert "| rot0 |" in (out / "results.md").read_text()
    for png in ("results.png", "domains.png"):
        assert (out / png).stat().st_size > 0
    assert any((out / "teachers").glob("*/samples.png"))
    log = (out / "runs" / "rot0_seed0_ddg" / "log.csv").read_text().splitlines()
    assert "diff" in log[0] and len(log) == 7  # header + one row per step (checkpoint_freq 1)
    ckpt = torch.load(out / "runs" / "rot0_seed0_ddg" / "checkpoint.pt", map_location="cpu", weights_only=False)
    keys = list(ckpt["module"]) + [k for seg in ckpt["swad"]["segments"] for k in seg["state"]]
    assert keys and not any(part in k for k in keys for part in ("unet", "vae", "text_encoder", "prompt_embeddings"))
    again = train.main(["--preset", "tiny", "--smoke", "--out", str(out), "--quiet", "--test-envs", "0",
                        "--methods", "erm,ddg", "--batch-per-domain", "4", "--resume"])
    assert again["table"] == summary["table"]


def test_stage_switch_trainable_sets(tiny_setup):
    envs, teachers = tiny_setup
    module = build_module(TINY.with_overrides(conditioning="both"), teachers, None, "ddg")
    s = module.student
    ids = lambda params: {id(q) for q in params}  # noqa: E731
    assert ids(trainable(module, "ddg", 1, TINY)) == ids(s.projection.parameters())
    stage2 = ids(trainable(module, "ddg", 2, TINY.with_overrides(conditioning="both")))
    assert stage2 == ids(s.backbone.parameters()) | ids(module.conditioning.patches.parameters())
    assert not s.projection.weight.requires_grad
    assert ids(trainable(module, "erm", 1, TINY)) == ids(s.backbone.parameters()) | ids(s.projection.parameters())


def test_resume_is_exact(tiny_setup, tmp_path):
    from accelerate import Accelerator

    envs, teachers = tiny_setup
    p = TINY.with_overrides(steps=4, stage1_steps=2, swad_start=1, checkpoint_freq=1, batch_per_domain=3,
                            n_converge=1, n_tolerance=1)
    acc = Accelerator(cpu=True)
    sources = source_environments(len(envs.names), [0])

    def run(directory, max_steps):
        return Run(p, RunSpec("ddg", 0, 0, sources, directory), envs, teachers, acc, max_steps=max_steps, quiet=True)

    straight = run(tmp_path / "a", 4)
    straight.train()
    run(tmp_path / "b", 3).train()
    resumed = run(tmp_path / "b", 4)
    resumed.train()
    for (k, v), (_, w) in zip(straight.module.state_dict().items(), resumed.module.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    assert straight.rows[-1]["loss"] == resumed.rows[-1]["loss"]


def test_domainbed_preset_runs_from_local_folders(tmp_path):
    """The real-data path (ImageFolder layout, augmentation, CLIP renormalisation, domain prompts, folders of
    weights) on a fake PACS and tiny CLIP / SD folders."""
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    from examples.common.tiny_text import build_word_tokenizer, tiny_text_encoder
    from tests.modules.test_sd_teacher import tiny_teacher

    words = ["a", "an", "photo", "of", "dog", "horse", "art", "painting", "cartoon", "sketch"]
    for env in ("art_painting", "cartoon", "photo", "sketch"):
        for cls in ("dog", "horse"):
            folder = tmp_path / "data" / "PACS" / env / cls
            folder.mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (20, 24), color=(40 * i, 100, 30)).save(folder / f"{i}.png")
    tok = build_word_tokenizer(words, tmp_path / "tok", max_length=8)
    text = tiny_text_encoder(tok, hidden_size=16, layers=1, projection_dim=8)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, num_channels=3, projection_dim=8)
    CLIPModel(CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.to_dict(),
                         projection_dim=8)).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    tiny_teacher(tmp_path, words).save_pretrained(tmp_path / "sd")
    out = tmp_path / "out"
    summary = train.main(["--preset", "pacs", "--data-dir", str(tmp_path / "data"),
                          "--clip-dir", str(tmp_path / "clip"), "--sd-dir", str(tmp_path / "sd"), "--out", str(out),
                          "--quiet", "--test-envs", "3",
                          "--steps", "3", "--stage1-steps", "1", "--swad-start", "1", "--checkpoint-freq", "1",
                          "--batch-per-domain", "2", "--image-size", "32", "--sd-resolution", "16",
                          "--num-workers", "0", "--n-converge", "1", "--n-tolerance", "1", "--conditioning", "both"])
    assert [r[0] for r in summary["table"]] == ["sketch", "avg"]
    ddg = next(r for r in summary["results"] if r["method"] == "ddg")
    assert ddg["steps"] == 3 and "swad_acc" in ddg
    with pytest.raises(SystemExit, match="--sd-dir"):
        train.main(["--preset", "pacs", "--data-dir", str(tmp_path / "data"), "--clip-dir", str(tmp_path / "clip"),
                    "--sd-dir", str(tmp_path / "missing"), "--out", str(out), "--quiet"])


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


def test_teacher_domains_never_include_a_test_domain():
    rc = RunConfig(preset=TINY, out=Path("."), methods=("ddg",), trial_seeds=(0,))
    assert teacher_sources(rc, 6, [0, 5], 0) == [1, 2, 3, 4]
    per_run = RunConfig(preset=TINY, out=Path("."), methods=("ddg",), trial_seeds=(0,), teachers_per_run=True)
    assert teacher_sources(per_run, 6, [0, 5], 5) == [0, 1, 2, 3, 4]
