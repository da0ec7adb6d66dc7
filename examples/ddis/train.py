"""DDIS: class tokens (CAT), DAG-guided dataset synthesis and data-free KD of a student from the teacher.

    python examples/ddis/train.py --preset tiny        # CPU, digits: vanilla vs DAG vs DAG+CAT (a few minutes)
    python examples/ddis/train.py --preset imagenet_r34_r18 --pretrained-model /models/sd-2-1-base \\
        --teacher-ckpt /ckpt/resnet34.pth --class-names /data/imagenet_classes.txt --test-root /data/imagenet/val
    accelerate launch examples/ddis/train.py --preset pacs --pretrained-model /models/sd-2-1-base \\
        --teacher-ckpt /ckpt/pacs_resnet34.pth --test-root /data/PACS/photo --stages synthesize,distill

Outputs go to runs/ddis/<preset>/ (``--out``): cat/ (learned tokens as safetensors + json, cat_state.json),
images/ (ImageFolder, grids/ per class, synthesis.csv), kd/ (kd.csv, checkpoints), results.json; the tiny
preset writes one such tree per method and seed plus results.md (the table). Every stage resumes: tokens
of finished classes, existing images and KD epochs are kept (``--resume`` for KD). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.ddis` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.common.cli import add_attention_backend, comma_list, example_parser  # noqa: E402
from examples.ddis.presets import PRESETS  # noqa: E402

OVERRIDES = ("teacher", "student", "steps", "guidance_scale", "eta", "guide_target", "bn_form", "bn_batch", "first_bn_multiplier",
             "scheduler", "images_per_class", "synth_batch", "cat_epochs", "cat_lr", "cat_threshold",
             "cat_prompts_per_epoch", "cat_batch", "cat_grad_steps", "kd_epochs", "kd_lr", "kd_batch",
             "kd_temperature", "num_workers")


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__, PRESETS, "ddis")
    parser.add_argument("--pretrained-model", help="local diffusers Stable Diffusion directory (GPU presets)")
    parser.add_argument("--teacher-ckpt", help="local teacher checkpoint (GPU presets)")
    parser.add_argument("--class-names", help="text file, one class name per line (ImageNet preset)")
    parser.add_argument("--test-root", help="real test set as an ImageFolder (KD evaluation)")
    parser.add_argument("--stages", help="comma list of tokens,synthesize,distill (GPU presets; default all)")
    parser.add_argument("--methods", default="vanilla,dag,dag_cat", help="tiny preset: synthetic sets to compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", help="tiny preset: comma list of seeds (the table reports each and mean/std)")
    parser.add_argument("--resume", action="store_true", help="continue KD from its checkpoints")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is visible")
    parser.add_argument("--smoke", action="store_true", help="tiny preset: a seconds-long run for CI tests")
    for name in OVERRIDES:
        parser.add_argument("--" + name.replace("_", "-"), type=type(getattr(PRESETS["tiny"], name)))
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

    try:
        if preset.dataset == "digits":
            from examples.ddis.tiny import TinyRun, run_tiny
            from examples.ddis.tiny_world import SMOKE_WORLD, TinyWorldConfig

            if args.smoke:
                preset = preset.with_overrides(steps=4, images_per_class=2, synth_batch=20, cat_epochs=1,
                                               cat_prompts_per_epoch=1, cat_batch=10, kd_epochs=1)
            seeds = comma_list(args.seeds, int) if args.seeds else (args.seed,)
            methods = comma_list(args.methods)
            print(f"DDIS preset tiny on cpu (threads {torch.get_num_threads()}); out {out}")
            return run_tiny(TinyRun(preset=preset, out=out, seeds=seeds, methods=methods,
                                    world=SMOKE_WORLD if args.smoke else TinyWorldConfig(), resume=args.resume,
                                    quiet=args.quiet, attention_backend=args.attention_backend))
        from accelerate import Accelerator

        from examples.ddis.pipeline import STAGES, FullRun, run_full

        stages = comma_list(args.stages) if args.stages else STAGES
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise SystemExit(f"--stages: unknown stage(s) {sorted(unknown)} ({', '.join(STAGES)})")
        accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
        accelerator.print(f"DDIS preset {preset.name} ({preset.teacher} -> {preset.student}) on {accelerator.device} "
                          f"x{accelerator.num_processes}; out {out}")
        return run_full(FullRun(preset=preset, out=out, pretrained_model=args.pretrained_model,
                                teacher_ckpt=args.teacher_ckpt, class_names_file=args.class_names,
                                test_root=args.test_root, stages=stages, seed=args.seed, resume=args.resume,
                                quiet=args.quiet, attention_backend=args.attention_backend), accelerator)
    except FileNotFoundError as e:  # missing weights or data: a message, not a traceback
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
