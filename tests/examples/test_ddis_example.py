"""examples/ddis: synthesis resume (skips existing images, regenerates a missing one identically), the CAT loop
(only token rows move, finished groups are skipped on restart), KD (loss goes down, resume continues), preset
plumbing and missing-file errors, and the tiny preset end to end (smoke)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

for _module in ("diffusers", "transformers", "accelerate", "sklearn", "tqdm", "safetensors", "torchvision"):
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ddg_losses import BNGuidanceLoss  # noqa: E402
from ddg_models import (ClassAlignmentTokens, ClassifierPreprocess, DAGSampler, GuidedTeacher,  # noqa: E402
                        PromptEncoder, VAECodec)
from examples.common.tiny_text import build_word_tokenizer, tiny_text_encoder  # noqa: E402
from examples.ddis import cat, distill, synthesize, train  # noqa: E402
from examples.ddis.presets import PRESETS  # noqa: E402
from examples.ddis.tiny_world import TinyBNNet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("zero", "one")


def tiny_sampler(tmp_path, bn_batch="per_image"):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(("a",) + NAMES, tmp_path / "tok")
    encoder = tiny_text_encoder(tokenizer, hidden_size=16, layers=1, heads=2, projection_dim=16)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, layers_per_block=1, norm_num_groups=4)
    teacher = TinyBNNet((4, 8), num_classes=2)
    for part in (unet, vae, encoder, teacher):
        part.requires_grad_(False).eval()
    sampler = DAGSampler(GuidedTeacher(unet, "epsilon", 2.0), VAECodec(vae),
                         DDIMScheduler(clip_sample=False, timestep_spacing="trailing"),
                         BNGuidanceLoss(teacher, ClassifierPreprocess(), batch=bn_batch),
                         prompt_encoder=PromptEncoder.clip(tokenizer, encoder), eta=0.5)
    return sampler, teacher


def run_synthesis(sampler, out, per_class=2):
    with torch.no_grad():
        uncond = sampler.prompt_encoder([""])
    return synthesize.synthesize(sampler, [f"a {n}" for n in NAMES], NAMES, out, per_class=per_class, batch_size=3,
                                 steps=3, seed=7, uncond=uncond, quiet=True)


def test_synthesis_resume_skips_existing_and_regenerates_identically(tmp_path):
    sampler, _ = tiny_sampler(tmp_path)
    out = tmp_path / "images"
    assert run_synthesis(sampler, out) == {"generated": 4, "total": 4}
    files = sorted(out.rglob("*.png"))
    assert [f.relative_to(out).as_posix() for f in files] == [
        "0000_zero/00000.png", "0000_zero/00001.png", "0001_one/00000.png", "0001_one/00001.png"]
    original = {f: f.read_bytes() for f in files}
    stamps = {f: f.stat().st_mtime_ns for f in files}
    files[1].unlink()
    assert run_synthesis(sampler, out)["generated"] == 1
    assert files[1].read_bytes() == original[files[1]]  # per-image noise seeds + per-image DAG statistics
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f != files[1])
    assert run_synthesis(sampler, out)["generated"] == 0
    grids = synthesize.save_class_grids(out, NAMES, 2, tmp_path / "grids")
    assert (grids / "all.png").is_file() and (grids / "0001_one.png").is_file()
    assert not list(out.glob("*.tmp.png"))


def test_cat_loop_moves_only_token_rows_and_skips_finished_groups(tmp_path):
    sampler, teacher = tiny_sampler(tmp_path, bn_batch="batch")
    tokens = ClassAlignmentTokens(sampler.prompt_encoder.tokenizer, sampler.prompt_encoder.text_encoder, NAMES)
    before = {n: p.detach().clone() for n, p in sampler.prompt_encoder.text_encoder.named_parameters()}
    preset = PRESETS["tiny"].with_overrides(steps=3, cat_epochs=3, cat_prompts_per_epoch=1, cat_batch=2,
                                            cat_lr=0.01, cat_joint=False, cat_patience=5, cat_threshold=2.0,
                                            cat_grad_steps=3)  # the full gradient: small steps lower the loss
    with torch.no_grad():
        uncond = sampler.prompt_encoder([""])
    rows = cat.train_class_tokens(sampler, tokens, teacher, ClassifierPreprocess(), preset, tmp_path / "cat",
                                  uncond, quiet=True, log=lambda m: None)
    assert [r["classes"] for r in rows] == ["0"] * 3 + ["1"] * 3 and all(r["grad_norm"] > 0 for r in rows)
    for name, p in sampler.prompt_encoder.text_encoder.named_parameters():
        changed = torch.nonzero((p - before[name]).abs().flatten(1).sum(1) if p.dim() > 1 else
                                (p - before[name]).abs()).flatten().tolist()
        # A group keeps the rows of its lowest-loss epoch: they moved unless that was epoch 0.
        moved = [tokens.token_ids[int(g)] for g in "01"
                 if min((r for r in rows if r["classes"] == g), key=lambda r: r["loss"])["epoch"] > 0]
        assert moved and changed == (moved if name.endswith("token_embedding.weight") else [])
    state = json.loads((tmp_path / "cat" / cat.STATE).read_text())
    assert state["done"] == ["0", "1"]
    again = cat.train_class_tokens(sampler, tokens, teacher, ClassifierPreprocess(), preset, tmp_path / "cat",
                                   uncond, quiet=True, log=lambda m: None)
    assert again == state["rows"]  # nothing retrained
    fresh_tok = build_word_tokenizer(("a",) + NAMES, tmp_path / "tok2")
    fresh = ClassAlignmentTokens(fresh_tok, tiny_text_encoder(fresh_tok, hidden_size=16, layers=1, heads=2,
                                                              projection_dim=16), NAMES)
    fresh.load_embeddings(tmp_path / "cat" / cat.TOKENS)
    torch.testing.assert_close(fresh.learned_embeddings(), tokens.learned_embeddings())


def test_kd_learns_the_teacher_and_resumes(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    teacher = TinyBNNet((4, 8), num_classes=3).eval()
    x = torch.rand(48, 1, 16, 16)
    y = teacher(x).argmax(1)
    loader = DataLoader(TensorDataset(x, torch.zeros(48, dtype=torch.long)), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    test = DataLoader(TensorDataset(x, y), batch_size=48)
    preset = PRESETS["tiny"].with_overrides(kd_epochs=2, kd_lr=1e-2)
    student = TinyBNNet((4, 8), num_classes=3)
    rows = distill.distill(teacher, student, loader, preset, tmp_path / "kd", test_loader=test, quiet=True,
                           log=lambda m: None)
    assert [r["epoch"] for r in rows] == [1, 2] and "student_test_acc" in rows[0]
    more = distill.distill(teacher, TinyBNNet((4, 8), num_classes=3), loader,
                           preset.with_overrides(kd_epochs=12), tmp_path / "kd", test_loader=test, resume=True,
                           quiet=True, log=lambda m: None)
    assert [r["epoch"] for r in more] == list(range(1, 13)) and more[:2] == rows
    assert more[-1]["kd_loss"] < more[0]["kd_loss"]
    assert (tmp_path / "kd" / "kd.csv").read_text().count("\n") == 13


def test_gpu_presets_fail_clearly_without_local_files(tmp_path):
    with pytest.raises(SystemExit, match="class-names"):
        train.main(["--preset", "imagenet_r34_r18", "--out", str(tmp_path), "--cpu"])
    with pytest.raises(SystemExit, match="teacher-ckpt"):
        train.main(["--preset", "pacs", "--out", str(tmp_path), "--cpu"])
    preset = train.build_preset(train.parse_args(["--preset", "pacs", "--eta", "0.001", "--steps", "50"]))
    assert (preset.eta, preset.steps, preset.num_classes, preset.scheduler) == (0.001, 50, 7, "pndm")


@pytest.mark.slow
def test_tiny_preset_smoke(tmp_path):
    rows = train.main(["--preset", "tiny", "--smoke", "--out", str(tmp_path), "--quiet"])
    assert [r[0] for r in rows] == ["vanilla", "dag", "dag_cat", "real digits (reference)"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "| dag_cat | 0 |" in results["table"] and (tmp_path / "results.md").is_file()
    for method in ("vanilla", "dag", "dag_cat"):
        assert len(list((tmp_path / "seed0" / method / "images").rglob("*.png"))) == 20
        assert (tmp_path / "seed0" / method / "grids" / "all.png").is_file()
        assert (tmp_path / "seed0" / method / "kd" / "kd.csv").is_file()
    assert (tmp_path / "seed0" / "dag_cat" / "cat" / "tokens" / "learned_embeds.safetensors").is_file()
    dag, vanilla = results["runs"][1], results["runs"][0]
    assert dag["bn_loss"] != vanilla["bn_loss"]  # the guidance changed the set


def save_tiny_stable_diffusion(directory: Path) -> None:
    """A diffusers Stable Diffusion directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/) of tiny parts."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    from examples.ddis.presets import PACS_CLASSES

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(("a",) + PACS_CLASSES, directory / "tokenizer")
    tokenizer.save_pretrained(directory / "tokenizer")
    tiny_text_encoder(tokenizer, hidden_size=16, layers=1, heads=2, projection_dim=16).save_pretrained(
        directory / "text_encoder")
    UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=8, norm_num_groups=8).save_pretrained(directory / "unet")
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                  norm_num_groups=4).save_pretrained(directory / "vae")
    PNDMScheduler(skip_prk_steps=True, steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012).save_pretrained(directory / "scheduler")


