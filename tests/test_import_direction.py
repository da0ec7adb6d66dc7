"""The layers import one way: ddg_ops <- ddg_models <- ddg_losses <- examples and benchmarks (the top layer:
programs that use the library, importing each other never). A module imports nothing from a
layer above its own; every import counts (inside functions too), and so do the module names of lazy tables and
of importlib.import_module strings (tests/_imports.py)."""
from __future__ import annotations

import textwrap

from tests._imports import ROOT, all_imports, imports_of

LAYERS = {"ddg_ops": 0, "ddg_models": 1, "ddg_losses": 2, "examples": 3, "benchmarks": 3}


def _layer(module: str):
    return LAYERS.get(module.split(".")[0])


def upward_imports():
    found = set()
    for imp in all_imports():
        here, there = _layer(imp.path.relative_to(ROOT).parts[0]), _layer(imp.module)
        same_top = imp.module.split(".")[0] == imp.path.relative_to(ROOT).parts[0]
        if here is not None and there is not None and (there > here or (there == here == 3 and not same_top)):
            found.add((str(imp.path.relative_to(ROOT)), imp.line, imp.module))
    return sorted(found)


def test_the_import_reader_sees_each_kind_of_import(tmp_path):
    """What the direction test relies on: function-level, guarded, relative, lazy-table and string imports."""
    package = tmp_path / "ddg_models"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "leaf.py").write_text("")
    (package / "__init__.py").write_text(textwrap.dedent("""
        import importlib
        from . import sub
        from .sub import leaf
        _LAZY = {"Thing": "lazy_module"}

        def f():
            try:
                import triton.testing
            except ImportError:
                pass
            from ddg_losses.dmd import DistributionMatchingLoss
            return importlib.import_module("examples.common"), importlib.import_module(".sub.leaf", __name__)
    """))
    found = {(imp.module, imp.guarded) for imp in imports_of(package / "__init__.py", tmp_path)}
    assert found == {("importlib", False), ("ddg_models", False), ("ddg_models.sub", False),
                     ("ddg_models.sub.leaf", False), ("ddg_models.lazy_module", False), ("triton.testing", True),
                     ("ddg_losses.dmd", False), ("examples.common", False)}


def test_layers_import_only_downwards():
    upward = upward_imports()
    assert not upward, "imports against the layer order ddg_ops <- ddg_models <- ddg_losses <- examples:\n" + \
        "\n".join(f"  {path}:{line} imports {module}" for path, line, module in upward)
