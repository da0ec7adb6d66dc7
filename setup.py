"""Builds ddg_ops._C: a CUDAExtension when it can be compiled, otherwise a CppExtension.

Decision (printed, and recorded in ddg_ops/_build_info.json):
  * CUDA when torch is a CUDA build, a CUDA toolkit with the same major version is found
    and a GPU is visible, DDG_FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST is set;
  * DDG_FORCE_CUDA=0 always builds CPU only; DDG_FORCE_CUDA=1 fails loudly if CUDA can't be built.
Toolkit lookup: $CUDA_HOME / $CUDA_PATH, else the toolkit around a real nvcc on PATH, else
/usr/local/cuda. Other knobs: TORCH_CUDA_ARCH_LIST (default without a visible GPU: DEFAULT_ARCH_LIST),
DDG_CPU_CAPABILITY=avx512|avx2|default (SIMD level of the CPU kernels; default: the best
this machine supports), DEBUG=1 (-O0 -g), MAX_JOBS (parallel compile jobs).
Only the CPU kernel files (csrc/cpu/*.cpp) get the SIMD flags; docs/build.md says why.
"""
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILD_INFO = ROOT / "ddg_ops" / "_build_info.json"

# Loaded by path: importing the ddg_ops package would try to load the extension being built.
_spec = importlib.util.spec_from_file_location("ddg_ops_archs", ROOT / "ddg_ops" / "_archs.py")
archs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(archs)

# Without a visible GPU: SASS for sm_80 (A100/A800; sm_86 and sm_89 run it too, as SASS of an
# older minor of the same major) and sm_90 (H100/H200), plus compute_90 PTX that the driver
# JIT-compiles for newer GPUs (Blackwell and later). Without sm_80 an A100 would find no
# kernel image at all, since PTX only runs on GPUs at least as new as its arch.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def log(msg):
    print(f"[ddg setup] {msg}", file=sys.stderr)


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = Path(os.path.realpath(nvcc)).parent.parent
        # A wrapper script outside the toolkit has no include/cuda.h next to it.
        if (root / "include" / "cuda.h").exists():
            return str(root), f"nvcc on PATH ({nvcc})"
    if Path("/usr/local/cuda/include/cuda.h").exists():
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no toolkit found"


def nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def decide_cuda():
    """Returns (build_cuda, reason, cuda_home, nvcc_version)."""
    force = os.environ.get("DDG_FORCE_CUDA")
    if force == "0":
        return False, "DDG_FORCE_CUDA=0", None, None

    def no(reason):
        if force == "1":
            raise SystemExit(f"[ddg setup] DDG_FORCE_CUDA=1 but CUDA cannot be built: {reason}")
        return False, reason, None, None

    if torch.version.cuda is None:
        return no(f"torch {torch.__version__} is a CPU-only build")
    cuda_home, found_by = find_cuda_home()
    if cuda_home is None:
        return no("no CUDA toolkit (set CUDA_HOME to the toolkit root)")
    version = nvcc_version(cuda_home)
    if version is None:
        return no(f"no working nvcc under {cuda_home} (found by {found_by})")
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return no(f"nvcc {version} under {cuda_home} does not match torch's CUDA {torch.version.cuda} "
                  "(the major versions must be equal)")
    if force == "1":
        why = "DDG_FORCE_CUDA=1"
    elif os.environ.get("TORCH_CUDA_ARCH_LIST"):
        why = "TORCH_CUDA_ARCH_LIST is set"
    elif torch.cuda.is_available():
        why = "a GPU is visible"
    else:
        return False, ("no GPU visible (set DDG_FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST to compile the "
                       "CUDA kernels anyway)"), None, None
    return True, f"{why}; toolkit {cuda_home} (found by {found_by}), nvcc {version}", cuda_home, version


# SIMD levels of the CPU kernels, best first: the /proc/cpuinfo flags each needs (checked again
# at import, see ddg_ops/_ext.py, and by the C++ guard in csrc/host/cpu_features.h, which lists
# the same features) and the compiler flags that select at::vec's specialisations for it (torch
# builds its own kernels the same way; without the macros at::vec falls back to generic array
# loops). These flags reach only the kernel files (SIMD_SOURCES): code that runs at import must
# not contain instructions the importing CPU may lack.
CPU_CAPABILITIES = {
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]),
    "avx2": ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]),
    "default": (set(), []),
}
SIMD_SOURCES = "csrc/cpu/*.cpp"


