"""Microbenchmarks of the ddg ops against eager PyTorch and torch.compile.

Run ``python -m ddg_ops.bench <family> --help``; results go to a CSV (one per device) and a
table on stdout. The families are those the op registry's rows name (ddg_ops/op_registry); each
family module (e.g. ``guidance``) defines its kernels, shapes and providers. Benchmarks of whole
modules (they import ddg_models) live in the top-level ``benchmarks`` package.
"""
