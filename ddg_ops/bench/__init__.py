"""Microbenchmarks of the ddg ops against eager PyTorch and torch.compile.

Run ``python -m ddg_ops.bench <family> --help``; results go to a CSV (one per device) and a
table on stdout. Each family module (e.g. ``guidance``) defines its kernels, shapes and providers.
"""
