import os

import pytest
import torch

# The examples' subprocesses inherit this: a rank that dies on a signal (a C++ abort inside a collective, say)
# prints every thread's Python stack to its stderr, which the launching test reports.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture
def restore_determinism():
    """The GenDD CLI switches deterministic algorithms on for CPU runs: do not leak that to other tests."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)