@pytest.mark.slow
def test_stable_diffusion_preset_end_to_end_and_resume(tmp_path):
    """The PACS preset's whole path (PNDM, z_t DAG at 224, per-class CAT, ImageFolder synthesis, KD with a
    torchvision student) on tiny SD parts and a random ResNet-18 teacher checkpoint; a rerun redoes nothing."""
    from ddg_models import build_classifier

    save_tiny_stable_diffusion(tmp_path / "sd")
    torch.manual_seed(0)
    torch.save(build_classifier("resnet18", 7).state_dict(), tmp_path / "teacher.pth")
    args = ["--preset", "pacs", "--pretrained-model", str(tmp_path / "sd"), "--teacher", "resnet18",
            "--teacher-ckpt", str(tmp_path / "teacher.pth"), "--out", str(tmp_path / "run"), "--cpu", "--quiet",
            "--steps", "2", "--images-per-class", "1", "--cat-epochs", "1", "--cat-prompts-per-epoch", "1",
            "--kd-epochs", "1", "--kd-batch", "4", "--num-workers", "0", "--test-root", str(tmp_path / "run" / "images"),
            "--resume"]
    first = train.main(args)
    assert [r["classes"] for r in first["cat"]] == [str(c) for c in range(7)]
    assert first["synthesis"] == {"generated": 7, "total": 7} and len(first["kd"]) == 1
    assert "student_test_acc" in first["kd"][0]
    second = train.main(args)
    assert second["cat"] == first["cat"] and second["synthesis"]["generated"] == 0 and second["kd"] == first["kd"]
