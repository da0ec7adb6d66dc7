"""``python -m ddg_ops.selftest``: every ddg op against its reference on this machine's device, a
bandwidth table against a copy ceiling, and the build/device facts (docs/selftest.md).

checks    the check core: runs the grid of every ddg_ops.op_registry row, compares forward and backward, records mismatches and coverage
bandwidth per op family, kernel time and GB/s next to a copy of the same bytes
facts     versions, build record, device, arch coverage, backend per op
"""
from .checks import CheckReport, Grid, registered_ops, run_checks, uncovered_ops  # noqa: F401
