"""``python -m ddg_ops.selftest``: every ddg op against its reference on this machine's device, a
bandwidth table against a copy ceiling, and the build/device facts (docs/selftest.md).

cases     the grid: per op, inputs at a (dtype, layout, shape, variant) point, kernel and reference calls
checks    the check core: runs the grid, compares forward and backward, records mismatches and coverage
bandwidth per op family, kernel time and GB/s next to a copy of the same bytes
facts     versions, build record, device, arch coverage, backend per op
"""
from .checks import CheckReport, Grid, registered_ops, run_checks, uncovered_ops  # noqa: F401
