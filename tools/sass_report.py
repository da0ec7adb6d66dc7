#!/usr/bin/env python3
"""SASS report: what nvcc produced for every CUDA kernel (no GPU needed).

Compiles each csrc/cuda/*.cu of a checkout to a cubin per arch with the real build's nvcc flags
(learned from its setup.py through torch's BuildExtension), or reads the cubins embedded in a
built extension (--so), disassembles them with cuobjdump and prints per kernel and arch:
registers, spills and local-memory instructions, the width of the hot loop's global accesses,
and the hot loop's instructions per element against the budgets. Definitions and budgets:
docs/cuda_sass.md.

  python tools/sass_report.py [--root DIR | --so PATH] [--arch sm_80,sm_90] [--source REGEX] [--kernel REGEX]
                              [--markdown | --json] [--check tools/sass_budgets.json]
"""
import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sass_analysis import budgets as budget_rules  # noqa: E402
from sass_analysis import listing, metrics, render, toolchain  # noqa: E402

TOOLS = Path(__file__).resolve().parent
DEFAULT_ARCHS = ("sm_80", "sm_90")


def parse_archs(text):
    out = []
    for a in re.split(r"[,;\s]+", text.strip()):
        if not a:
            continue
        digits = a.lower().replace("sm_", "").replace("compute_", "").replace(".", "")
        if not re.fullmatch(r"\d+[a-z]?", digits):
            raise argparse.ArgumentTypeError(f"--arch: expected e.g. sm_90 or 9.0, got {a!r}")
        out.append(f"sm_{digits}")
    return out


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ddg_sass_report"


def functions_of(binary, source=""):
    """Parsed functions of a cubin or extension .so, with resources attached."""
    cuobjdump = toolchain.binary_tool("cuobjdump")
    sass = toolchain.run([cuobjdump, "-sass", binary]).stdout
    usage = listing.parse_res_usage(toolchain.run([cuobjdump, "-res-usage", binary]).stdout)
    fns = listing.parse_sass(sass)
    for fn in fns:
        # A lone cubin's -res-usage listing names no arch.
        fn.resources = usage.get((fn.arch, fn.mangled)) or usage.get((None, fn.mangled), {})
        fn.source = source
    return fns


def compiled_functions(root, archs, jobs, log, source_filter=None):
    flags = toolchain.build_flags(root, cache_dir())
    sources = sorted(s for s in flags["sources"] if s.endswith(".cu") and (not source_filter or re.search(source_filter, s)))
    if not sources:
        raise toolchain.ToolError(f"the build of {root} has no .cu sources" + (f" matching {source_filter!r}" if source_filter else ""))
    work = [(root / s, a) for s in sources for a in archs]

    def one(item):
        src, arch = item
        t0 = time.time()
        cubin, ptxas = toolchain.compile_cubin(root, flags, src, arch, cache_dir())
        log(f"  {src.relative_to(root)} {arch}: {time.time() - t0:.0f} s")
        spills = listing.parse_ptxas_spills(ptxas)
        fns = functions_of(cubin, str(src.relative_to(root)))
        for fn in fns:
            fn.spill_store_bytes, fn.spill_load_bytes = spills.get(fn.mangled, (None, None))
        return fns

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return [fn for fns in pool.map(one, work) for fn in fns]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--root", type=Path, default=TOOLS.parent, help="checkout whose csrc/cuda/*.cu to compile (default: this one)")
    src.add_argument("--so", type=Path, help="read the cubins embedded in this built extension instead of compiling")
    ap.add_argument("--arch", type=parse_archs, help="comma list, e.g. sm_80,sm_90 (default: sm_80,sm_90; with --so: all it holds)")
    ap.add_argument("--kernel", help="only kernels whose shortened name matches this regex")
    ap.add_argument("--source", help="only compile the .cu files whose path matches this regex (e.g. bn_stats)")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print a markdown table")
    fmt.add_argument("--json", action="store_true", help="print every figure as JSON")
    ap.add_argument("--check", type=Path, metavar="BUDGETS", help="budget file (tools/sass_budgets.json); exit 1 on a violation")
    ap.add_argument("--kernels-file", type=Path, help="element-counting annotations (default: ROOT/tools/sass_kernels.json, "
                    "else the one beside this script)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc runs (default 2)")
    args = ap.parse_args(argv)

    t_start = time.time()
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    root = args.root.resolve()
    annotations_path = args.kernels_file or root / "tools" / "sass_kernels.json"
    if not annotations_path.exists() and not args.kernels_file:
        annotations_path = TOOLS / "sass_kernels.json"  # a checkout without the tool: this copy's annotations
    annotations = json.loads(annotations_path.read_text())["kernels"]
    budgets = json.loads(args.check.read_text()) if args.check else json.loads((TOOLS / "sass_budgets.json").read_text())

    try:
        if args.so:
            fns = functions_of(args.so.resolve())
            archs = args.arch
        else:
            archs = args.arch or list(DEFAULT_ARCHS)
            log(f"compiling {root}/csrc/cuda/*.cu for {', '.join(archs)} (cached by content)")
            fns = compiled_functions(root, archs, args.jobs, log, args.source)
    except toolchain.ToolError as e:
        log(f"sass_report: {e}")
        return 2

    names = listing.demangle({fn.mangled for fn in fns})
    for fn in fns:
        fn.name = listing.shorten(names[fn.mangled])
    fns = [fn for fn in fns if (not archs or fn.arch in archs) and (not args.kernel or re.search(args.kernel, fn.name))]
    fns.sort(key=lambda f: (f.source, f.name, f.arch))

    entries = []
    for fn in fns:
        rep = metrics.analyse(fn, annotations)
        problems = budget_rules.violations(rep, budgets, {i.base for i in fn.instrs}) if args.check else None
        entries.append((rep, budget_rules.instruction_budget(rep, budgets), problems))

    if args.json:
        print(render.as_json(entries))
    else:
        rows = [render.row(*e) for e in entries]
        print(render.markdown_table(rows) if args.markdown else render.text_table(rows))
    failed, known, used = [], [], set()
    for rep, _, problems in entries:
        for p in problems or []:
            k = budget_rules.known_violation(rep, p, budgets)
            (known if k else failed).append((rep, p))
            if k:
                used.add(k["pattern"])
    for rep, p in known:
        log(f"KNOWN  {rep.name} [{rep.arch}]: {p}")
    for rep, p in failed:
        log(f"BUDGET {rep.name} [{rep.arch}]: {p}")
    # An accepted shortfall that no longer occurs is removed from the budget file, so the list
    # only ever names what is still slow (checked when the report covers every kernel).
    stale = [k for k in (budgets.get("known_violations", []) if args.check and not args.kernel else [])
             if k["pattern"] not in used]
    for k in stale:
        log(f"STALE  known violation {k['pattern']!r} ({k['rule']}) no longer occurs: remove it from {args.check}")
    log(f"{len(entries)} kernels, {len(failed)} budget violations, {len(known)} known, {time.time() - t_start:.0f} s")
    if not entries:
        log("sass_report: no kernel matched")
        return 2
    return 1 if failed or stale else 0


if __name__ == "__main__":
    sys.exit(main())
