"""Benchmarks of modules built on ddg_ops (above ddg_ops in the layering: they may import ddg_models;
docs/ARCHITECTURE.md, "Layers"). ``python -m benchmarks <family>`` runs one with ddg_ops.bench's
harness (same options, CSV and table); the single-op families stay in ``python -m ddg_ops.bench``."""
