"""Hyperparameters of the DP-DMD runs: ``sd35m`` follows the released script (docs/methods/dpdmd.md §2.6);
``tiny`` is the 2-D CPU comparison of DMD and DP-DMD."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

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
    name: str
    resolution: int = 1024
    batch_size: int = 4                # per process (x 8 GPUs = 32)
    lr_generator: float = 1e-5
    lr_fake: float = 1e-5
    student_steps: int = 4
    max_sequence_length: int = 256
    weights_dtype: str = "bf16"        # the reference loads all three transformers in bf16 (AdamW on bf16)
    per_sample_timesteps: bool = False
    epochs: int = 1
    ckpt_every: int = 100
    eval_images_per_prompt: int = 9
    eval_prompts: int = 99
    seed: int = 42
    gradient_checkpointing: bool = True
    distill: DistillConfig = field(default_factory=DistillConfig)


PRESETS: Dict[str, object] = {
    "tiny": ToyPreset(),
    # run_train_sd35.sh: t30 teacher, CFG 3.5, 4 NFE, TTUR 5, anchor k = 10 (the released weights: k = 5).
    "sd35m": SD3Preset(name="sd35m"),
    "sd35m_anchor5": SD3Preset(name="sd35m_anchor5", distill=DistillConfig(anchor_steps=5)),
    # The real pipeline end to end on a tiny SD3 model (CPU smoke test, CI).
    # 6 prompts x 2 epochs at batch 2 = 6 iterations: 2 generator updates at TTUR 2.
    "sd3_smoke": SD3Preset(name="sd3_smoke", resolution=32, batch_size=2, max_sequence_length=8, epochs=2,
                           weights_dtype="fp32", ckpt_every=3, eval_images_per_prompt=3, eval_prompts=2,
                           gradient_checkpointing=False, lr_generator=1e-4, lr_fake=1e-4,
                           distill=DistillConfig(anchor_steps=2, teacher_steps=4, fake_per_generator=2)),
}
