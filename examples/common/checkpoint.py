"""The checkpoint/resume format shared by the examples.

A checkpoint is one directory ``<out>/checkpoints/step-<global step>/``:

* ``<stage>/``: ``accelerator.save_state`` of the stage being trained (its prepared models, optimizers, the
  fp16 loss scaler, accelerate's per-process RNG files). The folder is named by the stage, and ``meta.json``
  records it: ``load`` refuses to restore it into any other stage, so the optimizer state of stage I can never
  land in the optimizer of stage II (a resume at a stage boundary starts the next stage's optimizer fresh,
  from the finished stage's products).
* ``rng-rank<r>.pt``: every RNG of every process: torch (CPU, CUDA), numpy, python and the generators the run
  owns (by name).
* ``state.pt`` (written by the main process): the run's own state: the stage's position (epoch, batch within
  the epoch, scheduler state, anything else the loop keeps), the log rows so far and the products of the
  finished stages (weights a later stage starts from, results).
* ``meta.json``: stage, global step, the settings and their fingerprint (``settings_fingerprint``): a resume
  with other settings is refused with the differing fields.

Written atomically: everything goes to ``step-N.tmp`` first, which is renamed once complete, then the
``latest`` pointer file is replaced; the ``keep`` newest checkpoints are kept. ``history.jsonl`` gets one line
``{"step", "stage"}`` per checkpoint written (also those deleted since): where a run can be stopped and resumed.
A run started afresh in a folder that holds a longer run's checkpoints replaces that timeline: writing step N
deletes the checkpoints and history records past N.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from .rng import atomic_save, rng_state, set_rng_state

LATEST = "latest"
HISTORY = "history.jsonl"


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the settings as canonical JSON (what changes a run's results: preset fields and result-changing
    flags; never --out, --resume or --max-steps)."""
    text = json.dumps(_plain(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(obj):
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@dataclass
class Checkpoint:
    """What ``latest`` returns: where, which stage, at which global step, and the run state."""
    path: Path
    stage: str
    step: int
    settings: Dict[str, Any]
    state: Dict[str, Any] = field(default_factory=dict)


class SettingsMismatch(SystemExit):
    pass


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save(root: Path, accelerator, *, stage: str, step: int, settings: Mapping[str, Any], state: Dict[str, Any],
         generators: Optional[Dict[str, torch.Generator]] = None, rank_state: Optional[Dict[str, Any]] = None,
         keep: int = 2) -> Path:
    """Write the checkpoint of global ``step`` (all processes call this). ``state`` is written by the main
    process; every process writes its RNGs and its ``rank_state`` (what differs between ranks, e.g. the
    partial sums of an epoch's metrics)."""
    if keep < 1:
        raise ValueError(f"checkpoint.save: keep must be >= 1, got {keep}")
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / stage))
    rngs = rng_state()
    rngs["generators"] = {name: g.get_state() for name, g in (generators or {}).items()}
    rngs["rank_state"] = rank_state or {}
    atomic_save(rngs, tmp / f"rng-rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        atomic_save(state, tmp / "state.pt")
        meta = {"stage": stage, "step": step, "num_processes": accelerator.num_processes,
                "fingerprint": settings_fingerprint(settings), "settings": _plain(settings)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        # Checkpoints past this step belong to an earlier run of this folder that went further (a run started
        # afresh in it): this run's timeline replaces theirs, in the folders and in the history.
        records = [h for h in history(root) if h["step"] < step] + [{"step": step, "stage": stage}]
        _write_text(root / HISTORY, "".join(json.dumps(h) + "\n" for h in records))
        written = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")),
                         key=lambda p: int(p.name.split("-")[1]))
        for old in [p for p in written if int(p.name.split("-")[1]) > step] + \
                [p for p in written if int(p.name.split("-")[1]) <= step][:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest(root: Path, settings: Mapping[str, Any], num_processes: int = 1) -> Optional[Checkpoint]:
    """The checkpoint ``latest`` points at (None when there is none), after checking it was made with
    ``settings`` and as many processes (their RNG streams are per rank)."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    meta = json.loads((path / "meta.json").read_text())
    if meta["fingerprint"] != settings_fingerprint(settings):
        theirs, ours = meta["settings"], _plain(settings)
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise SettingsMismatch(
            f"--resume: the checkpoint {path} was written with other settings ("
            + "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}" for k in diff)
            + "). Resume with the same settings, or use another --out.")
    if meta["num_processes"] != num_processes:
        raise SettingsMismatch(f"--resume: the checkpoint {path} was written by {meta['num_processes']} processes, "
                               f"this run has {num_processes}: every rank's random stream is part of it")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return Checkpoint(path, meta["stage"], int(meta["step"]), meta["settings"], state)


def load(ckpt: Checkpoint, accelerator, stage: str,
         generators: Optional[Dict[str, torch.Generator]] = None) -> Dict[str, Any]:
    """Restore the accelerate state (models, optimizers, scaler) of ``stage`` and every RNG of this process;
    returns this process' ``rank_state``.
    The prepared objects of ``stage`` must be registered (``accelerator.prepare``) in the order they were
    when the checkpoint was written."""
    if ckpt.stage != stage:
        raise ValueError(f"checkpoint.load: {ckpt.path} holds the state of stage {ckpt.stage!r}; refusing to load "
                         f"it into stage {stage!r}")
    accelerator.load_state(str(ckpt.path / stage))
    rngs = torch.load(ckpt.path / f"rng-rank{accelerator.process_index}.pt", map_location="cpu", weights_only=False)
    set_rng_state(rngs)
    for name, g in (generators or {}).items():
        if name not in rngs["generators"]:
            raise KeyError(f"checkpoint.load: {ckpt.path} has no state for generator {name!r} "
                           f"(it has {sorted(rngs['generators'])})")
        g.set_state(rngs["generators"][name])
    return rngs["rank_state"]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def history(root: Path) -> list:
    """The ``{"step", "stage"}`` records of every checkpoint written under ``root``, in order ([] if none)."""
    path = Path(root) / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
