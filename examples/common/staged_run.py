"""What every stage of an example's run shares, and how a resume is handed to the stage it belongs to.

A run is a sequence of named stages (docs/examples.md, "Checkpoints"). ``StagedRun.start`` reads the latest
checkpoint when ``--resume`` is given: the global step, the log rows so far and the products of the finished
stages come back at once; the checkpoint itself waits in ``resume_from`` until the stage that wrote it asks for it
(``resume_point``), or is dropped by a finished stage that wrote it as it ended (``skip``). A checkpoint no stage
takes is an error at the end (``finished``): a resume never silently restarts a run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from . import checkpoint
from .runlog import RunLog


class StopRun(Exception):
    """Raised right after the checkpoint at ``--max-steps``."""


@dataclass
class StagedRun:
    """The accelerator, the run's settings (``rc``: ``out``, ``resume``, ``max_steps``, ``settings()``), the global
    optimizer step, the log, the checkpoint to resume from and the products of the finished stages."""
    rc: object
    accelerator: object
    log: RunLog
    step: int = 0
    resume_from: Optional[checkpoint.Checkpoint] = None
    products: Dict[str, Dict] = field(default_factory=dict)

    @classmethod
    def start(cls, rc, accelerator, log: RunLog) -> "StagedRun":
        run = cls(rc, accelerator, log)
        if rc.resume:
            ckpt = checkpoint.latest(run.ckpt_root, rc.settings(), accelerator.num_processes)
            if ckpt is None:
                accelerator.print(f"--resume: no checkpoint in {run.ckpt_root}; starting from the beginning")
            else:
                run.resume_from, run.step = ckpt, ckpt.step
                run.products = dict(ckpt.state["products"])
                log.restore(ckpt.state["rows"])
                accelerator.print(f"resuming from {ckpt.path} (stage {ckpt.stage}, step {ckpt.step})")
        return run

    @property
    def ckpt_root(self) -> Path:
        return Path(self.rc.out) / "checkpoints"

    def at_max(self) -> bool:
        return self.rc.max_steps is not None and self.step >= self.rc.max_steps

    def stop_if_at_max(self) -> None:
        """Before a stage starts: at ``--max-steps`` the run stops here (the checkpoint of this step is written)."""
        if self.at_max():
            self.log.close()
            raise StopRun

    def skip(self, stage: str) -> None:
        """``stage`` is finished (its product is in the checkpoint): a checkpoint it wrote as it ended is not
        resumed into."""
        if self.resume_from is not None and self.resume_from.stage == stage:
            self.resume_from = None

    def resume_point(self, stage: str) -> Optional[checkpoint.Checkpoint]:
        """The checkpoint ``stage`` resumes from, or None for a fresh start. The caller restores it
        (``checkpoint.load``) and then clears ``resume_from``. A checkpoint of a later stage is an error: every
        stage before it must have its product in the checkpoint."""
        ckpt = self.resume_from
        if ckpt is not None and ckpt.stage != stage:
            raise RuntimeError(f"--resume: the checkpoint {ckpt.path} is of stage {ckpt.stage!r}, but stage "
                               f"{stage!r} before it has no product in it")
        return ckpt

    def finished(self) -> None:
        self.log.close()
        if self.resume_from is not None:
            raise RuntimeError(f"--resume: no stage of this run is named {self.resume_from.stage!r} "
                               f"(the checkpoint {self.resume_from.path})")
