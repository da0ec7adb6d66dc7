"""DP-DMD on Stable Diffusion 3.5 (docs/methods/dpdmd.md §2): the run's data, loop, logs, checkpoints and export.

The teacher pipeline (transformer, VAE, CLIP-L/G and the optional T5) is loaded once in the preset's weights dtype,
frozen and not prepared, as in the reference. The student (inside FewStepGenerator) and the fake score are two
more copies of the transformer with fp32 master weights, prepared by accelerate (DDP, or FSDP with
examples/dpdmd/accelerate_fsdp.yaml); --mixed-precision bf16 gives them bf16 compute.

One *step* is one iteration of the TTUR schedule, which in DP-DMD's 'alternate' mode is exactly one optimizer
update (the fake score's or the student's): ``--max-steps`` and ``ckpt_every`` count both. Every ``ckpt_every``
steps: a sample grid, the diversity metric (1 - mean pairwise cosine of image embeddings of N seeds per prompt)
and a checkpoint (examples/common/checkpoint.py: models, optimizers, every RNG, the log rows); the last step is
evaluated too, and exported rather than checkpointed; ``--max-steps N`` checkpoints at N and stops. The student
is exported once, at the end, as a diffusers folder (``<out>/export/student_transformer``) that
StableDiffusion3Pipeline loads in place of ``transformer`` (4 steps, guidance_scale 1.0).

Randomness: the models come from the weights (no random init); each rank draws its noise and DMD timesteps from
its own stream (``noise_per_rank``; examples/common/seeding.py), prompts are dealt to the ranks by a permutation
of (seed, epoch), and evaluation noise is fixed per image seed. A resumed run restores all of it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ddg_losses import FlowMatchingNoise
from ddg_models import FewStepGenerator, GuidedTeacher, PromptEncoder, VAECodec, set_attention_backend, \
    shifted_flow_sigmas

from ..common import checkpoint
from ..common.runlog import RunLog, write_results
from ..common.sample_metrics import mean_pairwise_cosine
from ..common.seeding import rank_generator, seed_rank_stream, shared_generator
from ..common.staged_run import StopRun
from .method import Distiller
from .presets import SD3Preset

STAGE = "distill"
COLUMNS = ["step", "phase", "fake_loss", "dmd_loss", "anchor_loss", "dmd_denom", "fake_grad_norm",
           "generator_grad_norm", "diversity", "image_mean", "image_std"]
PANELS = {"loss": ("fake_loss", "dmd_loss", "anchor_loss"), "diversity": ("diversity",)}
DEVIATIONS = ["fp32 DMD gradient (docs/methods/dpdmd.md §2.7)", "global FSDP gradient clipping",
              "fp32 master weights and AdamW states for student and fake score (bf16 compute)"]
EXPORT = Path("export") / "student_transformer"


@dataclass
class RunConfig:
    preset: SD3Preset
    out: Path
    model: Path                               # local StableDiffusion3Pipeline folder (SD3.5-Medium layout)
    prompts: Path                             # training prompts, one per line
    eval_prompts: Optional[Path] = None       # default: the first preset.eval_prompts training prompts
    diversity_model: Optional[Path] = None    # local CLIP vision / DINOv2 folder; None: no diversity metric
    mixed_precision: str = "no"
    max_steps: Optional[int] = None
    resume: bool = False
    quiet: bool = False
    attention_backend: str = "sdpa"           # ddg_models.set_attention_backend of the three SD3 transformers
    keep_checkpoints: int = 2

    def settings(self) -> Dict:
        """What changes the results (the checkpoint fingerprint): not out, resume, max_steps, quiet."""
        return {"preset": asdict(self.preset), "model": str(self.model), "prompts": str(self.prompts),
                "eval_prompts": str(self.eval_prompts), "diversity_model": str(self.diversity_model),
                "mixed_precision": self.mixed_precision, "attention_backend": self.attention_backend}


_NUMBERED = re.compile(r"^\d+ --- ")  # the reference's prompt files may number their lines "17 --- a cat"


def read_prompts(path: Path) -> List[str]:
    """One prompt per non-empty line (UTF-8), without the reference's optional ``N --- `` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (one prompt per line)")
    prompts = [_NUMBERED.sub("", line.strip()) for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
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
    """The frozen StableDiffusion3Pipeline; a folder without text_encoder_3 (T5) runs without it (zeros).
    ``torch_dtype``: the keyword every diffusers release since 0.30 honours."""
    from diffusers import StableDiffusion3Pipeline

    path = check_model_folder(path)
    no_t5 = {} if (path / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype, **no_t5)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe


def load_trainable_transformer(path: Path):
    """A trainable copy of the pipeline's transformer with fp32 master weights (whatever the files' dtype)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(check_model_folder(path), subfolder="transformer",
                                                 torch_dtype=torch.float32).train()


@torch.no_grad()
def encode_prompts(encoder: PromptEncoder, prompts: List[str]):
    """(cond, uncond) conditionings in fp32 (the student's and fake score's input dtype; the teacher casts them to
    its own at its boundary). The negative prompt is "" as in the reference."""
    fp32 = lambda c: {k: v.float() for k, v in c.items()}  # noqa: E731
    return fp32(encoder(prompts)), fp32(encoder([""] * len(prompts)))


def latent_shape(pipe, batch: int, resolution: int):
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if resolution % (factor * pipe.transformer.config.patch_size):
        raise ValueError(f"resolution {resolution} must be a multiple of {factor * pipe.transformer.config.patch_size}")
    return (batch, pipe.transformer.config.in_channels, resolution // factor, resolution // factor)


class FixedGridGenerator(FewStepGenerator):
    """FewStepGenerator whose sigma grid is a plain tensor attribute, not a buffer. The generator is what
    accelerate wraps (under FSDP the root unit, so that the timesteps it computes enter the transformer unchanged),
    and FSDP's mixed precision casts the buffers of what it wraps: a bf16 grid is 1, 0.8594, 0.6016, 0.0089
    instead of 1, 0.8577, 0.6022, 0.0089, and the student would train on other timesteps than it samples with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        grid = self._buffers.pop("sigmas")
        self.sigmas = grid  # only read through .tolist(): its device does not matter


def prepare_generator(accelerator, student, optimizer, p: SD3Preset, shift: float):
    """The few-step generator over the student, prepared with its optimizer."""
    generator = FixedGridGenerator(student, p.student_steps, shift, p.distill.detach_first_step)
    return accelerator.prepare(generator, optimizer)


def full_state_dict(module) -> Dict[str, torch.Tensor]:
    """The whole state dict of a prepared module on the main process (CPU tensors; other ranks get {}): gathered
    from the shards under FSDP1 or FSDP2 (a collective: every rank calls it), unwrapped from DDP otherwise."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if dist.is_available() and dist.is_initialized() and any(
            isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules()):
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    while hasattr(module, "module"):  # DDP (accelerate's autocast wrapper keeps the module itself)
        module = module.module
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def export_student(accelerator, generator, directory: Path) -> None:
    """The student transformer as a diffusers folder (safetensors, fp32 master weights), written once by the main
    process. diffusers' ``save_pretrained`` saves the module's own tensors (a shard under FSDP) and has no
    state-dict argument, so the gathered state dict is loaded into an unsharded transformer built on the meta
    device from the student's config, which is then saved."""
    from diffusers import SD3Transformer2DModel

    state = full_state_dict(generator)
    if accelerator.is_main_process:
        prefix = "model."
        student = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        config = _inner(generator).model.config
        with torch.device("meta"):
            model = SD3Transformer2DModel.from_config(config)
        model.load_state_dict(student, strict=True, assign=True)
        model.save_pretrained(directory, safe_serialization=True)
    accelerator.wait_for_everyone()


def _inner(module):
    """The module under the DDP / FSDP1 wrappers (FSDP2 keeps the module itself)."""
    while hasattr(module, "module") or hasattr(module, "_fsdp_wrapped_module"):
        module = getattr(module, "_fsdp_wrapped_module", None) or module.module
    return module


@torch.no_grad()
def evaluate(generator, pipe, embedder, prompts: List[str], p: SD3Preset, accelerator=None,
             grid_path: Optional[Path] = None) -> Dict[str, float]:
    """N = eval_images_per_prompt images per prompt (image seeds 0..N-1, 4 steps, no CFG); per prompt
    1 - mean pairwise cosine of their embeddings, averaged over prompts; the mean and std of all images' pixels.
    Each prompt is evaluated by one rank (prompt i on rank i mod world), the per-prompt values gathered and
    reduced in prompt order, so the numbers do not depend on the process count. The ranks run equally many
    generator forwards (padding prompts, dropped): under FSDP every forward is a collective. Without an
    accelerator: one process on the pipeline's device."""
    from torchvision.utils import save_image

    n = p.eval_images_per_prompt
    world, rank = (1, 0) if accelerator is None else (accelerator.num_processes, accelerator.process_index)
    device = pipe.transformer.device if accelerator is None else accelerator.device
    is_main = accelerator is None or accelerator.is_main_process
    encoder = PromptEncoder.from_pipeline(pipe, p.max_sequence_length)
    rows, grid = [], []
    for i in range(math.ceil(len(prompts) / world)):
        index = i * world + rank
        cond, _ = encode_prompts(encoder, [prompts[index % len(prompts)]] * n)
        noise = torch.cat([torch.randn(latent_shape(pipe, 1, p.resolution), generator=torch.Generator().manual_seed(s))
                           for s in range(n)]).to(device)
        images = VAECodec(pipe.vae).to_images(generator(noise, cond).sample).float()
        div = 1 - mean_pairwise_cosine(embedder(images)) if embedder is not None else torch.tensor(float("nan"))
        rows.append(torch.tensor([float(index), float(index < len(prompts)), float(div), images.double().mean(),
                                  images.double().square().mean()], dtype=torch.float64))
        if index < len(prompts) and len(grid) < 4:
            grid.append(images.cpu())
    values = torch.stack(rows)
    if accelerator is not None:
        values = accelerator.gather(values.to(device)).cpu()
    values = values[values[:, 1] > 0]
    values = values[values[:, 0].argsort()]  # prompt order: the same sums whatever the process count
    mean, square = float(values[:, 3].mean()), float(values[:, 4].mean())
    result = {"image_mean": mean, "image_std": math.sqrt(max(square - mean * mean, 0.0))}
    if embedder is not None:
        result["diversity"] = float(values[:, 2].mean())
    if grid_path is not None and is_main and grid:
        save_image(torch.cat(grid), grid_path, nrow=n)
    return result


def build_embedder(path: Optional[Path], device):
    from ..common.vision_embedder import VisionEmbedder

    return VisionEmbedder(path, device) if path else None


def prompts_of(step: int, rank: int, world: int, batch: int, prompts: List[str], seed: int) -> List[str]:
    """The prompts of ``rank`` at ``step``: one pass over a permutation of (seed, epoch) per epoch, dealt in
    contiguous blocks of ``batch`` to the ranks (the reference's sharded loader, reshuffled every epoch)."""
    if not prompts or min(batch, world) < 1 or not 0 <= rank < world or step < 0:
        raise ValueError(f"prompts_of: expected prompts, batch >= 1, world >= 1, 0 <= rank < world and step >= 0, "
                         f"got {len(prompts)} prompts, batch {batch}, world {world}, rank {rank}, step {step}")
    per_step = batch * world
    out = []
    for j in range(batch):
        position = step * per_step + rank * batch + j
        epoch, k = divmod(position, len(prompts))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 1_000 + epoch))
        out.append(prompts[int(order[k])])
    return out


