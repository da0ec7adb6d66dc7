"""The op registry: one row per public op (ddg_ops/op_registry/<family>.py, mirroring csrc and
ddg_ops/<family>.py), iterated by the op tests (opcheck, gradcheck, torch.compile,
kernel-vs-reference, bad inputs), ``python -m ddg_ops.selftest``, ``python -m ddg_ops.info`` and
``python -m ddg_ops.bench``. ``coverage_problems`` names every torch.ops.ddg operator that lacks a
row, a fake kernel, an autograd registration or a reference (docs/ARCHITECTURE.md, "Adding an op").
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from . import bn_stats, guidance, split_token
from .core import (ALL_LAYOUTS, LAYOUTS, ROW_LAYOUTS, SIZES, BadInput, BenchRef, Call, GradSample, OpInfo, Sample)

REGISTRY: tuple = (*guidance.ROWS, *bn_stats.ROWS, *split_token.ROWS)
NAMESPACE = "ddg"

__all__ = ["REGISTRY", "NAMESPACE", "OpInfo", "Call", "Sample", "GradSample", "BadInput", "BenchRef", "LAYOUTS",
           "ALL_LAYOUTS", "ROW_LAYOUTS", "SIZES", "row", "families", "registered_schemas", "coverage_problems"]


def row(name: str) -> OpInfo:
    for r in REGISTRY:
        if r.name == name:
            return r
    raise KeyError(f"no registry row named {name!r}; rows: {[r.name for r in REGISTRY]}")


def families(registry: Sequence[OpInfo] = REGISTRY) -> Dict[str, List[OpInfo]]:
    """family -> its rows, in registry order."""
    out: Dict[str, List[OpInfo]] = {}
    for r in registry:
        out.setdefault(r.family, []).append(r)
    return out


def registered_schemas(namespace: str = NAMESPACE) -> List[str]:
    """Every operator defined under torch.ops.<namespace> (forward, backward and helper ops)."""
    prefix = namespace + "::"
    return sorted(n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def _has_fake(qualname: str) -> bool:
    from torch._library.simple_registry import singleton
    return singleton.find(qualname).fake_impl.kernel is not None


def coverage_problems(namespace: str = NAMESPACE, registry: Sequence[OpInfo] = REGISTRY) -> List[str]:
    """One line per gap: an operator of ``namespace`` with no registry row, no fake kernel or no
    autograd registration; a row whose reference is missing or that names an operator that does not
    exist; a row without gradcheck samples that does not say why. Empty when every op is complete."""
    schemas = registered_schemas(namespace)
    owner = {s: r for r in registry for s in r.schemas}
    problems = []
    for schema in schemas:
        qualname = f"{namespace}::{schema}"
        if schema not in owner:
            problems.append(f"{qualname}: no registry row names it (ddg_ops/op_registry/<family>.py)")
        if not _has_fake(qualname):
            problems.append(f"{qualname}: no fake kernel (ddg_ops/_fake.py)")
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"):
            problems.append(f"{qualname}: no autograd registration (ddg_ops/_autograd.py)")
    for r in registry:
        if not callable(r.reference):
            problems.append(f"{r.name}: no reference (ddg_ops/reference.py)")
        missing = [s for s in r.schemas if s not in schemas]
        if missing:
            problems.append(f"{r.name}: names operators not registered under torch.ops.{namespace}: {missing}")
        if not r.no_gradcheck and not list(r.gradcheck()):
            problems.append(f"{r.name}: no gradcheck samples and no reason (no_gradcheck) why")
    return problems
