"""The command-line pieces every example's train.py shares: the parser head (help text from the module docstring,
``--preset``, ``--out``) and comma-separated list arguments."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Iterable, Optional, Tuple


def example_parser(doc: str, presets: Iterable[str], method: str) -> argparse.ArgumentParser:
    """A parser whose description is the first line of ``doc`` (the rest is the epilog), with
    ``--preset`` (default 'tiny') and ``--out`` (default runs/<method>/<preset>, resolved by the caller)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--preset", choices=sorted(presets), default="tiny")
    parser.add_argument("--out", type=Path, help=f"run directory (default runs/{method}/<preset>)")
    return parser


def comma_list(text: Optional[str], cast: Callable = str) -> Tuple:
    """'a, b,,c' -> ('a', 'b', 'c') with each item passed through ``cast``; None or '' -> ()."""
    return tuple(cast(t.strip()) for t in (text or "").split(",") if t.strip())


def comma_ints(text: str) -> Tuple[int, ...]:
    """An argparse ``type`` for '0,1,2'."""
    return comma_list(text, int)
