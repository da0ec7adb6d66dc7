"""examples/ddis: synthesis resume (skips existing images, regenerates a missing one identically), the CAT stage
(only token rows move; a finished stage is not retrained), the DAG update under bf16 weights, preset plumbing and
missing-file errors, and the tiny preset end to end (a short world, slow)."""
from __future__ import annotations

import json
import math
import os
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
from examples.ddis import data, train  # noqa: E402
from examples.ddis.pipeline import Run, RunConfig, TokenContext, run_synthesis, run_tokens  # noqa: E402
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


def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def start(out, preset, stages=("tokens", "synthesize")):
    return Run.start(RunConfig(preset=preset, out=out, stages=stages, seed=7, quiet=True), accelerator(), "test")


def run_synth(sampler, out):
    with torch.no_grad():
        uncond = sampler.prompt_encoder([""])
    preset = PRESETS["tiny"].with_overrides(steps=3, images_per_class=2, synth_batch=3, save_size=None)
    run = start(out, preset)
    ctx = TokenContext(sampler, None, None, None, uncond)
    return run_synthesis(run, ctx, [f"a {n}" for n in NAMES], NAMES, out / "images")


def test_synthesis_resume_skips_existing_and_regenerates_identically(tmp_path):
    sampler, _ = tiny_sampler(tmp_path)
    out = tmp_path / "run"
    assert run_synth(sampler, out) == {"generated": 4, "total": 4}
    images = out / "images"
    files = sorted(images.rglob("*.png"))
    assert [f.relative_to(images).as_posix() for f in files] == [
        "0000_zero/00000.png", "0000_zero/00001.png", "0001_one/00000.png", "0001_one/00001.png"]
    original = {f: f.read_bytes() for f in files}
    stamps = {f: f.stat().st_mtime_ns for f in files}
    files[1].unlink()
    assert run_synth(sampler, out)["generated"] == 1
    assert files[1].read_bytes() == original[files[1]]  # per-image noise seeds + per-image DAG statistics
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f != files[1])
    assert run_synth(sampler, out)["generated"] == 0
    assert (out / "grids" / "all.png").is_file() and (out / "grids" / "0001_one.png").is_file()
    assert not list(images.glob("*/*.tmp.png"))
    data.check_complete(images, NAMES, 2)
    files[0].unlink()
    with pytest.raises(SystemExit, match="zero: 1 of 2 missing"):
        data.check_complete(images, NAMES, 2)


def test_cat_stage_moves_only_token_rows_and_keeps_a_finished_stage(tmp_path):
    sampler, teacher = tiny_sampler(tmp_path, bn_batch="batch")
    tokens = ClassAlignmentTokens(sampler.prompt_encoder.tokenizer, sampler.prompt_encoder.text_encoder, NAMES)
    before = {n: p.detach().clone() for n, p in sampler.prompt_encoder.text_encoder.named_parameters()}
    preset = PRESETS["tiny"].with_overrides(steps=3, cat_epochs=3, cat_prompts_per_epoch=1, cat_batch=2,
                                            cat_lr=0.01, cat_joint=False, cat_patience=5, cat_threshold=2.0,
                                            cat_grad_steps=3)  # the full gradient: small steps lower the loss
    with torch.no_grad():
        uncond = sampler.prompt_encoder([""])
    ctx = TokenContext(sampler, tokens, teacher, ClassifierPreprocess(), uncond)
    run = start(tmp_path / "run", preset)
    product = run_tokens(run, ctx)
    rows = product["rows"]
    assert [r["classes"] for r in rows] == ["0", "1"] and [r["epochs"] for r in rows] == [3, 3]
    assert run.step == 6  # one process: the classes one after another, one step per CAT epoch
    for name, p in sampler.prompt_encoder.text_encoder.named_parameters():
        changed = torch.nonzero((p - before[name]).abs().flatten(1).sum(1) if p.dim() > 1 else
                                (p - before[name]).abs()).flatten().tolist()
        assert changed == (sorted(tokens.token_ids) if name.endswith("token_embedding.weight") else [])
    torch.testing.assert_close(product["embeddings"], tokens.learned_embeddings(), rtol=0, atol=0)
    resumed = Run.start(RunConfig(preset=preset, out=tmp_path / "run", stages=("tokens", "synthesize"), seed=7,
                                  quiet=True, resume=True), accelerator(), "test")
    assert resumed.step == 6 and run_tokens(resumed, ctx)["rows"] == rows  # nothing retrained


