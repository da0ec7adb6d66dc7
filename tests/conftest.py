import os

import pytest
import torch

import ddg_ops

HAS_CUDA = torch.cuda.is_available() and "cuda" in ddg_ops.EXTENSION.device_types


def pytest_report_header(config):
    e = ddg_ops.EXTENSION
    return (f"ddg_ops extension: {'loaded' if e.loaded else 'NOT loaded'} ({e.reason}); kernels for "
            f"{sorted(e.device_types)}; build {e.build_info.get('backends')} for torch {e.build_info.get('torch')}; "
            f"DDG_REQUIRE_EXT={os.environ.get('DDG_REQUIRE_EXT', '')}")


def pytest_collection_modifyitems(config, items):
    no_ext = pytest.mark.skip(reason=f"compiled extension not loaded: {ddg_ops.EXTENSION.reason} "
                                     "(set DDG_REQUIRE_EXT=1 to make this an error)")
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of ddg_ops._C "
                                      f"(GPU visible: {torch.cuda.is_available()}, "
                                      f"CUDA kernels built: {'cuda' in ddg_ops.EXTENSION.device_types})")
    for item in items:
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
