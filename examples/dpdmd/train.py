"""DP-DMD: few-step distillation of a flow-matching teacher by distribution matching, first step anchored.

    python examples/dpdmd/train.py --preset tiny                     # CPU, 2-D: DMD vs DP-DMD, known truth
    python examples/dpdmd/train.py --preset sd3_smoke                # CPU: the SD3 pipeline on a tiny model
    accelerate launch --config_file examples/dpdmd/accelerate_fsdp.yaml examples/dpdmd/train.py \\
        --preset sd35m --model /models/stable-diffusion-3.5-medium --prompts /data/diffusiondb.txt \\
        --eval-prompts /data/training_div_test_coco.txt --diversity-model /models/dinov2-base

Outputs go to runs/dpdmd/<preset>/ (``--out``). tiny: results.md / results.json (per condition: mode
coverage, energy distance to the teacher, diversity), log.csv, scatter.png. SD3: log.csv, eval.csv,
samples_<iteration>.png grids, checkpoint/ (``--resume`` continues from it), student_transformer/.
Nothing is downloaded: weights, prompts and the diversity model are local paths.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.dpdmd` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.common.cli import add_attention_backend, comma_list, example_parser  # noqa: E402
from examples.dpdmd.presets import PRESETS, ToyPreset  # noqa: E402
from examples.dpdmd.toy2d import METHODS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__, PRESETS, "dpdmd")
    parser.add_argument("--model", type=Path, help="local StableDiffusion3Pipeline folder (SD3.5-Medium layout); "
                                                   "sd3_smoke: built here when not given")
    parser.add_argument("--prompts", type=Path, help="training prompts, one per line")
    parser.add_argument("--eval-prompts", type=Path, help="evaluation prompts (default: the first training ones)")
    parser.add_argument("--diversity-model", type=Path, help="local CLIP vision or DINOv2 folder for the diversity")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    parser.add_argument("--max-steps", type=int, help="stop after this many iterations")
    parser.add_argument("--iterations", type=int, help="tiny: distillation iterations of each student")
    parser.add_argument("--methods", default="dmd,dpdmd", help=f"tiny: students to train ({', '.join(METHODS)})")
    parser.add_argument("--k-anchor", type=int, help="teacher steps of the anchor (0: no anchor loss)")
    parser.add_argument("--div-weight", type=float, help="weight of the anchor loss")
    parser.add_argument("--guidance-scale", type=float, help="teacher CFG scale")
    parser.add_argument("--fake-per-generator", type=int, help="TTUR ratio")
    parser.add_argument("--batch-size", type=int, help="per process")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--student-init", choices=("teacher", "random"), help="tiny: the student's initial weights")
    parser.add_argument("--lr-generator", type=float, help="tiny: the student's learning rate")
    parser.add_argument("--lr-fake", type=float, help="tiny: the fake score's learning rate")
    parser.add_argument("--mode-decay", type=float, help="tiny: mode weights decay^j within a condition")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is visible")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_attention_backend(parser)
    return parser.parse_args(argv)


def build_preset(args: argparse.Namespace):
    preset = PRESETS[args.preset]
    distill = {k: v for k, v in (("anchor_steps", args.k_anchor), ("anchor_weight", args.div_weight),
                                 ("guidance_scale", args.guidance_scale),
                                 ("fake_per_generator", args.fake_per_generator)) if v is not None}
    changes = {k: v for k, v in (("seed", args.seed),) if v is not None}
    tiny_only = {k: v for k, v in (("student_init", args.student_init), ("lr_generator", args.lr_generator),
                                   ("lr_fake", args.lr_fake), ("mode_decay", args.mode_decay)) if v is not None}
    if tiny_only and not isinstance(preset, ToyPreset):
        raise SystemExit(f"--{next(iter(tiny_only)).replace('_', '-')} is for the tiny preset")
    changes.update(tiny_only)
    if args.batch_size is not None:
        changes["batch" if isinstance(preset, ToyPreset) else "batch_size"] = args.batch_size
    if args.iterations is not None:
        if not isinstance(preset, ToyPreset):
            raise SystemExit("--iterations is for the tiny preset; use --max-steps")
        changes["iterations"] = args.iterations
    return replace(preset, distill=replace(preset.distill, **distill), **changes)


def main(argv=None):
    args = parse_args(argv)
    preset = build_preset(args)
    out = args.out or Path("runs/dpdmd") / preset.name
    import torch
    from accelerate import Accelerator

    cpu = args.cpu or not torch.cuda.is_available()
    try:
        if isinstance(preset, ToyPreset):
            from examples.dpdmd.toy2d import run_tiny
            methods = list(comma_list(args.methods))
            unknown = set(methods) - set(METHODS)
            if unknown:
                raise SystemExit(f"--methods: unknown {sorted(unknown)} (choose from {', '.join(METHODS)})")
            return run_tiny(preset, out, methods, resume=args.resume, quiet=args.quiet, cpu=cpu)
        from examples.dpdmd.sd3_pipeline import SD3Run, check_model_folder, read_prompts, run_sd3
        model, prompts, diversity = args.model, args.prompts, args.diversity_model
        if preset.name != "sd3_smoke" and (model is None or prompts is None):
            raise SystemExit(f"--preset {preset.name} needs --model (local SD3.5 folder) and --prompts (.txt)")
        if model is not None:  # before any process group exists: a clear message on bad paths
            check_model_folder(model)
        if prompts is not None:
            read_prompts(prompts)
        # Precision comes from the launch (accelerate config / flags); the preset sets the weights' dtype.
        accelerator = Accelerator(cpu=cpu)
        if model is None:  # sd3_smoke without --model: build the tiny SD3 folder once
            from examples.dpdmd.tiny_sd3 import build_tiny_sd3
            model = out / "tiny_sd3"
            if accelerator.is_main_process and not (model / "model_index.json").is_file():
                build_tiny_sd3(model, preset.resolution)
            accelerator.wait_for_everyone()
            prompts = prompts or model / "prompts.txt"
            diversity = diversity or model / "clip_vision"
        return run_sd3(SD3Run(preset, model, prompts, out, args.eval_prompts, diversity, args.max_steps,
                              args.resume, args.quiet, args.attention_backend), accelerator)
    except FileNotFoundError as e:  # missing weights or prompts: a message, not a traceback
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
