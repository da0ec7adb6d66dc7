import os

import pytest
import torch

import ddg_ops
from tests._utils import KERNEL_DEVICE

HAS_CUDA = torch.cuda.is_available() and "cuda" in ddg_ops.EXTENSION.device_types
# DDG_CUDA_EMULATOR: ops on CPU tensors run the csrc/cuda kernels on CPU fibers (tests/cuda_emu).
CUDA_EMULATOR = ddg_ops.EXTENSION.loaded and "cuda-emulator" in ddg_ops.EXTENSION.build_info.get("backends", [])


def pytest_report_header(config):
    e = ddg_ops.EXTENSION
    mode = "CUDA EMULATOR: CPU tensors run the csrc/cuda kernels; " if CUDA_EMULATOR else ""
    return (f"{mode}ddg_ops extension: {'loaded' if e.loaded else 'NOT loaded'} ({e.reason}); kernels for "
            f"{sorted(e.device_types)}; build {e.build_info.get('backends')} for torch {e.build_info.get('torch')}; "
            f"DDG_REQUIRE_EXT={os.environ.get('DDG_REQUIRE_EXT', '')}")


def pytest_collection_modifyitems(config, items):
    no_ext = pytest.mark.skip(reason=f"compiled extension not loaded: {ddg_ops.EXTENSION.reason} "
                                     "(set DDG_REQUIRE_EXT=1 to make this an error)")
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of ddg_ops._C "
                                      f"(GPU visible: {torch.cuda.is_available()}, "
                                      f"CUDA kernels built: {'cuda' in ddg_ops.EXTENSION.device_types})")
    cpu_only = pytest.mark.skip(reason="checks the CPU kernels (a CUDA device assert would abort the process); "
                                       "running the emulated CUDA kernels (DDG_CUDA_EMULATOR)")
    no_kernels = pytest.mark.skip(reason="needs the CUDA kernels: a GPU with the CUDA build, or the CUDA emulator "
                                         "(python -m tests.cuda_emu.build; DDG_CUDA_EMULATOR=1)")
    no_emulator = pytest.mark.skip(reason="tests the CUDA emulator: build it (python -m tests.cuda_emu.build) and run "
                                          "with DDG_CUDA_EMULATOR=1")
    for item in items:
        if "cpu_kernel_only" in item.keywords and CUDA_EMULATOR:
            item.add_marker(cpu_only)
        if "cuda_kernels" in item.keywords and KERNEL_DEVICE is None:
            item.add_marker(no_kernels)
        if "cuda_emulator" in item.keywords and not CUDA_EMULATOR:
            item.add_marker(no_emulator)
        if "requires_ext" in item.keywords and not ddg_ops.HAS_EXT:
            item.add_marker(no_ext)
        if "requires_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: intra-op threads only add synchronisation there (seconds per test
    on a busy 2-core machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
