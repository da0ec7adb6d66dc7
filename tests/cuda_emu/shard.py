"""pytest plugin: DDG_TEST_SHARD=k/n keeps every n-th collected test starting at k, so n pytest
processes cover a run between them (tests.cuda_emu.run uses one per core)."""
import os


def pytest_collection_modifyitems(config, items):
    spec = os.environ.get("DDG_TEST_SHARD")
    if not spec:
        return
    k, n = (int(v) for v in spec.split("/"))
    keep = [item for i, item in enumerate(items) if i % n == k]
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % n != k])
    items[:] = keep
