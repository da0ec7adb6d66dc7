"""The layers import one way: ddg_ops <- ddg_models <- ddg_losses <- examples. A module imports nothing from a
layer above its own; every import counts (inside functions too), and so do the module names of lazy tables and
of importlib.import_module strings (tests/_imports.py)."""
from __future__ import annotations

from tests._imports import ROOT, all_imports

LAYERS = ("ddg_ops", "ddg_models", "ddg_losses", "examples")


def _layer(module: str):
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def upward_imports():
    found = set()
    for imp in all_imports():
        here, there = _layer(imp.path.relative_to(ROOT).parts[0]), _layer(imp.module)
        if here is not None and there is not None and there > here:
            found.add((str(imp.path.relative_to(ROOT)), imp.line, imp.module))
    return sorted(found)


def test_the_import_reader_sees_each_kind_of_import():
    """The reader is what the direction test relies on: it must see function-level, relative, lazy-table and
    string imports (each of these exists in the tree)."""
    seen = {(str(i.path.relative_to(ROOT)), i.module) for i in all_imports()}
    assert ("ddg_models/__init__.py", "ddg_models.dag_sampler") in seen        # the lazy table
    assert ("ddg_losses/dmd.py", "ddg_losses.noise_levels") in seen            # relative
    assert ("ddg_models/classifiers/__init__.py", "ddg_models.classifiers.registry") in seen
    assert ("ddg_ops/bench/_utils.py", "triton.testing") in seen               # inside a function and a try
    assert any(m == "diffusers" and p.startswith("tests/") for p, m in seen)   # pytest.importorskip("diffusers")


def test_layers_import_only_downwards():
    upward = upward_imports()
    assert not upward, "imports against the layer order ddg_ops <- ddg_models <- ddg_losses <- examples:\n" + \
        "\n".join(f"  {path}:{line} imports {module}" for path, line, module in upward)
