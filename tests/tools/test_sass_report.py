"""tools/sass_report.py on real SASS: a tiny .cu compiled with nvcc (skipped without a toolkit)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import sass_report  # noqa: E402
from sass_analysis import budgets, listing, metrics, toolchain  # noqa: E402

PROBE = Path(__file__).with_name("sass_probe_kernels.cu")
ANNOTATIONS = [{"pattern": "^copy_kernel<", "class": "pack", "types": ["s", "vec"], "count": "store", "width": "s",
                "per_element": 1, "traffic": "2s"}]


def test_shorten_drops_namespaces_and_parameters():
    name = ("void ddg::cuda::(anonymous namespace)::plane_backward_kernel<c10::BFloat16, float, 8>"
            "(c10::BFloat16 const*, float const*, long)")
    assert listing.shorten(name) == "plane_backward_kernel<bf16, f32, 8>"
    assert listing.template_args("k<bf16, Pack<f32, 4>, true>") == ["bf16", "Pack<f32, 4>", "true"]


def test_size_expressions():
    assert metrics.size_expr("3a", {"a": 4}) == 12
    assert metrics.size_expr("2s+a", {"s": 2, "a": 4}) == 8
    assert metrics.size_expr("12", {}) == 12


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    try:
        toolchain.nvcc_path()
        toolchain.binary_tool("cuobjdump")
    except toolchain.ToolError as e:
        pytest.skip(f"needs nvcc and cuobjdump: {e}")
    out = tmp_path_factory.mktemp("sass") / "probe.cubin"
    flags = {"cuda_cflags": [], "cuda_post_cflags": ["-O3"]}
    ptxas = toolchain.run(toolchain.nvcc_command(flags, PROBE, "sm_80", out))
    spills = listing.parse_ptxas_spills(ptxas.stdout + ptxas.stderr)
    fns = sass_report.functions_of(out)
    names = listing.demangle(fn.mangled for fn in fns)
    rules = json.loads((ROOT / "tools" / "sass_budgets.json").read_text())
    result = {}
    for fn in fns:
        fn.name = listing.shorten(names[fn.mangled])
        fn.spill_store_bytes, fn.spill_load_bytes = spills[fn.mangled]
        rep = metrics.analyse(fn, ANNOTATIONS)
        result[fn.name] = (rep, budgets.violations(rep, rules, {i.base for i in fn.instrs}))
    return result


def test_vector_copy_is_all_128_bit_and_cheap(reports):
    rep, problems = reports["copy_kernel<f32, 4>"]
    assert rep.arch == "sm_80" and rep.regs > 0
    assert set(rep.hot.loads) == {16} and set(rep.hot.stores) == {16}
    assert rep.wide_fraction() == 1.0
    assert rep.hot.elements % 4 == 0  # whole packs per iteration, however far nvcc unrolled
    # One LDG.128 + STG.128 + index/bound arithmetic per pack of 4: a few instructions per element.
    assert 0.5 <= rep.hot.per_element <= 6
    assert problems == []


def test_scalar_copy_has_no_wide_accesses(reports):
    scalar, _ = reports["copy_kernel<f32, 1>"]
    vector, _ = reports["copy_kernel<f32, 4>"]
    assert 16 not in scalar.hot.loads and 16 not in scalar.hot.stores
    assert scalar.wide_fraction() == 0.0
    assert 2 <= scalar.hot.per_element <= 20
    assert scalar.hot.per_element > 2 * vector.hot.per_element


def test_register_spill_is_reported(reports):
    rep, problems = reports["spill_kernel"]
    assert rep.spill_store_bytes > 0 and rep.spill_load_bytes > 0
    assert rep.stl > 0 and rep.ldl > 0
    assert any(p.startswith("no-spills: ptxas spills") for p in problems)


def test_local_array_is_reported_without_ptxas_spills(reports):
    rep, problems = reports["local_array_kernel"]
    assert rep.spill_store_bytes == 0 and rep.stack > 0
    assert rep.stl + rep.ldl > 0
    assert any("local-memory instructions" in p for p in problems)


def test_report_reads_an_extension_so(tmp_path, capsys):
    """--so: the cubins embedded in a built shared library, JSON output, kernel filter."""
    try:
        nvcc = toolchain.nvcc_path()
        toolchain.binary_tool("cuobjdump")
    except toolchain.ToolError as e:
        pytest.skip(f"needs nvcc and cuobjdump: {e}")
    so = tmp_path / "probe.so"
    toolchain.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-O3", "-gencode=arch=compute_80,code=sm_80", PROBE, "-o", so])
    annotations = tmp_path / "kernels.json"
    annotations.write_text(json.dumps({"kernels": ANNOTATIONS}))
    rc = sass_report.main(["--so", str(so), "--kernel", "^copy", "--json", "--kernels-file", str(annotations),
                           "--check", str(ROOT / "tools" / "sass_budgets.json")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert sorted((k["name"], k["arch"]) for k in out) == [("copy_kernel<f32, 1>", "sm_80"), ("copy_kernel<f32, 4>", "sm_80")]
    vec4 = next(k for k in out if k["name"] == "copy_kernel<f32, 4>")
    assert vec4["wide_fraction"] == 1.0 and vec4["violations"] == []
    assert vec4["spill_store_bytes"] is None  # ptxas's figures exist only when the report compiles


def test_build_flags_come_from_setup_py(tmp_path):
    """The nvcc flags are the ones setup.py's CUDAExtension gets from torch, learned without side effects."""
    torch = pytest.importorskip("torch")
    try:
        toolchain.nvcc_path()
    except toolchain.ToolError as e:
        pytest.skip(f"needs nvcc: {e}")
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch cannot build the CUDA extension")
    build_info = ROOT / "ddg_ops" / "_build_info.json"
    before = build_info.read_bytes() if build_info.exists() else None
    flags = toolchain.build_flags(ROOT, tmp_path)
    assert sorted(s for s in flags["sources"] if s.endswith(".cu")) == sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert any(f.startswith("-I") and f.rstrip("/").endswith("torch/include") for f in flags["cuda_cflags"])
    assert "-O3" in flags["cuda_post_cflags"] and "-DTORCH_EXTENSION_NAME=_C" in flags["cuda_post_cflags"]
    cmd = toolchain.nvcc_command(flags, "k.cu", "sm_90", "k.cubin")
    assert "-cubin" in cmd and "-arch=sm_90" in cmd and "-c" not in cmd
    assert not any(f.startswith(("-gencode", "--generate-code")) for f in cmd)
    # setup.py ran in a scratch copy: the checkout's build record is untouched.
    assert (build_info.read_bytes() if build_info.exists() else None) == before
