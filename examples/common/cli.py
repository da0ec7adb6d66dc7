"""The command-line pieces every example's train.py shares: the parser head (help text from the module docstring,
``--preset``, ``--out``), ``--attention-backend`` for the examples that run diffusers models, and comma-separated
list arguments."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Iterable, Optional, Tuple

from ddg_models import ATTENTION_BACKENDS


def example_parser(doc: str, presets: Iterable[str], method: str) -> argparse.ArgumentParser:
    """A parser whose description is the first line of ``doc`` (the rest is the epilog), with
    ``--preset`` (default 'tiny') and ``--out`` (default runs/<method>/<preset>, resolved by the caller)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--preset", choices=sorted(presets), default="tiny")
    parser.add_argument("--out", type=Path, help=f"run directory (default runs/{method}/<preset>)")
    return parser


def add_attention_backend(parser: argparse.ArgumentParser) -> None:
    """``--attention-backend {sdpa,xformers}``: the kernel of the diffusers models' attention layers, applied
    with ``ddg_models.set_attention_backend`` where the example loads them."""
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="sdpa",
                        help="attention of the diffusers models: PyTorch SDPA (default) or xformers "
                             "(needs the xformers package and a GPU)")


def comma_list(text: Optional[str], cast: Callable = str) -> Tuple:
    """'a, b,,c' -> ('a', 'b', 'c') with each item passed through ``cast``; None or '' -> ()."""
    return tuple(cast(t.strip()) for t in (text or "").split(",") if t.strip())


def comma_ints(text: str) -> Tuple[int, ...]:
    """An argparse ``type`` for '0,1,2'."""
    return comma_list(text, int)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every example's run accepts: ``--seed N`` or ``--seeds A,B,C``, ``--mixed-precision``,
    ``--max-steps N`` (optimizer steps over all stages; the run stops right after the checkpoint written at
    step N) and ``--resume`` (continue from the latest checkpoint in ``--out``; a checkpoint written with
    other settings is refused)."""
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="base seed (default 0); rank r draws from seed "
                                                              "+ r x examples.common.seeding.RANK_STRIDE")
    seeds.add_argument("--seeds", type=comma_ints, default=None, help="comma list of seeds, run one after another")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                        help="accelerate's autocast (bf16 also on CPU)")
    parser.add_argument("--max-steps", type=_positive_int, default=None,
                        help="stop right after the checkpoint at this global optimizer step (all stages count)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --out (refused if it was made with other "
                             "settings)")


def run_seeds(args: argparse.Namespace) -> Tuple[int, ...]:
    """The seeds of a run: ``--seeds``, else ``--seed``, else (0,)."""
    if args.seeds:
        return tuple(args.seeds)
    return (0 if args.seed is None else args.seed,)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value
