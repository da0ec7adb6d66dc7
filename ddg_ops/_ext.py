"""Loads the compiled extension ``ddg_ops._C`` and records whether the ops can use it.

Environment:
  DDG_DISABLE_EXT=1  never load the extension: every op runs its pure-PyTorch reference.
  DDG_REQUIRE_EXT=1  a missing, stale or unloadable extension is an ImportError instead of
                     one warning (use it in tests and benchmarks).
  DDG_CUDA_EMULATOR=1|PATH  load the CUDA emulator library (tests/cuda_emu; built by
                     ``python -m tests.cuda_emu.build``, default build/cuda_emu/ddg_cuda_emu.so)
                     instead of ``_C``: ops on CPU tensors run the csrc/cuda kernels on CPU fibers.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

_BUILD_INFO = Path(__file__).with_name("_build_info.json")


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


@dataclass(frozen=True)
class ExtensionState:
    loaded: bool
    reason: str
    build_info: dict = field(default_factory=dict)
    # Device types with a compiled kernel ("cpu", and "cuda" for a CUDA build).
    device_types: frozenset = frozenset()


def _read_build_info() -> dict:
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def _load_cuda_emulator(setting: str) -> ExtensionState:
    """The CUDA kernels emulated on CPU (docs/cuda_emulator.md), registered for CPU tensors."""
    path = Path(__file__).resolve().parent.parent / "build" / "cuda_emu" if setting == "1" else Path(setting)
    if path.is_dir():
        path = path / "ddg_cuda_emu.so"
    info = {"backends": ["cuda-emulator"], "torch": torch.__version__, "library": str(path)}
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:
        return ExtensionState(False, f"CUDA emulator (DDG_CUDA_EMULATOR={setting}) not loadable ({exc}); build it "
                              "with `python -m tests.cuda_emu.build`", info)
    return ExtensionState(True, f"CUDA emulator: the csrc/cuda kernels run on CPU tensors ({path})", info,
                          frozenset({"cpu"}))


def _load() -> ExtensionState:
    if _flag("DDG_DISABLE_EXT"):
        return ExtensionState(False, "disabled by DDG_DISABLE_EXT=1")
    if _flag("DDG_CUDA_EMULATOR"):
        return _load_cuda_emulator(os.environ["DDG_CUDA_EMULATOR"])
    info = _read_build_info()
    built_for = info.get("torch")
    if built_for and built_for != torch.__version__:
        # The classic-ATen-API binary is tied to one torch version: importing it under
        # another can fail with undefined symbols or, worse, load and misbehave.
        return ExtensionState(False, f"stale: built for torch {built_for}, running torch "
                              f"{torch.__version__}; rebuild with `pip install --no-build-isolation -e .`",
                              info)
    try:
        from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
    except ImportError as exc:
        return ExtensionState(False, f"not built or not loadable ({exc}); build it with "
                              "`pip install --no-build-isolation -e .`", info)
    types = {"cpu"}
    if torch._C._dispatch_has_kernel_for_dispatch_key("ddg::cfg_combine", "CUDA"):
        types.add("cuda")
    return ExtensionState(True, "loaded", info, frozenset(types))


STATE = _load()

if not STATE.loaded:
    message = f"ddg_ops: compiled kernels unavailable, using the pure-PyTorch reference ops: {STATE.reason}"
    if _flag("DDG_REQUIRE_EXT"):
        raise ImportError(message + " (DDG_REQUIRE_EXT=1)")
    if not _flag("DDG_DISABLE_EXT"):
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def use_kernel(t: torch.Tensor) -> bool:
    """Whether ops on tensors like ``t`` run the compiled kernel (else the reference)."""
    return t.device.type in STATE.device_types
