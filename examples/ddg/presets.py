"""Hyperparameters of the DDG runs (docs/methods/ddg.md §3), one ``Preset`` per dataset, ``tiny`` (the CPU
experiment) and ``smoke`` (the PACS path on generated fixtures, smoke.py).

The DomainBed presets follow the DDG README flags (``--stage1_steps 5000 --swadstart_steps 5000 --steps 8000
--lmd 0.5``) and VL2V/DomainBed defaults (Adam lr 5e-5, wd 0, 32 images per source domain, 20% holdout,
checkpoint every 200 steps, 1000 for DomainNet). DDG's open points are fields: conditioning, the CFG
negative and its scale w, beta, the SD resolution, which parts train in each stage, the CE weight.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Tuple

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# How each source domain reads as the CFG negative prompt (negative='domain').
DOMAIN_PROMPTS: Dict[str, Dict[str, str]] = {
    "PACS": {"art_painting": "an art painting", "cartoon": "a cartoon", "photo": "a photo", "sketch": "a sketch"},
    "VLCS": {"Caltech101": "a photo from Caltech101", "LabelMe": "a photo from LabelMe",
             "SUN09": "a photo of a scene", "VOC2007": "a photo from Pascal VOC"},
    "OfficeHome": {"Art": "an artistic image", "Clipart": "a clipart image", "Product": "a product image",
                   "Real World": "a real world photo"},
    "TerraIncognita": {e: "a camera trap photo" for e in ("location_100", "location_38", "location_43",
                                                          "location_46")},
    "DomainNet": {"clipart": "a clipart image", "infograph": "an infographic", "painting": "a painting",
                  "quickdraw": "a quickdraw doodle", "real": "a real photo", "sketch": "a sketch"},
}


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str                             # a DomainBed dataset name or 'RotatedDigits'
    backbone: str = "clip_vit"               # clip_vit (CLIP-initialised: --student-model, else --clip-model)
    #                                          | resnet50 | vit_b16 (--backbone-weights)
    steps: int = 8000
    stage1_steps: int = 5000                 # Stage I for step < stage1_steps, Stage II after (DDG only)
    swad_start: int = 5000                   # SWAD averages and selects from this step on
    checkpoint_freq: int = 200               # evaluation, SWAD segment and checkpoint period
    batch_per_domain: int = 32               # one minibatch per source domain per step (total over processes,
    #                                          which must divide it)
    lr: float = 5e-5
    weight_decay: float = 0.0
    lmd: float = 0.5                         # alignment: weight of the CLIP-image term
    beta: float = 1.0                        # weight of the diffusion loss in Stage II (unknown: exposed)
    guidance_scale: float = 2.0              # domain-debiasing CFG scale w (1 = no CFG)
    guidance_rescale: float = 0.0
    negative: str = "domain"                 # CFG negative: 'empty' prompt or each sample's 'domain' prompt
    conditioning: str = "prompts"            # prompts (A) | patches (B) | both (A + B)
    sd_resolution: int = 512                 # SD input size (Diffusion-TTA/DIVA; SD v1.4 is weak off 512)
    diffusion_batch: int = 8                 # images per source domain in L_diff, total over processes (0: the
    #                                          whole minibatch)
    timesteps_per_image: int = 1
    sd_gradient_checkpointing: bool = False  # recompute UNet activations in backward (memory for B x 512^2)
    ce_weight: float = 0.0                   # CE on source labels added to the training loss (0: not in DDG)
    stage1_train: str = "projection"         # VL2V Stage I: only P; 'all': f and P
    stage2_train: str = "featurizer"         # VL2V Stage II: only f (P frozen); 'all': f and P
    class_template: str = "a photo of a {}"      # the CLIP class prompts (VL2V)
    sd_class_template: str = "a photo of a {}."  # the SD class prompts of conditioning A (Diffusion-TTA)
    holdout: float = 0.2
    image_size: int = 224
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    clip_mean: Optional[Tuple[float, ...]] = CLIP_MEAN  # renormalise for the CLIP teacher (None: feed as is)
    clip_std: Optional[Tuple[float, ...]] = CLIP_STD
    augment: bool = True                     # DomainBed's training augmentation
    test_batch: int = 128
    n_converge: int = 3
    n_tolerance: int = 6
    tolerance_ratio: float = 0.3
    num_workers: int = 4
    test_envs: Tuple[int, ...] = ()          # held-out environments to run (empty: every one, leave-one-out)
    trial_seeds: Tuple[int, ...] = (0,)
    methods: Tuple[str, ...] = ("erm", "ddg")  # erm | align (VL2V: Stage I + II alignment, no diffusion) | ddg
    # tiny preset only: the teachers trained on the run's source domains
    teacher_steps: Tuple[int, int, int] = (0, 0, 0)   # CLIP, VAE, UNet optimisation steps
    image_channels: int = 3
    angles: Tuple[int, ...] = ()

    def with_overrides(self, **changes) -> "Preset":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


def _domainbed(name: str, dataset: str, **kw) -> Preset:
    return Preset(name=name, dataset=dataset, **kw)


# The PACS path cut to seconds: DDG only (ERM is its one-stage subset), 4 steps (Stage I -> II at 2), a checkpoint
# every 2 steps, one held-out domain, 112-pixel inputs (a multiple of both CLIP patch sizes), SD input 16 (the
# smoke VAE's 8x8 latent), 2 images per domain in L_diff; a batch of 4 per domain splits over 1, 2 or 4 processes.
# No loader workers: the augmentation then draws from the checkpointed streams.
SMOKE_CUTS = dict(steps=4, stage1_steps=2, swad_start=1, checkpoint_freq=2, batch_per_domain=4, diffusion_batch=2,
                  sd_resolution=16, image_size=112, test_batch=32, n_converge=1, n_tolerance=2, num_workers=0,
                  test_envs=(3,), methods=("ddg",))

PRESETS: Dict[str, Preset] = {
    "pacs": _domainbed("pacs", "PACS"),
    "vlcs": _domainbed("vlcs", "VLCS"),
    "officehome": _domainbed("officehome", "OfficeHome"),
    "terrainc": _domainbed("terrainc", "TerraIncognita"),
    "domainnet": _domainbed("domainnet", "DomainNet", checkpoint_freq=1000, test_batch=64),
    "smoke": _domainbed("smoke", "PACS", **SMOKE_CUTS),
    # CPU: RotatedDigits (sklearn digits, 16x16, six angles), tiny CLIP + tiny SD trained on the sources.
    "tiny": Preset(name="tiny", dataset="RotatedDigits", backbone="clip_vit", steps=240, stage1_steps=60,
                   swad_start=60, checkpoint_freq=20, batch_per_domain=24, lr=3e-4, beta=1.0, guidance_scale=2.0,
                   negative="domain", conditioning="prompts", sd_resolution=16, diffusion_batch=8,
                   sd_class_template="a photo of a {}",  # the captions the tiny SD teacher is trained on
                   image_size=16, mean=(0.5,), std=(0.5,), clip_mean=None, clip_std=None, augment=False,
                   test_batch=512, n_converge=3, n_tolerance=4, num_workers=0, teacher_steps=(200, 100, 300),
                   image_channels=1, angles=(0, 15, 30, 45, 60, 75), test_envs=(0, 5), methods=("erm", "align", "ddg")),
}
