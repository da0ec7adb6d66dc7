"""The declared dependencies are exactly the imported ones, each in the right place: the core (pyproject
``dependencies``) is what ``import ddg_ops, ddg_models, ddg_losses`` needs, the ``models`` extra the library's
optional modules, ``examples`` the examples, ``test`` the tests, requirements.txt the build (setup.py, tools/)."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from collections import defaultdict

from tests._imports import ROOT, all_imports, local_module_names

# Import name -> distribution name, where they differ.
DISTRIBUTION_OF = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}
# Imported only inside try/except ImportError, with a fallback, and never declared: triton times CUDA kernels
# (ddg_ops.bench, with CUDA events as fallback) and locates cuobjdump (tools/), and ships with torch's CUDA wheels.
OPTIONAL_FALLBACKS = {"triton"}
# Declared for the build, never imported: torch.utils.cpp_extension runs ninja; pip builds with wheel.
BUILD_TOOLS = {"ninja", "wheel"}
PROJECT = "ddg"


def _dist(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared():
    """{'core' | extra | 'build': set of distributions}, extras that name the project itself expanded."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    raw = {"core": project["dependencies"], **project.get("optional-dependencies", {})}

    def expand(group, seen=()):
        out = set()
        for req in raw[group]:
            if _dist(req) == PROJECT:
                for extra in re.search(r"\[(.*)\]", req).group(1).split(","):
                    assert extra.strip() not in seen, f"extra {group!r} includes itself"
                    out |= expand(extra.strip(), seen + (group,))
            else:
                out.add(_dist(req))
        return out

    groups = {group: expand(group) for group in raw}
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    groups["build"] = {_dist(ln) for ln in lines if ln} | {_dist(r) for r in meta["build-system"]["requires"]}
    return groups


def third_party_imports():
    """{distribution: [(importing file, line, guarded)]} over the whole repository."""
    local, std = local_module_names(), set(sys.stdlib_module_names)
    found = defaultdict(list)
    for imp in all_imports():
        top = imp.module.split(".")[0]
        if top and top not in local and top not in std:
            found[DISTRIBUTION_OF.get(top, top).lower().replace("_", "-")].append(
                (str(imp.path.relative_to(ROOT)), imp.line, imp.guarded))
    return found


def _allowed(path: str, guarded: bool, groups) -> set:
    if guarded:  # an optional import with a fallback may use any declared extra (e.g. xformers)
        return set().union(*groups.values())
    tree = path.split("/")[0]
    if tree in ("ddg_ops", "ddg_models", "ddg_losses"):
        return groups["core"] | groups["models"] | groups["xformers"]
    if tree in ("examples", "benchmarks"):
        return groups["core"] | groups["examples"]
    if tree == "tests":
        return groups["core"] | groups["test"]
    return groups["core"] | groups["build"]  # setup.py, tools/


def test_every_import_is_declared_in_the_right_group():
    groups = declared()
    wrong = [f"{path}:{line} imports {dist}, not declared for {path.split('/')[0]}"
             for dist, sites in third_party_imports().items() if dist not in OPTIONAL_FALLBACKS
             for path, line, guarded in sites if dist not in _allowed(path, guarded, groups)]
    assert not wrong, "\n".join(wrong)


def test_undeclared_optional_imports_are_guarded():
    unguarded = [f"{path}:{line} imports {dist} outside try/except ImportError"
                 for dist, sites in third_party_imports().items() if dist in OPTIONAL_FALLBACKS
                 for path, line, guarded in sites if not guarded]
    assert not unguarded, "\n".join(unguarded)


def test_every_declared_dependency_is_imported():
    groups = declared()
    imported = set(third_party_imports())
    unused = {group: sorted(dists - imported - BUILD_TOOLS) for group, dists in groups.items()}
    assert not any(unused.values()), f"declared but never imported: { {g: d for g, d in unused.items() if d} }"


def test_the_core_imports_with_only_the_core_dependencies():
    """With every non-core distribution made unimportable, the three packages import, and dir() lists the lazy
    names without importing them."""
    groups = declared()
    blocked = sorted({name for name, dist in DISTRIBUTION_OF.items() if dist not in groups["core"]}
                     | {d.replace("-", "_") for g, ds in groups.items() if g != "core" for d in ds
                        if d not in groups["core"]} | OPTIONAL_FALLBACKS)
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = set({blocked!r})
        for name in BLOCKED:  # None in sys.modules: importing it fails, find_spec says it is not installed
            sys.modules[name] = None
        import ddg_ops, ddg_models, ddg_losses
        for m in (ddg_models, ddg_losses):
            assert set(m.__all__) <= set(dir(m)), sorted(set(m.__all__) - set(dir(m)))
        loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        assert "ddg_models.dag_sampler" not in sys.modules and "ddg_losses.kd" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