def cpu_capability():
    wanted = os.environ.get("DDG_CPU_CAPABILITY")
    if wanted:
        if wanted not in CPU_CAPABILITIES:
            raise SystemExit(f"[ddg setup] DDG_CPU_CAPABILITY must be one of {sorted(CPU_CAPABILITIES)}, got {wanted!r}")
        return wanted
    flags = archs.read_cpu_flags() or frozenset()
    return next(name for name, (needs, _) in CPU_CAPABILITIES.items() if needs <= flags)


def cuda_archs():
    """(requested arch list, SASS archs, PTX archs) of a CUDA build. The archs are read back from
    the -gencode flags torch's build will pass to nvcc, so the record is what was compiled."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    sass, ptx = archs.archs_from_gencode_flags(_get_cuda_arch_flags())
    if not sass and not ptx:
        raise SystemExit("[ddg setup] no CUDA arch to compile for: set TORCH_CUDA_ARCH_LIST (e.g. "
                         f"{DEFAULT_ARCH_LIST!r})")
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs"), sass, ptx


def nvidia_pip_includes():
    # torch's CUDA headers include cusparse.h, cublas_v2.h, ... which pip installs here.
    site = Path(torch.__file__).resolve().parent.parent
    return sorted(glob.glob(str(site / "nvidia" / "cu*" / "include")))


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def extensions():
    build_cuda, reason, cuda_home, nvcc_ver = decide_cuda()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension at import
    from torch.utils.cpp_extension import CppExtension, CUDAExtension  # noqa: E402

    debug = os.environ.get("DEBUG") == "1"
    capability = cpu_capability()
    needs, simd_flags = CPU_CAPABILITIES[capability]
    # -fopenmp: at::parallel_for is inline code around `#pragma omp parallel`; without the
    # flag the pragma is ignored and every CPU kernel runs on one thread.
    # -ffp-contract=off: no implicit FMA in scalar code, so a value computed in two passes (the LN
    # backward's g_xhat in the row sums and in dx) has the same bits both times, as on the GPU.
    # DDG_CPU_KERNELS_<CAP> tells the host code which features the kernels need (its import-time
    # check); it selects no instructions.
    cxx = ((["-O0", "-g"] if debug else ["-O3"]) + ["-fopenmp", "-ffp-contract=off"]
           + [f"-DDDG_CPU_KERNELS_{capability.upper()}"])
    link = ["-fopenmp"]
    simd_sources = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(SIMD_SOURCES))
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "host").glob("*.cpp"))
    info = {
        "backends": ["cpu"],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": nvcc_ver,
        "cuda_arch_list": None,
        "cuda_sass_archs": [],
        "cuda_ptx_archs": [],
        "cpu_capability": capability,
        "cpu_kernel_features": sorted(needs),
        "debug": debug,
        "decision": reason,
        "git_sha": git_sha(),
    }
    if build_cuda:
        info["cuda_arch_list"], info["cuda_sass_archs"], info["cuda_ptx_archs"] = cuda_archs()
        info["backends"].append("cuda")
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "--generate-line-info"]
        ext = CUDAExtension(
            "ddg_ops._C", sources, include_dirs=nvidia_pip_includes(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc + ["--expt-relaxed-constexpr"]}, extra_link_args=link)
    else:
        ext = CppExtension("ddg_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    ext.simd_sources, ext.simd_flags = simd_sources, simd_flags
    ext.depends = [*ext.depends, *simd_sources]
    log(f"building {' + '.join(info['backends'])}: {reason}")
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), arch list {info['cuda_arch_list']} "
        f"(SASS {info['cuda_sass_archs']}, PTX {info['cuda_ptx_archs']}), CPU SIMD {capability} "
        f"(kernel files only: {SIMD_SOURCES})")
    BUILD_INFO.write_text(json.dumps(info, indent=2) + "\n")
    return [ext]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class SimdKernelsBuildExtension(BuildExtension):
        """BuildExtension, except that ext.simd_sources are compiled with ext.simd_flags on top of
        the common flags. Their objects are linked after all other objects: where a kernel file
        and a host file both emit an inline function (a COMDAT copy, e.g. at::Tensor's methods),
        the linker keeps the first copy, so host code never runs SIMD-compiled code."""

        def build_extension(self, ext):
            if getattr(ext, "simd_sources", None):
                args = dict(ext.extra_compile_args)
                args["cxx"] = [*args["cxx"], *ext.simd_flags]
                objects = self.compiler.compile(
                    ext.simd_sources, output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=args, depends=ext.depends)
                ext.extra_objects = [*(ext.extra_objects or []), *objects]
                ext.simd_sources = []  # compiled once even if setuptools calls this again
            super().build_extension(ext)

    return SimdKernelsBuildExtension.with_options(no_python_abi_suffix=False)


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    package_data={"ddg_ops": ["_build_info.json"]},
)
