"""Hyperparameters of the DP-DMD runs: ``sd35m`` follows the released script (docs/methods/dpdmd.md §2.6);
``smoke`` runs its code path on CPU (SD3.5-Medium configs, depth cut); ``tiny`` is the 2-D CPU comparison of DMD and
DP-DMD."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from .method import DistillConfig


@dataclass(frozen=True)
class ToyPreset:
    name: str = "tiny"
    seed: int = 0
    num_conditions: int = 3
    modes_per_condition: int = 4
    radius: float = 2.5
    std: float = 0.15
    mode_decay: float = 0.5            # mode weights 8:4:2:1 within a condition (0.25: see the README)
    width: int = 128
    depth: int = 3
    teacher_iters: int = 3000
    teacher_batch: int = 512
    teacher_lr: float = 2e-3
    label_dropout: float = 0.1
    student_steps: int = 4
    student_init: str = "teacher"      # 'teacher' (the teacher's weights) | 'random'
    iterations: int = 1800             # 300 generator + 1500 fake updates at 5:1
    batch: int = 256
    lr_generator: float = 3e-4
    lr_fake: float = 1e-3
    # One sigma per sample: with one per batch (the reference, B = 32 images) every 2-D update sees a single
    # noise level and the toy's metrics swing by 2-3x between evaluations (measured; see the README).
    per_sample_timesteps: bool = True
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(guidance_scale=2.0, anchor_steps=10))
    eval_samples: int = 2000           # per condition, final evaluation (periodic: a quarter of it)
    mass_samples: int = 20000          # per condition, for the mass on each mode (light modes hold ~0.1-1%)
    eval_every: int = 300
    ckpt_every: int = 600
    cover_share: float = 0.2           # a mode counts as covered with >= 20% of its true share of the samples


@dataclass(frozen=True)
class SD3Preset:
    """One run of the SD3 pipeline. A *step* is one iteration of the TTUR schedule; with 'alternate' (DP-DMD)
    every iteration is exactly one optimizer update, of the fake score or of the student, so ``--max-steps`` and
    ``ckpt_every`` count generator + fake updates."""
    name: str
    resolution: int = 1024
    batch_size: int = 4                # per process (x 8 GPUs = 32)
    lr_generator: float = 1e-5
    lr_fake: float = 1e-5
    student_steps: int = 4
    max_sequence_length: int = 256
    # The frozen teacher pipeline's weights. Student and fake score always keep fp32 master weights and fp32
    # AdamW states, bf16 compute coming from --mixed-precision bf16 (accelerate >= 0.30; README, precision).
    weights_dtype: str = "bf16"
    per_sample_timesteps: bool = False
    epochs: int = 1
    iterations: Optional[int] = None   # steps of the run; None: epochs x prompts / global batch
    ckpt_every: int = 100              # steps between evaluation + checkpoint (and an evaluation at the end)
    eval_images_per_prompt: int = 9
    eval_prompts: int = 99
    seed: int = 42
    # Noise and DMD timesteps: each rank its own stream (examples/common/seeding.py); False: one stream shared by
    # every rank, as the reference draws them.
    noise_per_rank: bool = True
    gradient_checkpointing: bool = True
    distill: DistillConfig = field(default_factory=DistillConfig)


PRESETS: Dict[str, object] = {
    "tiny": ToyPreset(),
    # run_train_sd35.sh: t30 teacher, CFG 3.5, 4 NFE, TTUR 5, anchor k = 10 (the released weights: k = 5).
    "sd35m": SD3Preset(name="sd35m"),
    "sd35m_anchor5": SD3Preset(name="sd35m_anchor5", distill=DistillConfig(anchor_steps=5)),
    # The sd35m code path on CPU: the launch's dtypes (bf16 teacher weights; run it with --mixed-precision bf16),
    # SD3.5-Medium's architecture with one block (smoke.py), 64 px images, 4 steps at TTUR 1 (fake, student,
    # fake, student): an evaluation + checkpoint at step 3 (a checkpoint is 2.1 GB: two fp32 transformers and
    # their AdamW states), the final evaluation at step 4, so a resumed run's last update is a student update
    # from the restored student, fake score and AdamW states.
    "smoke": SD3Preset(name="smoke", resolution=64, batch_size=1, max_sequence_length=8, iterations=4,
                       ckpt_every=3, eval_images_per_prompt=2, eval_prompts=2, seed=0, gradient_checkpointing=False,
                       lr_generator=1e-4, lr_fake=1e-4,
                       distill=DistillConfig(anchor_steps=2, teacher_steps=4, fake_per_generator=1)),
}
