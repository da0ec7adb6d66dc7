"""Which GPUs and CPUs a build runs on (ddg_ops/_archs.py) and how ddg_ops routes ops on a device
the build cannot run on (ddg_ops/_ext.py): explicit capabilities and arch lists, no GPU needed."""
import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

import ddg_ops
from ddg_ops import _ext
from ddg_ops._archs import archs_from_gencode_flags, kernel_image_for, missing_cpu_features, parse_arch

DEFAULT_SASS, DEFAULT_PTX = ["8.0", "9.0"], ["9.0"]  # setup.py's DEFAULT_ARCH_LIST "8.0;9.0+PTX"


@pytest.mark.parametrize("capability, image", [
    ((8, 0), "sm_80"),       # A100 / A800
    ((8, 6), "sm_80"),       # A10 / RTX 30xx: sm_80 SASS runs on a newer minor of major 8
    ((8, 9), "sm_80"),       # L40 / RTX 40xx
    ((9, 0), "sm_90"),       # H100 / H200
    ((10, 0), "compute_90"),  # B200: JIT from the compute_90 PTX
    ((12, 0), "compute_90"),
    ((7, 5), None),          # T4: older than every arch in the build
])
def test_default_archs_cover_ampere_to_blackwell(capability, image):
    assert kernel_image_for(capability, DEFAULT_SASS, DEFAULT_PTX) == image


def test_hopper_only_build_has_no_image_for_a100():
    # The arch list GPU-less builds used before: an A100 gets "no kernel image is available".
    assert kernel_image_for((8, 0), ["9.0"], ["9.0"]) is None
    assert kernel_image_for((9, 0), ["9.0"], ["9.0"]) == "sm_90"


def test_sass_runs_only_on_same_major_and_newer_minor():
    assert kernel_image_for((8, 0), ["8.6"], []) is None
    assert kernel_image_for((9, 0), ["8.0"], []) is None
    assert kernel_image_for((8, 9), ["8.0", "8.6"], []) == "sm_86"  # the newest SASS that fits
    assert kernel_image_for((8, 6), ["8.0"], ["8.6"]) == "sm_80"    # SASS before JIT


def test_arch_specific_targets_run_only_on_their_capability():
    assert parse_arch("9.0a") == (9, 0, True)
    assert kernel_image_for((9, 0), ["9.0a"], []) == "sm_90a"
    assert kernel_image_for((10, 0), ["9.0a"], ["9.0a"]) is None
    with pytest.raises(ValueError, match="CUDA arch"):
        parse_arch("sm_80")


def test_gencode_flags_give_the_recorded_archs(monkeypatch):
    # setup.py records what torch's build passes to nvcc for the requested list.
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert archs_from_gencode_flags(_get_cuda_arch_flags()) == (DEFAULT_SASS, DEFAULT_PTX)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 8.6;9.0a+PTX")
    assert archs_from_gencode_flags(_get_cuda_arch_flags()) == (["8.0", "8.6", "9.0a"], ["9.0a"])


def test_cuda_arch_problem_names_capability_and_archs():
    info = {"cuda_sass_archs": ["9.0"], "cuda_ptx_archs": ["9.0"]}
    problem = _ext.cuda_arch_problem((8, 0), info)
    assert "8.0" in problem and "['9.0']" in problem and "TORCH_CUDA_ARCH_LIST" in problem
    assert _ext.cuda_arch_problem((9, 0), info) is None
    assert _ext.cuda_arch_problem((8, 0), {}) is None  # nothing recorded: nothing to compare


ZEN3_FLAGS = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi2".split())  # no AVX-512
AVX512_FEATURES = ["avx512bw", "avx512dq", "avx512f", "avx512vl", "f16c", "fma"]


def test_missing_cpu_features():
    assert missing_cpu_features(AVX512_FEATURES, ZEN3_FLAGS) == ["avx512bw", "avx512dq", "avx512f", "avx512vl"]
    assert missing_cpu_features(["avx2", "fma", "f16c"], ZEN3_FLAGS) == []
    assert missing_cpu_features(AVX512_FEATURES, None) is None


def test_cpu_kernel_problem():
    problem = _ext.cpu_kernel_problem(AVX512_FEATURES, ZEN3_FLAGS, True, "avx512")
    assert "avx512f" in problem and "DDG_CPU_CAPABILITY" in problem
    assert _ext.cpu_kernel_problem(["avx2", "fma", "f16c"], ZEN3_FLAGS, True, "avx2") is None
    assert _ext.cpu_kernel_problem([], ZEN3_FLAGS, True, "default") is None
    # Flags unknown (not Linux): the extension's CPUID check decides.
    assert _ext.cpu_kernel_problem(AVX512_FEATURES, None, True, "avx512") is None
    assert "avx512f" in _ext.cpu_kernel_problem(AVX512_FEATURES, None, False, "avx512")
    assert _ext.cpu_kernel_problem(AVX512_FEATURES, frozenset(AVX512_FEATURES), False, "avx512") is not None


