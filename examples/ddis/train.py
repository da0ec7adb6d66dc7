"""DDIS: class tokens (CAT), DAG-guided dataset synthesis and data-free KD of a student from the teacher.

    python examples/ddis/train.py --preset smoke --mixed-precision bf16   # CPU, seconds: the paper path, cut
    python examples/ddis/train.py --preset tiny        # CPU, digits: vanilla vs DAG vs DAG+CAT (a few minutes)
    python examples/ddis/train.py --preset imagenet_r34_r18 --pretrained-model /models/sd-2-1-base \\
        --teacher-ckpt /ckpt/resnet34.pth --class-names /data/imagenet_classes.txt --test-root /data/imagenet/val
    accelerate launch examples/ddis/train.py --preset pacs --pretrained-model /models/sd-2-1-base \\
        --teacher-ckpt /ckpt/pacs_resnet34.pth --test-root /data/PACS/photo --mixed-precision bf16

Outputs go to runs/ddis/<preset>/ (``--out``): images/ (the synthetic ImageFolder), grids/, log.csv / log.json /
log.md / curves.png, checkpoints/, export/ (student.safetensors, class_tokens/) and results.json.
``--max-steps N`` stops after the checkpoint at optimizer step N (CAT and KD steps count; synthesis has no
optimizer), ``--resume`` continues exactly where a run stopped. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.ddis` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.common.cli import (add_attention_backend, add_run_options, comma_list, example_parser,  # noqa: E402
                                 run_seeds)
from examples.ddis.presets import PRESETS  # noqa: E402

OVERRIDES = ("teacher", "student", "steps", "guidance_scale", "eta", "guide_target", "bn_form", "bn_batch",
             "first_bn_multiplier", "scheduler", "images_per_class", "synth_batch", "cat_epochs", "cat_lr",
             "cat_threshold", "cat_prompts_per_epoch", "cat_batch", "cat_grad_steps", "kd_epochs", "kd_lr", "kd_batch",
             "kd_temperature", "num_workers")
WORLD = ("teacher_epochs", "vae_steps", "unet_steps", "batch_size")  # the tiny world's training (--world-*)


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__, PRESETS, "ddis")
    add_run_options(parser)  # --seed/--seeds (tiny: one table row per seed), --mixed-precision, --max-steps, --resume
    parser.add_argument("--pretrained-model", help="local diffusers Stable Diffusion 2.1-base folder")
    parser.add_argument("--teacher-ckpt", help="local teacher checkpoint (torchvision layout)")
    parser.add_argument("--class-names", help="text file, one class name per line (ImageNet preset)")
    parser.add_argument("--test-root", help="real test set as an ImageFolder (KD evaluation)")
    parser.add_argument("--stages", help="comma list of tokens,synthesize,distill (default all)")
    parser.add_argument("--methods", default="vanilla,dag,dag_cat", help="tiny preset: synthetic sets to compare")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is visible")
    for name in OVERRIDES:
        parser.add_argument("--" + name.replace("_", "-"), type=type(getattr(PRESETS["tiny"], name)))
    for name in WORLD:
        parser.add_argument("--world-" + name.replace("_", "-"), type=int, help="tiny preset: the world's " + name)
    add_attention_backend(parser)
    return parser.parse_args(argv)


def build_preset(args):
    preset = PRESETS[args.preset]
    changes = {n: getattr(args, n) for n in OVERRIDES if getattr(args, n) is not None}
    return preset.with_overrides(**changes)


def main(argv=None):
    args = parse_args(argv)
    preset = build_preset(args)
    out = args.out or Path("runs/ddis") / preset.name
    import torch

    if args.quiet:  # the libraries' own bars (loading weights, writing shards) too
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

    try:
        if preset.dataset == "digits":
            from dataclasses import replace

            from examples.ddis.tiny import TinyRun, run_tiny
            from examples.ddis.tiny_world import TinyWorldConfig

            world = replace(TinyWorldConfig(), **{n: getattr(args, "world_" + n) for n in WORLD
                                                 if getattr(args, "world_" + n) is not None})
            print(f"DDIS preset tiny on cpu (threads {torch.get_num_threads()}); out {out}")
            return run_tiny(TinyRun(preset=preset, out=out, seeds=run_seeds(args), methods=comma_list(args.methods),
                                    world=world, quiet=args.quiet, attention_backend=args.attention_backend))
        from accelerate import Accelerator

        from examples.ddis.pipeline import STAGES, RunConfig, StopRun, run_ddis

        stages = comma_list(args.stages) if args.stages else STAGES
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise SystemExit(f"--stages: unknown stage(s) {sorted(unknown)} ({', '.join(STAGES)})")
        if args.seeds and len(args.seeds) > 1:
            raise SystemExit("--seeds: the SD presets run one seed (use --seed)")
        accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
        paths = dict(pretrained_model=args.pretrained_model, teacher_ckpt=args.teacher_ckpt,
                     class_names_file=args.class_names, test_root=args.test_root)
        if preset.name == "smoke":  # generated assets, unless a flag names real ones
            from examples.common.main_process import on_main
            from examples.ddis.smoke import build_smoke_assets

            assets = on_main(accelerator, lambda: build_smoke_assets(out, preset))
            defaults = dict(pretrained_model=assets["pretrained_model"], teacher_ckpt=assets["teacher_ckpt"],
                            class_names_file=assets["class_names"], test_root=assets["test_root"])
            paths = {k: v if v is not None else str(defaults[k]) for k, v in paths.items()}
        accelerator.print(f"DDIS preset {preset.name} ({preset.teacher} -> {preset.student}) on {accelerator.device} "
                          f"x{accelerator.num_processes}, mixed precision {args.mixed_precision}; out {out}")
        rc = RunConfig(preset=preset, out=out, stages=tuple(stages), seed=run_seeds(args)[0], resume=args.resume,
                       max_steps=args.max_steps, quiet=args.quiet, attention_backend=args.attention_backend,
                       mixed_precision=args.mixed_precision, **paths)
        try:
            return run_ddis(rc, accelerator)
        except StopRun:
            accelerator.print(f"--max-steps {args.max_steps}: stopped after the checkpoint at step {args.max_steps}; "
                              f"--resume continues the run")
            return None
    except FileNotFoundError as e:  # missing weights or data: a message, not a traceback
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
