"""Settings of the DDIS runs (docs/methods/ddis.md §2-§3), one ``Preset`` per setting.

``imagenet_r34_r18`` follows the released DDIS code: Stable Diffusion 2.1-base with its pipeline scheduler
(PNDM), 30 steps, CFG 10, DAG with eta = 5e-4 on the decoded z_t at every step but the last (unsquared BN
loss, nearest 224 resize, no normalisation: the code's choices), CAT with AdamW lr 1e-4, 10 prompts per epoch
accumulated into one step, up to 15 epochs, stop at 70% accuracy; the CAT cross-entropy sees ImageNet
preprocessing at 224 (the reference's CIFAR branch is its bug 2). KD is unpublished: Hinton KL, T = 4.
``pacs`` is the same recipe for PACS' 7 classes. ``smoke`` is ``imagenet_r34_r18``'s code path (class names
from a file, torchvision ResNet-34 -> ResNet-18, SD 2.1-base's diffusers layout and PNDM) on the random-weight,
depth-cut models and generated data of smoke.py, sized to run in seconds on CPU. ``tiny`` is the CPU ablation
on digits (tiny_world.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Tuple

PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str                                # 'imagenet' | 'pacs' | 'digits'
    teacher: str
    student: str
    num_classes: int
    class_names: Optional[Tuple[str, ...]] = None  # None: read from --class-names
    # sampling + DAG
    scheduler: str = "pndm"                     # 'pndm' (SD pipeline default, the code) | 'ddim' (the paper)
    steps: int = 30
    guidance_scale: float = 10.0
    eta: float = 5e-4
    guide_target: str = "z_t"                   # 'z_t' (code) | 'x0' (Tweedie)
    bn_form: str = "unsquared"
    bn_batch: str = "per_image"
    first_bn_multiplier: float = 1.0
    dag_preprocess: str = "ddis_code"           # 'ddis_code' | 'imagenet' | 'none'
    ce_preprocess: str = "imagenet"             # what the CAT cross-entropy and the teacher's labels see
    classifier_size: int = 224
    # CAT
    cat_lr: float = 1e-4
    cat_weight_decay: float = 1e-2
    cat_epochs: int = 15
    cat_prompts_per_epoch: int = 10             # DDIS' epoch_size
    cat_batch: int = 1                          # images per sampling call; accumulated over the epoch
    cat_threshold: float = 0.7
    cat_max_grad_norm: float = 1.0
    cat_patience: int = 500                     # optimiser steps without a new best loss
    cat_joint: bool = False                     # all classes' tokens in every batch (tiny) vs one class at a time
    cat_seed: int = 35                          # the same noises recur every epoch (DDIS reseeds per epoch)
    cat_grad_steps: int = 1                     # final denoising steps the CE gradient flows through (DDIS: 1)
    # synthesis
    images_per_class: int = 100
    synth_batch: int = 1
    save_size: Optional[int] = 256              # nearest resize of the saved images (DDIS: 256); None: as decoded
    # KD
    kd_epochs: int = 90
    kd_lr: float = 0.1
    kd_batch: int = 256
    kd_optimizer: str = "sgd"
    kd_weight_decay: float = 1e-4
    kd_temperature: float = 4.0
    num_workers: int = 8

    def with_overrides(self, **changes) -> "Preset":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


def _build() -> Dict[str, Preset]:
    imagenet = Preset(name="imagenet_r34_r18", dataset="imagenet", teacher="resnet34", student="resnet18",
                      num_classes=1000)
    pacs = imagenet.with_overrides(name="pacs", dataset="pacs", num_classes=7, class_names=PACS_CLASSES,
                                   images_per_class=1000, kd_epochs=50, kd_batch=64, kd_lr=0.01)
    # tiny: DDIM (fused CFG step) with trailing spacing, Tweedie-x0 guidance on batch statistics of mixed-class
    # batches, eta tuned on this prior (README: how); CAT trains the ten tokens jointly.
    # smoke: imagenet_r34_r18 with 2 classes (one per process on 2), 2 PNDM steps, 2 CAT epochs of one prompt,
    # 4 images per class at 16x16 (the cut VAE's resolution; saved and classified at 32), sampled 4 at a time,
    # 2 KD epochs of batch 4 (2 per process on 2; BatchNorm needs 2).
    smoke = imagenet.with_overrides(name="smoke", num_classes=2, steps=2, classifier_size=32, cat_epochs=2,
                                    cat_prompts_per_epoch=1, images_per_class=4, synth_batch=4, save_size=32,
                                    kd_epochs=2, kd_batch=4, num_workers=0)
    tiny = Preset(name="tiny", dataset="digits", teacher="tiny_teacher", student="tiny_student", num_classes=10,
                  scheduler="ddim", steps=20, guidance_scale=3.0, eta=100.0, guide_target="x0", bn_batch="batch",
                  dag_preprocess="none", ce_preprocess="none", classifier_size=16, cat_lr=5e-3,
                  cat_weight_decay=0.0, cat_epochs=8, cat_prompts_per_epoch=5, cat_batch=50, cat_threshold=0.9,
                  cat_patience=4, cat_joint=True, cat_seed=35, images_per_class=50, synth_batch=100,
                  save_size=None, kd_epochs=60, kd_lr=3e-3, kd_batch=64, kd_optimizer="adamw",
                  kd_weight_decay=5e-4, kd_temperature=4.0, num_workers=0)
    return {p.name: p for p in (imagenet, pacs, smoke, tiny)}


PRESETS: Dict[str, Preset] = _build()
