"""Hyperparameters of the GenDD runs (docs/methods/gendd.md §4), one ``Preset`` per teacher/student pair.

CIFAR-100 and ImageNet values follow the released scripts; ``tiny`` is a CPU-sized setting on
scikit-learn's digits used to compare cross-entropy, classic KD and GenDD under one budget. ``smoke`` (the
ImageNet pair ``r34_r18``) and ``smoke_cifar`` (the CIFAR pair ``res56_res20``) run those presets' code path
in seconds on CPU, on the fixtures ``smoke.py`` writes: the same models, loaders and stages, with less data,
fewer epochs and steps, small images and a narrower head (each cut is listed at the preset).
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
    image_size: int = 224                   # ImageNet crop (evaluation: resize to 256/224 of it, center crop)
    eval_batch_size: int = 64               # test images per evaluation batch, whatever the process count

    def with_overrides(self, **changes) -> "Preset":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


def rescale(cfg: StageConfig, epochs: Optional[int]) -> StageConfig:
    """The same schedule over ``epochs``: warmup and milestones scale proportionally."""
    if epochs is None or epochs == cfg.epochs:
        return cfg
    f = epochs / cfg.epochs
    return replace(cfg, epochs=epochs, warmup_epochs=round(cfg.warmup_epochs * f),
                   milestones=tuple(max(1, round(m * f)) for m in cfg.milestones))


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
                             val_every=10, num_workers=0, eval_batch_size=512)
    presets.update(_smoke(presets))
    return presets


def _smoke(presets: Dict[str, Preset]) -> Dict[str, Preset]:
    """The paper presets, cut to seconds on CPU. Kept: the models' architectures (torchvision ResNet-34 ->
    ResNet-18; RepDistiller's resnet56 -> resnet20), the loaders, stages, optimisers, schedules' shapes, lambda,
    R, token size, head depth, CFG scale, mixup and CFG dropout. Cut: the classes (4 ImageNet, 10 CIFAR: the
    final layers have that many rows, so that the accuracies of a random teacher and a few steps are not all
    zero), the data (generated: 8 training and 4 validation images per ImageNet class; 64 / 32 CIFAR images), the epochs
    (stage 1: 1, stage 2: 2; warmup and milestones rescaled), the batch (8 / 16), the ImageNet crop (32 px
    instead of 224), the head width (256 instead of 1024: its checkpoints stay small), the sampling steps
    (4 instead of 64 / 100) and samples per image (n_s 2 instead of 5), loader workers (0)."""
    cut = dict(head_width=256, eval_steps=4, eval_samples=2, val_samples=1, val_every=1, num_workers=0)
    imagenet, cifar = presets["r34_r18"], presets["res56_res20"]
    smoke = imagenet.with_overrides(name="smoke", num_classes=4, batch_size=8, image_size=32, eval_batch_size=8,
                                    stage1=rescale(imagenet.stage1, 1), stage2=rescale(imagenet.stage2, 2),
                                    probe=rescale(imagenet.probe, 1), **cut)
    smoke_cifar = cifar.with_overrides(name="smoke_cifar", num_classes=10, batch_size=16, eval_batch_size=16,
                                       stage1=rescale(cifar.stage1, 1), stage2=rescale(cifar.stage2, 2),
                                       probe=rescale(cifar.probe, 1), **cut)
    return {"smoke": smoke, "smoke_cifar": smoke_cifar}


PRESETS: Dict[str, Preset] = _build()
