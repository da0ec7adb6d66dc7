"""Loads the compiled extension ``ddg_ops._C`` and records whether the ops can use it.

A loaded extension is also checked against the machine (docs/build.md, "Import checks"):
  * CPU: the kernel files are compiled for one SIMD level (e.g. AVX-512); on a CPU without
    those features CPU tensors use the reference ops (one warning at import);
  * CUDA: on the first op on each GPU its compute capability is compared with the archs the
    build compiled for; a GPU the build has no SASS or PTX for uses the reference ops (one
    warning per device) instead of failing with "no kernel image is available".

Environment:
  DDG_DISABLE_EXT=1  never load the extension: every op runs its pure-PyTorch reference.
  DDG_REQUIRE_EXT=1  a missing, stale or unloadable extension, CPU kernels this CPU cannot run
                     (at import) or a GPU the build has no kernels for (at its first op) are
                     errors instead of one warning (use it in tests and benchmarks).
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

from ._archs import kernel_image_for, missing_cpu_features, read_cpu_flags

_BUILD_INFO = Path(__file__).with_name("_build_info.json")


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


@dataclass(frozen=True)
class ExtensionState:
    loaded: bool
    reason: str
    build_info: dict = field(default_factory=dict)
    # Device types with a compiled kernel ("cpu", and "cuda" for a CUDA build); "cpu" is left
    # out when this CPU cannot run the CPU kernels (cpu_problem says why).
    device_types: frozenset = frozenset()
    cpu_problem: str | None = None


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
        from . import _C  # runs the TORCH_LIBRARY registrations
    except ImportError as exc:
        return ExtensionState(False, f"not built or not loadable ({exc}); build it with "
                              "`pip install --no-build-isolation -e .`", info)
    # Builds older than these attributes compiled every file with the SIMD flags: had this CPU
    # lacked them, the import above would not have returned.
    compiled_for = set(filter(None, getattr(_C, "CPU_KERNEL_FEATURES", "").split(",")))
    cpu_problem = cpu_kernel_problem(sorted(compiled_for | set(info.get("cpu_kernel_features", []))),
                                     _read_cpu_flags(), bool(getattr(_C, "CPU_RUNS_KERNELS", True)),
                                     info.get("cpu_capability", "?"))
    types = set() if cpu_problem else {"cpu"}
    if torch._C._dispatch_has_kernel_for_dispatch_key("ddg::cfg_combine", "CUDA"):
        types.add("cuda")
    return ExtensionState(True, "loaded", info, frozenset(types), cpu_problem)


# The running CPU's /proc/cpuinfo flags (None where unreadable); tests replace it.
_read_cpu_flags = read_cpu_flags


def cpu_kernel_problem(required, cpu_flags, cpuid_ok: bool, capability: str) -> str | None:
    """Why this CPU cannot run CPU kernels compiled for ``required`` features, or None.
    ``cpu_flags``: the CPU's flags (None: unknown); ``cpuid_ok``: the extension's own CPUID answer
    (the guard in front of every CPU op), which decides when the flags are unknown."""
    missing = missing_cpu_features(required, cpu_flags)
    if missing is None:
        missing = [] if cpuid_ok else sorted(required)
    elif not missing and not cpuid_ok:
        missing = ["(per CPUID)"]
    if not missing:
        return None
    return (f"the CPU kernels were compiled for {capability} ({', '.join(sorted(required))}) and this CPU lacks "
            f"{', '.join(missing)}; rebuild on this machine or with DDG_CPU_CAPABILITY=avx2 or default")


def cuda_arch_problem(capability, build_info: dict) -> str | None:
    """Why a GPU of ``capability`` (major, minor) cannot run this build's CUDA kernels, or None.
    Builds that did not record their archs are assumed to fit (nothing to compare with)."""
    sass, ptx = build_info.get("cuda_sass_archs"), build_info.get("cuda_ptx_archs")
    if not sass and not ptx:
        return None
    if kernel_image_for(tuple(capability), sass or [], ptx or []) is not None:
        return None
    return (f"the CUDA kernels were compiled for SASS {sass or []} and PTX {ptx or []}, none of which runs on "
            f"compute capability {capability[0]}.{capability[1]}; rebuild with TORCH_CUDA_ARCH_LIST including "
            f"{capability[0]}.{capability[1]}")


STATE = _load()

if not STATE.loaded:
    message = f"ddg_ops: compiled kernels unavailable, using the pure-PyTorch reference ops: {STATE.reason}"
    if _flag("DDG_REQUIRE_EXT"):
        raise ImportError(message + " (DDG_REQUIRE_EXT=1)")
    if not _flag("DDG_DISABLE_EXT"):
        warnings.warn(message, RuntimeWarning, stacklevel=2)
elif STATE.cpu_problem:
    message = f"ddg_ops: CPU tensors use the pure-PyTorch reference ops: {STATE.cpu_problem}"
    if _flag("DDG_REQUIRE_EXT"):
        raise ImportError(message + " (DDG_REQUIRE_EXT=1)")
    warnings.warn(message, RuntimeWarning, stacklevel=2)

# CUDA device index -> whether its capability runs the built kernels (checked on first use).
_CUDA_DEVICE_OK: dict = {}


@torch.compiler.disable
def _check_cuda_device(index: int) -> bool:
    capability = torch.cuda.get_device_capability(index)
    problem = cuda_arch_problem(capability, STATE.build_info)
    if problem:
        message = (f"ddg_ops: ops on cuda:{index} ({torch.cuda.get_device_name(index)}) use the pure-PyTorch "
                   f"reference ops: {problem}")
        if _flag("DDG_REQUIRE_EXT"):
            raise RuntimeError(message + " (DDG_REQUIRE_EXT=1)")
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    _CUDA_DEVICE_OK[index] = problem is None
    return problem is None


def cuda_device_runs_kernels(index: int) -> bool:
    """Whether GPU ``index`` runs this build's CUDA kernels (warns once per device when not)."""
    ok = _CUDA_DEVICE_OK.get(index)
    return _check_cuda_device(index) if ok is None else ok


def use_kernel(t: torch.Tensor) -> bool:
    """Whether ops on tensors like ``t`` run the compiled kernel (else the reference)."""
    kind = t.device.type
    if kind not in STATE.device_types:
        return False
    if kind == "cuda":
        index = t.device.index
        return cuda_device_runs_kernels(torch.cuda.current_device() if index is None else index)
    return True
