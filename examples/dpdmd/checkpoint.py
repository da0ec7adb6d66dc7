"""Resumable checkpoints of a distillation run through ``accelerator.save_state``.

accelerate writes every prepared model and optimizer (gathered or sharded as its FSDP plugin says)
and every process' RNG states; the trainer's own counters and log rows go to ``trainer.json``. The
state is written to ``<dir>.tmp`` and renamed by the main process, so a run killed mid-write keeps
the previous checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional


def save(accelerator, directory: Path, trainer_state: Dict[str, Any]) -> Path:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # before any rank writes its RNG file into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    accelerator.wait_for_everyone()
    return directory


def load(accelerator, directory: Path) -> Optional[Dict[str, Any]]:
    """Restore models, optimizers and RNGs from ``directory``; its trainer state, or None if there is none."""
    directory = Path(directory)
    if not (directory / "trainer.json").is_file():
        return None
    accelerator.load_state(str(directory))
    return json.loads((directory / "trainer.json").read_text())