def test_dag_update_survives_bf16_weights(tmp_path):
    """Under mixed precision the UNet and VAE hold bf16 weights; the latents and the DAG step stay fp32, so the
    update eta * grad (tiny against the latents) is not rounded away."""
    sampler, _ = tiny_sampler(tmp_path)
    sampler.teacher.model.to(torch.bfloat16)
    sampler.codec.vae.to(torch.bfloat16)
    sampler.eta = 1e-3
    with torch.no_grad():
        cond, uncond = sampler.prompt_encoder(["a zero", "a one"]), sampler.prompt_encoder([""])
    z = torch.randn(2, 4, 4, 4)
    moved, loss = sampler.guide(z, sampler.scheduler.timesteps[0], 1e-3, cond, uncond)
    assert moved.dtype == torch.float32 and math.isfinite(loss)
    step = (moved - z).abs()
    assert 0 < step.max() < 1e-2  # a small update, and it is there
    assert (z.to(torch.bfloat16).float() == moved.to(torch.bfloat16).float()).float().mean() > 0.5  # bf16 would lose it
    guided = sampler(cond, uncond, latents=z, num_inference_steps=3).latents
    plain = sampler(cond, uncond, latents=z, num_inference_steps=3, guided_steps=[]).latents
    assert guided.dtype == torch.float32 and not torch.equal(guided, plain)


def test_gpu_presets_fail_clearly_without_local_files(tmp_path):
    with pytest.raises(SystemExit, match="class-names"):
        train.main(["--preset", "imagenet_r34_r18", "--out", str(tmp_path), "--cpu"])
    with pytest.raises(SystemExit, match="teacher-ckpt"):
        train.main(["--preset", "pacs", "--out", str(tmp_path), "--cpu"])
    preset = train.build_preset(train.parse_args(["--preset", "pacs", "--eta", "0.001", "--steps", "50"]))
    assert (preset.eta, preset.steps, preset.num_classes, preset.scheduler) == (0.001, 50, 7, "pndm")
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "tiny", "--smoke"])  # a preset, not a flag


@pytest.mark.slow
def test_tiny_preset_short_world(tmp_path):
    import subprocess

    args = ["--preset", "tiny", "--out", str(tmp_path), "--quiet", "--world-teacher-epochs", "1", "--world-vae-steps",
            "2", "--world-unet-steps", "2", "--world-batch-size", "16", "--steps", "4", "--images-per-class", "2",
            "--synth-batch", "20", "--cat-epochs", "1", "--cat-prompts-per-epoch", "1", "--cat-batch", "10",
            "--kd-epochs", "1", "--kd-batch", "4"]
    proc = subprocess.run([sys.executable, "examples/ddis/train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "| dag_cat | 0 |" in results["table"] and (tmp_path / "results.md").is_file()
    for method in ("vanilla", "dag", "dag_cat"):
        assert len(list((tmp_path / "seed0" / method / "images").rglob("*.png"))) == 20
        assert (tmp_path / "seed0" / method / "grids" / "all.png").is_file()
        assert (tmp_path / "seed0" / method / "log.csv").is_file()
    assert (tmp_path / "seed0" / "dag_cat" / "export" / "class_tokens" / "learned_embeds.safetensors").is_file()
    dag, vanilla = results["runs"][1], results["runs"][0]
    assert dag["bn_loss"] != vanilla["bn_loss"]  # the guidance changed the set
