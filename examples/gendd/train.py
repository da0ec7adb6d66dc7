"""GenDD (Generative Distribution Distillation) training: stage 1, stage 2 and an optional linear probe.

    python examples/gendd/train.py --preset tiny                      # CPU, digits: CE vs KD vs GenDD
    python examples/gendd/train.py --preset smoke                     # seconds: r34_r18's path on fixtures
    python examples/gendd/train.py --preset smoke_cifar               # seconds: res56_res20's path on fixtures
    python examples/gendd/train.py --preset res56_res20 --data-root /data/cifar100 \\
        --teacher-ckpt /ckpt/resnet56_vanilla/ckpt_epoch_240.pth
    accelerate launch examples/gendd/train.py --preset r34_r18 --data-root /data/imagenet \\
        --teacher-ckpt /ckpt/resnet34.pth                            # 8 GPUs: 512 = 8 x 64

Outputs go to runs/gendd/<preset>/ (``--out``): log.csv / log.json / log.md (one row per epoch and stage),
curves.png, results.json (its "metrics": the final accuracies and losses) / results.md, checkpoints/ (every
epoch) and export/ (the trained student, condition LayerNorm, head and teacher classifier as safetensors:
``examples.gendd.export.load_gendd``); ``--max-steps N`` stops after the checkpoint at optimizer step N (all
stages count), ``--resume`` continues exactly where a run stopped. Nothing is downloaded: datasets come from
``--data-root`` and teachers from ``--teacher-ckpt`` (the smoke presets write theirs under <out>/smoke_assets/).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.gendd` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.common.cli import add_run_options, comma_list, example_parser, run_seeds  # noqa: E402
from examples.common.main_process import on_main  # noqa: E402
from examples.gendd import smoke  # noqa: E402
from examples.gendd.pipeline import RunConfig, StopRun, run_distill  # noqa: E402
from examples.gendd.presets import PRESETS, rescale  # noqa: E402
from examples.gendd.tiny import run_tiny  # noqa: E402

SMOKE_PRESETS = ("smoke", "smoke_cifar")  # their data and teacher come from smoke.py unless given


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__, PRESETS, "gendd")
    add_run_options(parser)  # --seed/--seeds (tiny: one table column per seed), --mixed-precision (the
    # backbones autocast; the diffusion loss always runs in fp32), --max-steps, --resume
    parser.add_argument("--data-root", help="CIFAR-100 root (with cifar-100-python/) or ImageNet root (train/, val/)")
    parser.add_argument("--teacher-ckpt", help="local teacher checkpoint (required for CIFAR/ImageNet presets)")
    parser.add_argument("--from-checkpoint", help="a checkpoint of an earlier run (<out>/checkpoints or one of its "
                                                  "step-* folders): the stages it finished that this run does not "
                                                  "run (stage1 before stage 2, stage2 before the probe) come from it")
    parser.add_argument("--stages", help="comma list of stage1,stage2,probe (default: the preset's)")
    parser.add_argument("--methods", default="ce,kd,gendd", help="tiny preset: students to train (ce, kd, gendd)")
    parser.add_argument("--epochs", type=int, help="stage-2 epochs (tiny: every stage); warmup/milestones rescale")
    parser.add_argument("--stage1-epochs", type=int)
    parser.add_argument("--probe-epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="total batch size over all processes")
    parser.add_argument("--lr", type=float, help="stage-2 learning rate")
    parser.add_argument("--batch-mul", type=int, help="R: copies of each token per step")
    parser.add_argument("--contraction", type=float, help="lambda of the distribution contraction")
    parser.add_argument("--head-width", type=int)
    parser.add_argument("--eval-steps", type=int, help="sampling steps of the evaluation")
    parser.add_argument("--eval-samples", type=int, help="n_s: generated samples averaged per image")
    parser.add_argument("--eval-cfg", type=float, help="classifier-free guidance scale of the evaluation")
    parser.add_argument("--val-every", type=int, help="sampling validation every k epochs")
    parser.add_argument("--steps-per-epoch", type=int, help="cap the batches of an epoch")
    parser.add_argument("--eval-batches", type=int, help="evaluate on this many test batches only")
    parser.add_argument("--data-limit", type=int, help="use the first N training / test samples only")
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is visible")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                        help="deterministic kernels (default: on for CPU runs, off on GPU). The head's gathers "
                             "backpropagate with index_put(accumulate) whose multi-threaded CPU kernel adds in "
                             "a racy order: without this, two runs with one seed differ after a few steps")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> RunConfig:
    preset = PRESETS[args.preset]
    changes = {}
    for arg, field in (("batch_size", "batch_size"), ("batch_mul", "batch_mul"), ("contraction", "contraction"),
                       ("head_width", "head_width"), ("eval_steps", "eval_steps"), ("eval_samples", "eval_samples"),
                       ("eval_cfg", "eval_cfg"), ("val_every", "val_every"), ("num_workers", "num_workers")):
        if getattr(args, arg) is not None:
            changes[field] = getattr(args, arg)
    stage2 = rescale(preset.stage2, args.epochs)
    if args.lr is not None:
        stage2 = replace(stage2, lr=args.lr)
    changes["stage2"] = stage2
    if preset.stage1 is not None:
        changes["stage1"] = rescale(preset.stage1, args.stage1_epochs)
    if preset.probe is not None:
        changes["probe"] = rescale(preset.probe, args.probe_epochs)
    if preset.teacher_stage is not None:
        changes["teacher_stage"] = rescale(preset.teacher_stage, args.epochs)
    preset = preset.with_overrides(**changes)
    seeds = run_seeds(args)
    stages = comma_list(args.stages) if args.stages else preset.stages
    unknown = set(stages) - {"stage1", "stage2", "probe"}
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {sorted(unknown)} (stage1, stage2, probe)")
    return RunConfig(preset=preset, out=args.out or Path("runs/gendd") / preset.name, seeds=seeds, stages=stages,
                     data_root=args.data_root, teacher_ckpt=args.teacher_ckpt, from_checkpoint=args.from_checkpoint,
                     resume=args.resume, max_steps=args.max_steps, steps_per_epoch=args.steps_per_epoch,
                     eval_batches=args.eval_batches, data_limit=args.data_limit, quiet=args.quiet,
                     methods=comma_list(args.methods), mixed_precision=args.mixed_precision)


def configure_determinism(enabled: bool, cuda: bool) -> None:
    """Deterministic algorithms (CPU: the sort-based index_put accumulate; CUDA: cuBLAS workspace, no cuDNN
    autotuning; ops without a deterministic kernel warn instead of failing)."""
    import os

    import torch

    if enabled and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=cuda)


def main(argv=None):
    args = parse_args(argv)
    rc = build_config(args)
    import torch
    from accelerate import Accelerator

    cpu = args.cpu or not torch.cuda.is_available()
    configure_determinism(cpu if args.deterministic is None else args.deterministic, not cpu)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=cpu)
    if rc.preset.name in SMOKE_PRESETS and rc.data_root is None and rc.teacher_ckpt is None:
        data_root, teacher_ckpt = on_main(accelerator, lambda: smoke.build(rc.preset.name, rc.out))
        rc = replace(rc, data_root=data_root, teacher_ckpt=teacher_ckpt)
    accelerator.print(f"GenDD preset {rc.preset.name} ({rc.preset.dataset}: {rc.preset.teacher} -> "
                      f"{rc.preset.student}) on {accelerator.device} x{accelerator.num_processes}; out {rc.out}")
    try:
        if rc.preset.dataset == "digits":
            return run_tiny(rc, accelerator)
        return run_distill(rc, accelerator)
    except StopRun:
        accelerator.print(f"--max-steps {rc.max_steps}: stopped after the checkpoint at step {rc.max_steps}; "
                          f"--resume continues the run")
        return None
    except FileNotFoundError as e:  # missing data or checkpoints: a message, not a traceback
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
