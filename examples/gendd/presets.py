"""Hyperparameters of the GenDD runs (docs/methods/gendd.md §4), one ``Preset`` per teacher/student pair.

CIFAR-100 and ImageNet values follow the released scripts; ``tiny`` is a CPU-sized setting on
scikit-learn's digits used to compare cross-entropy, classic KD and GenDD under one budget.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class StageConfig:
    """Optimisation of one stage. The learning rate is set once per epoch (as the original scripts):

    * ``schedule='step'``: ``lr * min(1, (e + 1) / warmup) * decay_rate ** #(e + 1 > m for m in milestones)``
    * ``schedule='cosine'``: linear warmup ``lr * (e + 1) / warmup`` for ``e < warmup``, then
      ``min_lr + (lr - min_lr) * (1 + cos(pi (e - warmup + 1) / (epochs - warmup))) / 2``
    with ``e`` the 0-based epoch. ``beta2_min`` set: AdamW's beta2 follows the cosine ramp
    ``beta2_min -> beta2`` every iteration (GenDD stage 2); else beta2 is fixed.
    """
    epochs: int
    lr: float
    weight_decay: float
    schedule: str = "cosine"                # 'cosine' | 'step'
    warmup_epochs: int = 0
    milestones: Tuple[int, ...] = ()
    decay_rate: float = 0.1
    min_lr: float = 0.0
    optimizer: str = "adamw"                # 'adamw' | 'sgd'
    beta1: float = 0.9
    beta2: float = 0.999                    # fixed beta2, or the end of the beta2 ramp
    beta2_min: Optional[float] = None       # start of the per-iteration beta2 ramp (None: fixed)
    head_weight_decay: float = 0.0          # weight decay of the diffusion head (and 'ln' parameters)
    momentum: float = 0.9                   # SGD only
    crop_scale: Optional[Tuple[float, float]] = None  # ImageNet RandomResizedCrop scale of this stage

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str                            # 'cifar100' | 'imagenet' | 'digits'
    teacher: str
    student: str
    num_classes: int
    batch_size: int                         # total over all processes
    stage2: StageConfig
    stage1: Optional[StageConfig] = None
    probe: Optional[StageConfig] = None
    stages: Tuple[str, ...] = ("stage1", "stage2")  # run by default ('probe' is opt-in)
    contraction: float = 0.9                # lambda ("smooth")
    batch_mul: int = 30                     # R ("diffusion_batch_mul")
    mix_beta: float = 1.0                   # feature mixup Beta(beta, beta); 0: off
    cond_drop_prob: float = 0.2
    token_size: int = 64
    head_width: int = 1024
    head_depth: int = 3
    learn_sigma: bool = True                # IDDPM hybrid loss; False: plain eps-MSE
    eval_steps: int = 100                   # sampling steps of the final evaluation
    eval_cfg: float = 2.0
    eval_samples: int = 5                   # n_s of the final evaluation
    val_samples: int = 1                    # n_s of the per-epoch validation
    val_every: int = 1                      # sampling validation every k epochs (probe accuracy: every epoch)
    # tiny comparison only
    teacher_stage: Optional[StageConfig] = None
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9                   # weight of the KD term; 1 - alpha on the cross-entropy
    num_workers: int = 8

    def with_overrides(self, **changes) -> "Preset":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- CIFAR-100

CIFAR_STAGE1 = StageConfig(epochs=50, lr=3e-3, weight_decay=5e-2, schedule="cosine")
CIFAR_STAGE2 = StageConfig(epochs=240, lr=1e-3, weight_decay=5e-2, schedule="step", warmup_epochs=50,
                           milestones=(150, 180, 210), beta2_min=0.95, beta2=0.999)
# The later linear probe (docs/methods/gendd.md §2, "Inference"): SGD lr 30, wd 0, cosine, on frozen features.
PROBE = StageConfig(epochs=100, lr=30.0, weight_decay=0.0, schedule="cosine", optimizer="sgd", momentum=0.9)

_CIFAR_PAIRS = {  # name: (teacher, student, lambda) from GenDD_cifar/sh/train_*_gendd.sh
    "res56_res20": ("resnet56", "resnet20", 0.9),
    "res110_res32": ("resnet110", "resnet32", 0.9),
    "res32x4_res8x4": ("resnet32x4", "resnet8x4", 0.7),
    "vgg13_vgg8": ("vgg13", "vgg8", 0.7),
    "vgg13_res20": ("vgg13", "resnet20", 0.9),
    "wrn402_wrn162": ("wrn_40_2", "wrn_16_2", 0.8),
    "wrn402_wrn401": ("wrn_40_2", "wrn_40_1", 0.8),
    "wrn402_res8x4": ("wrn_40_2", "resnet8x4", 0.7),
}

# ------------------------------------------------------------------------------------------- ImageNet

def _imagenet_stage2(warmup: int) -> StageConfig:
    return StageConfig(epochs=100, lr=2e-3, weight_decay=2e-2, schedule="cosine", warmup_epochs=warmup, min_lr=1e-6,
                       beta2_min=0.96, beta2=0.999, crop_scale=(0.6, 1.0))


IMAGENET_STAGE1 = StageConfig(epochs=20, lr=2e-3, weight_decay=2e-2, schedule="cosine", min_lr=1e-6,
                              crop_scale=(0.08, 1.0))

# ------------------------------------------------------------------------------------------- tiny (CPU)

# 60 epochs of 22 steps on digits; the stage-2 schedule is CIFAR's shape compressed (warmup 10%, then x0.1
# at 2/3 and 5/6) and every student of the comparison uses it with the same AdamW and beta2 ramp.
TINY_STAGE = StageConfig(epochs=60, lr=2e-3, weight_decay=5e-2, schedule="step", warmup_epochs=6,
                         milestones=(40, 50), beta2_min=0.95, beta2=0.999)
TINY_TEACHER = StageConfig(epochs=30, lr=2e-3, weight_decay=5e-2, schedule="cosine", warmup_epochs=2)
TINY_PROBE = replace(PROBE, epochs=10)  # the later linear probe: SGD lr 30, wd 0, cosine, frozen features


def _build() -> Dict[str, Preset]:
    presets = {}
    for name, (teacher, student, lam) in _CIFAR_PAIRS.items():
        presets[name] = Preset(name=name, dataset="cifar100", teacher=teacher, student=student, num_classes=100,
                               batch_size=64, stage1=CIFAR_STAGE1, stage2=CIFAR_STAGE2, probe=PROBE,
                               contraction=lam, batch_mul=30, eval_steps=100)
    for name, teacher, student, warmup in (("r34_r18", "resnet34", "resnet18", 10),
                                           ("r50_mv1", "resnet50", "mobilenet_v1", 20)):
        presets[name] = Preset(name=name, dataset="imagenet", teacher=teacher, student=student, num_classes=1000,
                               batch_size=512, stage1=IMAGENET_STAGE1, stage2=_imagenet_stage2(warmup), probe=PROBE,
                               contraction=0.9, batch_mul=10, eval_steps=64, num_workers=16)
    presets["tiny"] = Preset(name="tiny", dataset="digits", teacher="tiny_teacher", student="tiny_student",
                             num_classes=10, batch_size=64, stage2=TINY_STAGE, teacher_stage=TINY_TEACHER,
                             probe=TINY_PROBE, stages=("stage2", "probe"), contraction=0.9, batch_mul=10,
                             head_width=128, head_depth=3, eval_steps=20, eval_samples=5, val_samples=1,
                             val_every=10, num_workers=0)
    return presets


PRESETS: Dict[str, Preset] = _build()
