"""The packages' public names: ``__all__`` is exact (every public name, lazy ones included, and nothing else),
every name of it resolves, and ``dir()`` lists them all (tab completion) even before a lazy one is imported."""
from __future__ import annotations

import importlib
import types

import pytest

PACKAGES = ("ddg_models", "ddg_losses", "ddg_models.classifiers")


def public_names(module) -> set:
    eager = {n for n, v in vars(module).items()
             if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"}
    return eager | set(getattr(module, "_LAZY", {}))


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_exact_listed_by_dir_and_resolves(name):
    module = importlib.import_module(name)
    assert len(module.__all__) == len(set(module.__all__)), "a name is listed twice"
    assert set(module.__all__) == public_names(module)
    assert set(module.__all__) <= set(dir(module))
    for attr in module.__all__:
        assert getattr(module, attr) is not None, attr


@pytest.mark.parametrize("name", ("ddg_models", "ddg_losses"))
def test_lazy_tables_point_at_the_defining_submodule(name):
    module = importlib.import_module(name)
    for attr, submodule in module._LAZY.items():
        assert attr in vars(importlib.import_module(f"{name}.{submodule}")), (attr, submodule)


def test_unknown_names_still_raise():
    import ddg_models

    with pytest.raises(AttributeError, match="module 'ddg_models' has no attribute 'NoSuchThing'"):
        ddg_models.NoSuchThing
