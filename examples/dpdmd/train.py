"""DP-DMD: few-step distillation of a flow-matching teacher by distribution matching, first step anchored.

    python examples/dpdmd/train.py --preset tiny                     # CPU, 2-D: DMD vs DP-DMD, known truth
    python examples/dpdmd/train.py --preset smoke --mixed-precision bf16   # CPU: the sd35m code path
    accelerate launch --config_file examples/dpdmd/accelerate_fsdp.yaml examples/dpdmd/train.py \\
        --preset sd35m --mixed-precision bf16 --pretrained-model /models/stable-diffusion-3.5-medium \\
        --prompts /data/diffusiondb.txt --eval-prompts /data/training_div_test_coco.txt \\
        --diversity-model /models/dinov2-base

Outputs go to runs/dpdmd/<preset>/ (``--out``). SD3 presets: log.csv / log.json / log.md (one row per step),
curves.png, samples_<step>.png grids, results.json (final metrics), checkpoints/ (``--resume`` continues from the
latest; ``--max-steps N`` stops after the checkpoint at step N), export/student_transformer/. A step is one
optimizer update, of the fake score or of the student. tiny: results.md / results.json (per condition: mode
coverage, energy distance to the teacher, diversity), log.csv, scatter.png. Nothing is downloaded: weights,
prompts and the diversity model are local paths (smoke builds random-weight ones under <out>/smoke_assets/).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.dpdmd` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.common.cli import add_attention_backend, add_run_options, comma_list, example_parser, \
    run_seeds  # noqa: E402
from examples.dpdmd.presets import PRESETS, ToyPreset  # noqa: E402
from examples.dpdmd.tiny import METHODS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__, PRESETS, "dpdmd")
    add_run_options(parser)
    parser.add_argument("--pretrained-model", type=Path,
                        help="local StableDiffusion3Pipeline folder (SD3.5-Medium layout); smoke: built when absent")
    parser.add_argument("--prompts", type=Path, help="training prompts, one per line")
    parser.add_argument("--eval-prompts", type=Path, help="evaluation prompts (default: the first training ones)")
    parser.add_argument("--diversity-model", type=Path, help="local CLIP vision or DINOv2 folder for the diversity")
    parser.add_argument("--iterations", type=int, help="tiny: distillation iterations of each student")
    parser.add_argument("--methods", default="dmd,dpdmd", help=f"tiny: students to train ({', '.join(METHODS)})")
    parser.add_argument("--k-anchor", type=int, help="teacher steps of the anchor (0: no anchor loss)")
    parser.add_argument("--div-weight", type=float, help="weight of the anchor loss")
    parser.add_argument("--guidance-scale", type=float, help="teacher CFG scale")
    parser.add_argument("--fake-per-generator", type=int, help="TTUR ratio")
    parser.add_argument("--batch-size", type=int, help="per process")
    parser.add_argument("--student-init", choices=("teacher", "random"), help="tiny: the student's initial weights")
    parser.add_argument("--lr-generator", type=float, help="the student's learning rate")
    parser.add_argument("--lr-fake", type=float, help="the fake score's learning rate")
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
    seeds = run_seeds(args)
    if len(seeds) > 1:
        raise SystemExit(f"--seeds {','.join(map(str, seeds))}: a DP-DMD run has one seed; run each seed with its "
                         "own --out")
    changes = {"seed": seeds[0]} if (args.seed is not None or args.seeds) else {}
    changes.update({k: v for k, v in (("lr_generator", args.lr_generator), ("lr_fake", args.lr_fake))
                    if v is not None})
    tiny_only = {k: v for k, v in (("student_init", args.student_init), ("mode_decay", args.mode_decay))
                 if v is not None}
    if tiny_only and not isinstance(preset, ToyPreset):
        raise SystemExit(f"--{next(iter(tiny_only)).replace('_', '-')} is for the tiny preset")
    changes.update(tiny_only)
    if args.batch_size is not None:
        changes["batch" if isinstance(preset, ToyPreset) else "batch_size"] = args.batch_size
    if args.iterations is not None:
        if not isinstance(preset, ToyPreset):
            raise SystemExit("--iterations is for the tiny preset; SD3 presets stop with --max-steps")
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
            from examples.dpdmd.tiny import run_tiny
            if args.max_steps is not None:
                raise SystemExit("--max-steps is for the SD3 presets; the tiny preset sets --iterations per student")
            methods = list(comma_list(args.methods))
            unknown = set(methods) - set(METHODS)
            if unknown:
                raise SystemExit(f"--methods: unknown {sorted(unknown)} (choose from {', '.join(METHODS)})")
            return run_tiny(preset, out, methods, resume=args.resume, quiet=args.quiet, cpu=cpu,
                            mixed_precision=args.mixed_precision)
        from examples.dpdmd.pipeline import RunConfig, StopRun, check_model_folder, read_prompts, run
        from examples.dpdmd.smoke import build_smoke_assets
        if args.quiet:  # also the bars of diffusers' and transformers' loaders and savers
            import diffusers
            import transformers
            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
        model, prompts, eval_prompts, diversity = (args.pretrained_model, args.prompts, args.eval_prompts,
                                                   args.diversity_model)
        if preset.name != "smoke" and (model is None or prompts is None):
            raise SystemExit(f"--preset {preset.name} needs --pretrained-model (local SD3.5 folder) and --prompts "
                             "(.txt)")
        if model is not None:  # before any process group exists: a clear message on bad paths
            check_model_folder(model)
        if prompts is not None:
            read_prompts(prompts)
        # --mixed-precision is what the run uses (Accelerator's argument wins over an accelerate config's)
        accelerator = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision)
        if model is None:  # smoke without --pretrained-model: the random-weight SD3.5-Medium folder
            assets = build_smoke_assets(out, accelerator)
            model, prompts = assets.model, prompts or assets.prompts
            eval_prompts, diversity = eval_prompts or assets.eval_prompts, diversity or assets.diversity_model
        rc = RunConfig(preset, out, model, prompts, eval_prompts, diversity, args.mixed_precision, args.max_steps,
                       args.resume, args.quiet, args.attention_backend)
        try:
            return run(rc, accelerator)
        except StopRun:
            accelerator.print(f"--max-steps {args.max_steps}: stopped after the checkpoint at step {args.max_steps}; "
                              "--resume continues the run")
            return None
    except FileNotFoundError as e:  # missing weights or prompts: a message, not a traceback
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
