"""DP-DMD on Stable Diffusion 3.5 (docs/methods/dpdmd.md §2): local SD3.5-Medium-style weights, a prompt .txt file.

The teacher pipeline (transformer, VAE, CLIP-L/G and T5 encoders) is loaded once, frozen and not
sharded, as in the reference; the student (inside FewStepGenerator) and the fake score are two more
copies of the transformer, prepared by accelerate (FSDP with examples/dpdmd/accelerate_fsdp.yaml).
Each iteration takes a fresh batch of prompts per process and does what the TTUR schedule says.
Every ``ckpt_every`` iterations: a sample grid (PNG), the diversity metric (1 - mean pairwise cosine
of image embeddings of N seeds per prompt) and a resumable checkpoint. The final student is written
as a diffusers transformer folder (``<out>/student_transformer``) that StableDiffusion3Pipeline can
load in place of the original (4 steps, guidance_scale 1.0).
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ddg_losses import FlowMatchingNoise
from ddg_models import (FewStepGenerator, GuidedTeacher, PromptEncoder, VAECodec, set_attention_backend,
                        shifted_flow_sigmas)

from ..common.sample_metrics import mean_pairwise_cosine
from ..common.tables import write_json
from . import checkpoint
from .method import Distiller
from .presets import SD3Preset


@dataclass
class SD3Run:
    preset: SD3Preset
    model: Path                       # local StableDiffusion3Pipeline folder (SD3.5-Medium layout)
    prompts: Path                     # training prompts, one per line
    out: Path
    eval_prompts: Optional[Path] = None   # default: the first preset.eval_prompts training prompts
    diversity_model: Optional[Path] = None  # local CLIP vision / DINOv2 folder; None: no diversity metric
    max_steps: Optional[int] = None
    resume: bool = False
    quiet: bool = False
    attention_backend: str = "sdpa"           # ddg_models.set_attention_backend of the three SD3 transformers


def read_prompts(path: Path) -> List[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (one prompt per line)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def check_model_folder(path: Path) -> Path:
    path = Path(path)
    if not (path / "model_index.json").is_file() or not (path / "transformer").is_dir():
        raise FileNotFoundError(f"{path} is not a local StableDiffusion3Pipeline folder (no model_index.json or "
                                "transformer/); download stabilityai/stable-diffusion-3.5-medium there first")
    return path


def load_teacher_pipeline(path: Path, dtype: torch.dtype):
    """The frozen StableDiffusion3Pipeline; a folder without text_encoder_3 (T5) runs without it (zeros)."""
    from diffusers import StableDiffusion3Pipeline

    path = check_model_folder(path)
    no_t5 = {} if (path / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, **no_t5)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe


@torch.no_grad()
def encode_prompts(encoder: PromptEncoder, prompts: List[str]):
    """(cond, uncond) conditionings of SD3Transformer2DModel; the negative prompt is "" as in the reference."""
    return encoder(prompts), encoder([""] * len(prompts))


def latent_shape(pipe, batch: int, resolution: int):
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if resolution % (factor * pipe.transformer.config.patch_size):
        raise ValueError(f"resolution {resolution} must be a multiple of {factor * pipe.transformer.config.patch_size}")
    return (batch, pipe.transformer.config.in_channels, resolution // factor, resolution // factor)


@torch.no_grad()
def evaluate(generator, pipe, embedder, prompts: List[str], p: SD3Preset, accelerator, grid_path: Path) -> Dict:
    """N = eval_images_per_prompt images per prompt (seeds 0..N-1, 4 steps, no CFG); per prompt
    1 - mean pairwise cosine of their embeddings, averaged over prompts. Prompts are sharded over the
    processes, padded to equal counts: under FSDP every rank must run the same generator forwards."""
    from torchvision.utils import save_image

    world, rank, n = accelerator.num_processes, accelerator.process_index, p.eval_images_per_prompt
    per_rank = math.ceil(len(prompts) / world)
    mine = [(i * world + rank) for i in range(per_rank)]
    diversities, grid = [], []
    for index in mine:
        prompt = prompts[index % len(prompts)]
        cond = PromptEncoder.from_pipeline(pipe, p.max_sequence_length)([prompt] * n)
        noise = torch.cat([torch.randn(latent_shape(pipe, 1, p.resolution), generator=torch.Generator().manual_seed(s))
                           for s in range(n)]).to(accelerator.device, pipe.transformer.dtype)
        images = VAECodec(pipe.vae).to_images(generator(noise, cond).sample)
        if embedder is not None:
            div = 1 - mean_pairwise_cosine(embedder(images))
            diversities.append(torch.stack([div.float(), torch.tensor(float(index < len(prompts)))]))
        if accelerator.is_main_process and len(grid) < 4:
            grid.append(images.cpu())
    if accelerator.is_main_process and grid:
        save_image(torch.cat(grid), grid_path, nrow=n)
    result = {"grid": str(grid_path)}
    if embedder is not None:
        values = accelerator.gather(torch.stack(diversities).to(accelerator.device)).cpu()
        kept = values[values[:, 1] > 0, 0]  # drop the padding prompts
        result["diversity"] = float(kept.mean())
    return result


def run_sd3(run: SD3Run, accelerator) -> Dict:
    from diffusers import SD3Transformer2DModel
    from tqdm.auto import tqdm

    from ..common.vision_embedder import VisionEmbedder

    p, out = run.preset, Path(run.out)
    dtype = torch.bfloat16 if p.weights_dtype == "bf16" else torch.float32
    prompts = read_prompts(run.prompts)
    eval_prompts = read_prompts(run.eval_prompts) if run.eval_prompts else prompts[:p.eval_prompts]
    pipe = load_teacher_pipeline(run.model, dtype).to(accelerator.device)
    shift = float(pipe.scheduler.config.shift)
    embedder = VisionEmbedder(run.diversity_model, accelerator.device) if run.diversity_model else None
    torch.manual_seed(p.seed)
    student = SD3Transformer2DModel.from_pretrained(run.model, subfolder="transformer", dtype=dtype)
    fake = SD3Transformer2DModel.from_pretrained(run.model, subfolder="transformer", dtype=dtype)
    for model in (pipe.transformer, student, fake):
        set_attention_backend(model, run.attention_backend)
    if p.gradient_checkpointing:  # steps 1..3 of the rollout are kept for backward: recompute them
        student.enable_gradient_checkpointing()
        fake.enable_gradient_checkpointing()
    c = p.distill
    generator = FewStepGenerator(student.train(), p.student_steps, shift, c.detach_first_step)
    teacher = GuidedTeacher(pipe.transformer, "velocity", c.guidance_scale)
    prompt_encoder = PromptEncoder.from_pipeline(pipe, p.max_sequence_length)
    gen_opt = torch.optim.AdamW(generator.parameters(), lr=p.lr_generator, weight_decay=0.0)
    fake_opt = torch.optim.AdamW(fake.train().parameters(), lr=p.lr_fake, weight_decay=0.0)
    generator, fake, gen_opt, fake_opt = accelerator.prepare(generator, fake, gen_opt, fake_opt)
    schedule = FlowMatchingNoise(shifted_flow_sigmas(1000, shift)[:-1], per_sample=p.per_sample_timesteps)
    distiller = Distiller(c, accelerator, generator, teacher, fake, gen_opt, fake_opt, schedule, schedule)

    world, batch = accelerator.num_processes, p.batch_size
    total = p.epochs * len(prompts) // (batch * world)
    total = min(total, run.max_steps) if run.max_steps else total
    if total < 1:
        raise ValueError(f"{len(prompts)} prompts give no iteration at {batch} x {world} prompts per iteration")
    out.mkdir(parents=True, exist_ok=True)
    state = (checkpoint.load(accelerator, out / "checkpoint") if run.resume else None) or \
        {"iteration": 0, "rows": [], "evals": []}
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(p.seed)).tolist()
    accelerator.print(f"DP-DMD {p.name}: {total} iterations of {batch} x {world} prompts, from {state['iteration']}; "
                      f"fp32 DMD gradient, global (FSDP-aware) gradient clipping {c.clip_norm}")
    quiet = run.quiet or not accelerator.is_main_process
    for it in tqdm(range(state["iteration"], total), desc="dp-dmd", disable=quiet):
        start = (it * world + accelerator.process_index) * batch
        batch_prompts = [prompts[order[(start + j) % len(prompts)]] for j in range(batch)]
        cond, uncond = encode_prompts(prompt_encoder, batch_prompts)
        # Same seed on every rank for the noise and the timestep, as the reference (docs/methods/dpdmd.md §2.3).
        rng = torch.Generator().manual_seed(p.seed + it)
        noise = torch.randn(latent_shape(pipe, batch, p.resolution), generator=rng).to(accelerator.device, dtype)
        logs = distiller.step(it, noise, cond, uncond, generator=rng)
        state["rows"].append({"iteration": it + 1, **logs})
        if (it + 1) % p.ckpt_every == 0 or it + 1 == total:
            generator.eval()
            ev = evaluate(generator, pipe, embedder, eval_prompts, p, accelerator, out / f"samples_{it + 1:06d}.png")
            generator.train()
            state["evals"].append({"iteration": it + 1, **ev})
            accelerator.print(f"iteration {it + 1}: {ev}")
            state["iteration"] = it + 1
            checkpoint.save(accelerator, out / "checkpoint", state)
            if accelerator.is_main_process:
                write_logs(out, state)
    save_student(accelerator, generator, out / "student_transformer")
    if accelerator.is_main_process:
        write_json(out / "config.json", {"preset": asdict(p), "model": str(run.model), "prompts": str(run.prompts),
                                          "world_size": world, "deviations": ["fp32 DMD gradient (docs/methods/dpdmd.md §2.7)",
                                                                              "global FSDP gradient clipping"]})
    return state


def write_logs(out: Path, state: Dict) -> None:
    for name, rows in (("log.csv", state["rows"]), ("eval.csv", state["evals"])):
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "iteration", k))
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)


def save_student(accelerator, generator, directory: Path) -> None:
    """The student transformer as a diffusers folder (full state dict gathered from the FSDP shards)."""
    state = accelerator.get_state_dict(generator)  # collective under FSDP: every rank calls it
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(generator).model
        prefix = "model."
        student.save_pretrained(directory, state_dict={k[len(prefix):]: v for k, v in state.items()
                                                       if k.startswith(prefix)})