def total_steps(p: SD3Preset, num_prompts: int, world: int) -> int:
    total = p.iterations if p.iterations is not None else p.epochs * num_prompts // (p.batch_size * world)
    if total < 1:
        raise ValueError(f"{num_prompts} prompts give no step at {p.batch_size} x {world} prompts per step")
    return total


def run(rc: RunConfig, accelerator) -> Dict:
    from tqdm.auto import tqdm

    p, out = rc.preset, Path(rc.out)
    world, rank = accelerator.num_processes, accelerator.process_index
    teacher_dtype = torch.bfloat16 if p.weights_dtype == "bf16" else torch.float32
    prompts = read_prompts(rc.prompts)
    eval_prompts = read_prompts(rc.eval_prompts) if rc.eval_prompts else prompts[:p.eval_prompts]
    pipe = load_teacher_pipeline(rc.model, teacher_dtype).to(accelerator.device)
    shift = float(pipe.scheduler.config.shift)
    embedder = build_embedder(rc.diversity_model, accelerator.device)
    student, fake = load_trainable_transformer(rc.model), load_trainable_transformer(rc.model)
    for model in (pipe.transformer, student, fake):
        set_attention_backend(model, rc.attention_backend)
    if p.gradient_checkpointing:  # steps 1..3 of the rollout are kept for backward: recompute them
        student.enable_gradient_checkpointing()
        fake.enable_gradient_checkpointing()
    c = p.distill
    gen_opt = torch.optim.AdamW(student.parameters(), lr=p.lr_generator, weight_decay=0.0)
    fake_opt = torch.optim.AdamW(fake.parameters(), lr=p.lr_fake, weight_decay=0.0)
    generator, gen_opt = prepare_generator(accelerator, student, gen_opt, p, shift)
    fake, fake_opt = accelerator.prepare(fake, fake_opt)
    teacher = GuidedTeacher(pipe.transformer, "velocity", c.guidance_scale)
    prompt_encoder = PromptEncoder.from_pipeline(pipe, p.max_sequence_length)
    schedule = FlowMatchingNoise(shifted_flow_sigmas(1000, shift)[:-1], per_sample=p.per_sample_timesteps)
    distiller = Distiller(c, accelerator, generator, teacher, fake, gen_opt, fake_opt, schedule, schedule)

    total = total_steps(p, len(prompts), world)
    noise_rng = rank_generator(p.seed, rank) if p.noise_per_rank else shared_generator(p.seed)
    generators = {"noise": noise_rng}
    log = RunLog(out, accelerator.is_main_process, COLUMNS, x="step", panels=PANELS, title=f"DP-DMD {p.name}",
                 log_y=("loss",))
    ckpt_root, step = out / "checkpoints", 0
    ckpt = checkpoint.latest(ckpt_root, rc.settings(), world) if rc.resume else None
    if ckpt is not None:
        checkpoint.load(ckpt, accelerator, STAGE, generators)
        step = ckpt.step
        log.restore(ckpt.state["rows"])
        accelerator.print(f"resuming from {ckpt.path} (step {step})")
    else:
        if rc.resume:
            accelerator.print(f"--resume: no checkpoint in {ckpt_root}; starting from the beginning")
        seed_rank_stream(p.seed, rank)
    accelerator.print(f"DP-DMD {p.name}: {total} steps of {p.batch_size} x {world} prompts from step {step}; fp32 "
                      f"DMD gradient, global (FSDP-aware) gradient clipping {c.clip_norm}")

    def save():
        checkpoint.save(ckpt_root, accelerator, stage=STAGE, step=step, settings=rc.settings(),
                        state={"rows": log.rows, "products": {}}, generators=generators, keep=rc.keep_checkpoints)

    if rc.max_steps is not None and step >= rc.max_steps:
        raise StopRun
    bar = tqdm(total=total, initial=step, desc="dp-dmd", disable=rc.quiet or not accelerator.is_local_main_process)
    while step < total:
        cond, uncond = encode_prompts(prompt_encoder, prompts_of(step, rank, world, p.batch_size, prompts, p.seed))
        noise = torch.randn(latent_shape(pipe, p.batch_size, p.resolution), generator=noise_rng)
        logs = distiller.step(step, noise.to(accelerator.device), cond, uncond, generator=noise_rng)
        step += 1
        bar.update(1)
        row = {"step": step, "phase": "+".join(distiller.ttur.phases(step - 1)), **_mean_over_ranks(accelerator, logs)}
        if step % p.ckpt_every == 0 or step == total:
            generator.eval()
            row.update(evaluate(generator, pipe, embedder, eval_prompts, p, accelerator,
                                out / f"samples_{step:06d}.png"))
            generator.train()
            if not rc.quiet:
                accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                               if isinstance(v, float)))
        log.add(row)
        if step % p.ckpt_every == 0 or step == rc.max_steps:
            save()
        if step == rc.max_steps:  # also at the last step: the export and results come with the final --resume
            bar.close()
            log.close()
            raise StopRun
    bar.close()
    log.close()
    export_student(accelerator, generator, out / EXPORT)
    last_eval = next(r for r in reversed(log.rows) if "image_mean" in r)
    metrics = {k: last_eval[k] for k in ("diversity", "image_mean", "image_std") if k in last_eval}
    for key in ("fake_loss", "dmd_loss", "anchor_loss"):  # the last update of each network
        last = next((r[key] for r in reversed(log.rows) if key in r), None)
        if last is not None:
            metrics[f"last_{key}"] = last
    results = {"preset": p.name, "metrics": metrics, "steps": total, "world_size": world,
               "mixed_precision": rc.mixed_precision, "model": str(rc.model), "prompts": str(rc.prompts),
               "eval_prompts": None if rc.eval_prompts is None else str(rc.eval_prompts),
               "diversity_model": None if rc.diversity_model is None else str(rc.diversity_model),
               "export": str(EXPORT), "preset_fields": asdict(p), "deviations": DEVIATIONS}
    write_results(out, results, accelerator.is_main_process)
    return results


