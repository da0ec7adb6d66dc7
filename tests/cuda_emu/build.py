"""Builds the CUDA emulator library: the real csrc/cuda kernels compiled for CPU fibers.

    python -m tests.cuda_emu.build [--out DIR] [--quiet]

Compiles csrc/ddg_ops.cpp (the op schemas), csrc/host/*.cpp (checks and allocation), the
transformed csrc/cuda/* (kernels registered for CPU tensors) and the emulator's self-test kernels
(tests/cuda_emu/selftest_kernels.cu, ops cuda_emu_selftest::*) with the emulator runtime into
DIR/ddg_cuda_emu.so (default build/cuda_emu). csrc/cpu is not compiled: every ddg op on a CPU
tensor then runs the CUDA kernel. Load it with DDG_CUDA_EMULATOR=1 (see ddg_ops/_ext.py).

Flags: FMA contraction on, as nvcc compiles device code (-ffp-contract=fast, -mfma where the CPU
has it), and UBSan's alignment check without recovery, so a misaligned 16-byte Pack access
stops the process. MAX_JOBS sets the parallel compile jobs (default 2).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "build" / "cuda_emu"
LIBRARY_NAME = "ddg_cuda_emu"


def _cpu_has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def compile_flags() -> list[str]:
    flags = ["-O2", "-g0", "-ffp-contract=fast", "-fsanitize=alignment", "-fno-sanitize-recover=alignment",
             "-fno-omit-frame-pointer", "-Wno-unused-function", "-DDDG_CPU_KERNELS_DEFAULT"]
    if _cpu_has_fma():
        flags.append("-mfma")
    return flags


def transform_tree(out: Path, cuda_dir: Path = ROOT / "csrc" / "cuda") -> list[Path]:
    """Transforms every file of csrc/cuda into out/src/cuda (headers too: they may launch);
    returns the translation units (one per .cu)."""
    from .transform import transform_file

    units = []
    for src in sorted(cuda_dir.iterdir()):
        if src.suffix not in (".cu", ".cuh", ".h"):
            continue
        target = out / "src" / "cuda" / (src.name + ".cpp" if src.suffix == ".cu" else src.name)
        transform_file(src, target, EMU / "cuda_emu.h")
        if src.suffix == ".cu":
            units.append(target)
    return units


def build_library(name: str, sources: list[Path], out: Path, extra_include: list[Path] = (), verbose: bool = True):
    """Compiles sources with the emulator runtime into out/<name>.so and returns its path."""
    from torch.utils.cpp_extension import load

    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    load(name=name, sources=[str(s) for s in [*sources, EMU / "runtime.cpp"]],
         extra_cflags=compile_flags(), extra_ldflags=["-fsanitize=alignment"],
         extra_include_paths=[str(EMU / "include"), *map(str, extra_include)],
         build_directory=str(out), with_cuda=False, is_python_module=False, verbose=verbose)
    return out / f"{name}.so"


def build(out: Path = DEFAULT_OUT, verbose: bool = True) -> Path:
    from .transform import transform_file

    units = transform_tree(out)
    # The self-test kernels (planted faults) next to the transformed csrc/cuda, so that their
    # "common.cuh" is the transformed one; they register torch.ops.cuda_emu_selftest only.
    selftest = out / "src" / "cuda" / "emu_selftest.cu.cpp"
    transform_file(EMU / "selftest_kernels.cu", selftest, EMU / "cuda_emu.h")
    units.append(selftest)
    # register_cpu.cpp registers the CPU kernels (csrc/cpu), which this library replaces by the
    # emulated CUDA kernels; with no CPU kernels inside, cpu_features.cpp is built for the
    # SIMD-free level (DDG_CPU_KERNELS_DEFAULT in compile_flags).
    host = [p for p in sorted((ROOT / "csrc" / "host").glob("*.cpp")) if p.name != "register_cpu.cpp"]
    sources = [ROOT / "csrc" / "ddg_ops.cpp", *host, *units]
    # csrc/cuda on the include path: the transformed files include "../common/..." and
    # "../host/..." relative to their original place.
    return build_library(LIBRARY_NAME, sources, out, extra_include=[ROOT / "csrc" / "cuda"], verbose=verbose)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    path = build(args.out.resolve(), verbose=not args.quiet)
    print(f"cuda_emu: built {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
