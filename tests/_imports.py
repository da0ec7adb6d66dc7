"""Every import of the repository's Python files, read with ast (nothing is imported): ``import`` and ``from``
statements anywhere in a file (inside functions and try blocks too, relative ones resolved), module names given as
strings to ``importlib.import_module`` / ``pytest.importorskip`` / ``importlib.util.find_spec``, and the submodules
of a package's lazy ``_LAZY = {name: submodule}`` table."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
SOURCE_TREES = ("ddg_ops", "ddg_models", "ddg_losses", "examples", "benchmarks", "tests", "tools")
_STRING_IMPORTERS = {"import_module", "importorskip", "find_spec"}


class Import(NamedTuple):
    path: Path       # the importing file
    line: int
    module: str      # absolute dotted name of what is imported
    guarded: bool    # optional: inside a ``try`` that catches ImportError, or a find_spec question


def python_files() -> List[Path]:
    files = [ROOT / "setup.py"]
    for tree in SOURCE_TREES:
        files += sorted(p for p in (ROOT / tree).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(path: Path, root: Path) -> str:
    name = module_name(path, root)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(path: Path, root: Path, module: Optional[str], level: int) -> str:
    if level == 0:
        return module or ""
    base = _package(path, root).split(".")
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception") for n in names)


def imports_of(path: Path, root: Path = ROOT) -> Iterator[Import]:
    """The imports of the file ``path`` of the source tree at ``root``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers if h.type is not None):
            guarded_nodes.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        guarded = id(node) in guarded_nodes
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name, guarded)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(path, root, node.module, node.level)
            yield Import(path, node.lineno, base, guarded)
            # "from package import submodule" imports the submodule too.
            for alias in node.names:
                if alias.name != "*" and _is_module(root, f"{base}.{alias.name}"):
                    yield Import(path, node.lineno, f"{base}.{alias.name}", guarded)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if func in _STRING_IMPORTERS:
                target = node.args[0].value
                level = len(target) - len(target.lstrip("."))
                # find_spec only asks whether the module is there: an optional import by nature.
                yield Import(path, node.lineno, _resolve(path, root, target.lstrip(".") or None, level),
                             guarded or func == "find_spec")
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets) \
                and isinstance(node.value, ast.Dict):
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    yield Import(path, value.lineno, f"{_package(path, root)}.{value.value}", False)


def _is_module(root: Path, dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (root / rel.with_suffix(".py")).is_file() or (root / rel / "__init__.py").is_file()


def all_imports() -> List[Import]:
    return [imp for path in python_files() for imp in imports_of(path)]


def local_module_names() -> set:
    """Top-level names the repository itself provides: its packages and modules, and the modules of folders that
    put themselves on sys.path (tools/)."""
    names = set()
    for path in python_files():
        names.add(path.stem)
        names.update(p.name for p in path.relative_to(ROOT).parents if p.name)
    return names