# ---- routing (needs the extension: it reads the built archs and the module's CPUID answer)

def _fake_cuda_tensor(index):
    # use_kernel only looks at the device; a real CUDA tensor needs a GPU.
    return types.SimpleNamespace(device=torch.device("cuda", index))


@pytest.fixture
def cuda_build_for_hopper(monkeypatch):
    state = _ext.ExtensionState(True, "loaded", {"cuda_sass_archs": ["9.0"], "cuda_ptx_archs": ["9.0"]},
                                frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(_ext, "STATE", state)
    monkeypatch.setattr(_ext, "_CUDA_DEVICE_OK", {})
    capabilities = {0: (9, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU{i}")
    monkeypatch.delenv("DDG_REQUIRE_EXT", raising=False)


def test_gpu_without_kernel_image_uses_reference_and_warns_once(cuda_build_for_hopper):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.use_kernel(_fake_cuda_tensor(0))
    with pytest.warns(RuntimeWarning, match=r"cuda:1 \(GPU1\).*capability 8\.0") as record:
        assert not _ext.use_kernel(_fake_cuda_tensor(1))
        assert not _ext.use_kernel(_fake_cuda_tensor(1))
    assert len(record) == 1
    assert _ext.use_kernel(_fake_cuda_tensor(0)) and _ext.use_kernel(torch.empty(1))


def test_gpu_without_kernel_image_is_an_error_with_require_ext(cuda_build_for_hopper, monkeypatch):
    monkeypatch.setenv("DDG_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="DDG_REQUIRE_EXT=1"):
        _ext.use_kernel(_fake_cuda_tensor(1))


@pytest.mark.requires_ext
@pytest.mark.cpu_kernel_only  # reloads the compiled _C build's state
def test_cpu_without_kernel_features_routes_cpu_to_reference(monkeypatch):
    if not ddg_ops.EXTENSION.build_info.get("cpu_kernel_features"):
        pytest.skip("the CPU kernels of this build need no SIMD features (DDG_CPU_CAPABILITY=default)")
    monkeypatch.setattr(_ext, "_read_cpu_flags", lambda: frozenset({"fpu", "sse", "sse2"}))
    state = _ext._load()
    assert state.loaded and state.cpu_problem and "cpu" not in state.device_types
    monkeypatch.setattr(_ext, "STATE", state)
    assert not _ext.use_kernel(torch.empty(1))
    # The ops take the reference path: no ddg kernel runs.
    called = []
    monkeypatch.setattr(torch.ops.ddg, "cfg_combine", lambda *a: called.append(a))
    out = ddg_ops.cfg_combine(torch.ones(2, 3), torch.full((2, 3), 2.0), 3.0)
    assert not called and torch.equal(out, torch.full((2, 3), 4.0))


@pytest.mark.requires_ext
@pytest.mark.cpu_kernel_only  # imports ddg_ops._C, whose schemas the emulator library already defined
def test_extension_and_build_record_agree_on_cpu_features():
    from ddg_ops import _C
    info = ddg_ops.EXTENSION.build_info
    assert sorted(filter(None, _C.CPU_KERNEL_FEATURES.split(","))) == sorted(info["cpu_kernel_features"])
    assert _C.CPU_RUNS_KERNELS == 1 and ddg_ops.EXTENSION.cpu_problem is None


_IMPORT_ON_OLD_CPU = textwrap.dedent("""
    import builtins, io, warnings
    real_open = builtins.open
    def fake_open(path, *args, **kwargs):  # a CPU with SSE only
        if path == "/proc/cpuinfo":
            return io.StringIO("processor : 0\\nflags : fpu sse sse2\\n")
        return real_open(path, *args, **kwargs)
    builtins.open = fake_open
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import torch, ddg_ops
    print("WARN", [str(x.message) for x in w if "CPU tensors use" in str(x.message)])
    print("CPU_KERNEL", ddg_ops._ext.use_kernel(torch.empty(1)))
""")


@pytest.mark.requires_ext
@pytest.mark.cpu_kernel_only  # the subprocess imports the compiled _C build
def test_import_on_cpu_without_kernel_features():
    if not ddg_ops.EXTENSION.build_info.get("cpu_kernel_features"):
        pytest.skip("the CPU kernels of this build need no SIMD features (DDG_CPU_CAPABILITY=default)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "DDG_REQUIRE_EXT"}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ON_OLD_CPU], env=env, cwd=root, capture_output=True,
                          text=True, check=True)
    assert "CPU_KERNEL False" in proc.stdout and "lacks avx" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("CPU tensors use") == 1
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ON_OLD_CPU], env={**env, "DDG_REQUIRE_EXT": "1"},
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode != 0 and "DDG_REQUIRE_EXT=1" in proc.stderr