def _mean_over_ranks(accelerator, logs: Dict[str, float]) -> Dict[str, float]:
    """The losses averaged over the ranks (each saw its own prompts); gradient norms are global already."""
    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, "mean")
    return {k: (float(v) if "grad_norm" not in k else logs[k]) for k, v in zip(keys, values.tolist())}


def evaluate_export(out: Path, mixed_precision: str = "no") -> Dict[str, float]:
    """The last evaluation of a finished run, redone from its exported student on one process (no process group
    or accelerator state is created): what a user loading ``<out>/export/student_transformer`` with
    ``from_pretrained`` gets. Under bf16 the generator runs in bf16 autocast, as the run's prepared generator did
    (the VAE and the embedder outside it, as in the run)."""
    from diffusers import SD3Transformer2DModel

    from .presets import PRESETS

    results = json.loads((Path(out) / "results.json").read_text())
    p = replace(PRESETS[results["preset"]], **{k: v for k, v in results["preset_fields"].items()
                                               if k not in ("distill",)})
    pipe = load_teacher_pipeline(Path(results["model"]), torch.bfloat16 if p.weights_dtype == "bf16"
                                 else torch.float32)
    student = SD3Transformer2DModel.from_pretrained(Path(out) / results["export"], torch_dtype=torch.float32)
    generator = FixedGridGenerator(student.eval(), p.student_steps, float(pipe.scheduler.config.shift),
                                   p.distill.detach_first_step)
    if mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        generator.forward = torch.autocast(pipe.transformer.device.type, dtype=dtype)(generator.forward)
    prompts = read_prompts(Path(results["eval_prompts"])) if results["eval_prompts"] else \
        read_prompts(Path(results["prompts"]))[:p.eval_prompts]
    embedder = build_embedder(results["diversity_model"] and Path(results["diversity_model"]), pipe.transformer.device)
    return evaluate(generator, pipe, embedder, prompts, p)
