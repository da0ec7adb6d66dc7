"""DDG (implicit diffusion distillation with domain disentanglement) on the DomainBed protocol.

    python examples/ddg/train.py --preset tiny                     # CPU: ERM vs alignment vs DDG on RotatedDigits
    python examples/ddg/train.py --preset smoke                    # CPU, seconds: the PACS path on generated models
    python examples/ddg/train.py --preset pacs --data-root /data/domainbed \\
        --clip-model /weights/clip-vit-base-patch16 --pretrained-model /weights/stable-diffusion-v1-4
    accelerate launch --num_processes 4 examples/ddg/train.py --preset domainnet --data-root /data/domainbed \\
        --clip-model /weights/clip-vit-base-patch16 --pretrained-model /weights/stable-diffusion-v1-4 --seeds 0,1,2

Every held-out environment (leave-one-domain-out, or --test-envs) x trial seed x method ('erm', 'align' =
VL2V's two-stage alignment without diffusion, 'ddg') is one DomainBed run; the run log (log.csv / .json / .md,
curves.png), results.json / results.md / results.png (the table per test domain), checkpoints/ and export/ (the
selected student of every run, safetensors) go to runs/ddg/<preset>/ (--out). --max-steps N stops after the
checkpoint at optimizer step N (counted over all runs and stages), --resume continues exactly there.
Nothing is downloaded: DomainBed folders from --data-root, CLIP (transformers) from --clip-model, Stable
Diffusion (diffusers layout) from --pretrained-model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.ddg` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.common.cli import (add_attention_backend, add_run_options, comma_ints, comma_list,  # noqa: E402
                                 example_parser)
from examples.ddg.method import METHODS  # noqa: E402
from examples.ddg.pipeline import RunConfig, StopRun, run_all  # noqa: E402
from examples.ddg.presets import PRESETS  # noqa: E402

# Preset fields that the command line overrides (--field-name): type, or the list of choices, and help.
OVERRIDES = {
    "backbone": (["clip_vit", "resnet50", "vit_b16"], "student backbone"),
    "steps": (int, "training steps per run"),
    "stage1_steps": (int, "Stage I -> Stage II switch"),
    "swad_start": (int, "SWAD averages from this step on"),
    "checkpoint_freq": (int, "evaluation / SWAD segment / checkpoint period"),
    "batch_per_domain": (int, "images per source domain per step, total over the processes (which must divide "
                              "it)"),
    "lr": (float, "Adam learning rate"),
    "lmd": (float, "alignment: weight of the CLIP-image term"),
    "beta": (float, "weight of the diffusion loss"),
    "guidance_scale": (float, "domain-debiasing CFG scale w (1: no CFG)"),
    "guidance_rescale": (float, "guidance rescale phi (0: off)"),
    "negative": (["empty", "domain"], "CFG negative prompt"),
    "conditioning": (["prompts", "patches", "both"], "SD context: class-probability prompts, patch tokens, both"),
    "sd_resolution": (int, "SD input size"),
    "image_size": (int, "student input size (DomainBed: 224)"),
    "diffusion_batch": (int, "images per source domain in the diffusion loss, total over the processes (0: all)"),
    "timesteps_per_image": (int, "noisy copies per image in the diffusion loss"),
    "ce_weight": (float, "CE on source labels added to the DDG loss (default 0)"),
    "stage1_train": (["projection", "all"], "what Stage I trains"),
    "stage2_train": (["featurizer", "all"], "what Stage II trains"),
    "n_converge": (int, "SWAD LossValley n_converge"),
    "n_tolerance": (int, "SWAD LossValley n_tolerance"),
    "tolerance_ratio": (float, "SWAD LossValley tolerance_ratio"),
    "num_workers": (int, "data loader workers"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__, PRESETS, "ddg")
    add_run_options(parser)  # --seed/--seeds (the trial seeds), --mixed-precision, --max-steps, --resume
    parser.add_argument("--data-root", help="DomainBed root (PACS/, VLCS/, office_home/, terra_incognita/, "
                                            "domain_net/)")
    parser.add_argument("--clip-model", help="local CLIP folder (transformers CLIPModel + tokenizer): the teacher")
    parser.add_argument("--pretrained-model", help="local Stable Diffusion v1.x folder (diffusers layout)")
    parser.add_argument("--student-model", help="local CLIP folder of the clip_vit student (default: --clip-model)")
    parser.add_argument("--backbone-weights", help="torchvision state_dict file for resnet50 / vit_b16 ('random': "
                        "a random initialisation, on purpose)")
    parser.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default: the preset's)")
    parser.add_argument("--test-envs", type=comma_ints, help="held-out environment indices (default: the preset's; "
                                                             "DomainBed presets: every environment)")
    for field, (kind, text) in OVERRIDES.items():
        flag = "--" + field.replace("_", "-")
        if isinstance(kind, list):
            parser.add_argument(flag, choices=kind, help=text)
        else:
            parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--sd-gradient-checkpointing", action="store_const", const=True, default=None,
                        help="recompute the UNet's activations in backward (large batches at 512)")
    parser.add_argument("--teacher-steps", type=comma_ints, help="tiny: CLIP,VAE,UNet training steps")
    parser.add_argument("--teachers-per-run", action="store_true",
                        help="tiny: train the teachers on each run's own source domains (default: once, on the "
                             "domains no run tests on)")
    parser.add_argument("--smoke-assets", help="smoke: folder of the generated fixtures (default <out>/smoke_assets)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is visible")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_attention_backend(parser)
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> RunConfig:
    preset = PRESETS[args.preset]
    changes = {}
    for field in (*OVERRIDES, "sd_gradient_checkpointing"):
        if getattr(args, field, None) is not None:
            changes[field] = getattr(args, field)
    if args.teacher_steps is not None:
        if len(args.teacher_steps) != 3:
            raise SystemExit(f"--teacher-steps: three numbers (CLIP,VAE,UNet), got {args.teacher_steps}")
        changes["teacher_steps"] = args.teacher_steps
    seeds = tuple(args.seeds) if args.seeds else (args.seed,) if args.seed is not None else preset.trial_seeds
    changes["trial_seeds"] = seeds
    preset = preset.with_overrides(**changes)
    methods = comma_list(args.methods) if args.methods is not None else preset.methods
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown or 'empty list'} (choose from {', '.join(METHODS)})")
    if set(methods) - {"erm"} and not 0 < preset.stage1_steps < preset.steps:
        raise SystemExit(f"--stage1-steps {preset.stage1_steps} must lie in (0, --steps {preset.steps}): align and "
                         "DDG train Stage I, then Stage II")
    if preset.checkpoint_freq < 1:
        raise SystemExit(f"--checkpoint-freq must be >= 1, got {preset.checkpoint_freq}")
    if preset.backbone != "clip_vit" and not args.backbone_weights:
        raise SystemExit(f"--backbone {preset.backbone} needs --backbone-weights: a torchvision state_dict file "
                         "(DomainBed and VL2V start from ImageNet weights; nothing is downloaded), or "
                         "'--backbone-weights random' to train from a random initialisation on purpose")
    return RunConfig(preset=preset, out=args.out or Path("runs/ddg") / preset.name, methods=methods, seeds=seeds,
                     test_envs=args.test_envs or None, data_root=args.data_root, clip_model=args.clip_model,
                     pretrained_model=args.pretrained_model, student_model=args.student_model,
                     backbone_weights=None if args.backbone_weights == "random" else args.backbone_weights,
                     teachers_per_run=args.teachers_per_run,
                     resume=args.resume, max_steps=args.max_steps, quiet=args.quiet,
                     attention_backend=args.attention_backend, mixed_precision=args.mixed_precision,
                     smoke_assets=args.smoke_assets)


def main(argv=None):
    args = parse_args(argv)
    rc = build_config(args)
    import torch
    from accelerate import Accelerator
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    # The CLIP vision tower is read from a full CLIP folder: no unused-key report, no per-load progress bars.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=cpu)
    p = rc.preset
    accelerator.print(f"DDG preset {p.name} ({p.dataset}, {p.backbone}) on {accelerator.device} "
                      f"x{accelerator.num_processes}: methods {', '.join(rc.methods)}; out {rc.out}")
    try:
        return run_all(rc, accelerator)
    except StopRun:
        accelerator.print(f"--max-steps {rc.max_steps}: stopped after the checkpoint at step {rc.max_steps}; "
                          f"--resume continues the run")
        return None
    except FileNotFoundError as e:  # missing data or weights: a message, not a traceback
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
