"""The built extension holds AVX-512 code only where the CPU kernels are (docs/build.md, "What is
compiled with which flags"), so importing it, registering the ops and running their host-side
checks works on CPUs without AVX-512 (a build made on an AVX-512 machine used elsewhere).

The rule, checked on the disassembly of ddg_ops._C:
  * an AVX-512 instruction is one that uses a zmm register, an opmask register (%k0-%k7, also
    in {%k1} masking), xmm16-31/ymm16-31, or the EVEX encoding (first opcode byte 0x62; EVEX
    forms of xmm/ymm instructions need AVX512VL);
  * the host code is every function reachable from what runs at import (the .init_array
    functions, which run the TORCH_LIBRARY registrations and c10's schema inference, and
    PyInit__C) by direct calls, jumps and instructions that take a function's address (the op
    wrappers the registrations store, hence the host-side checks and the CPU feature guard),
    stopping at the kernel entry points of csrc/cpu/kernels.h (ddg::cpu::*_kernels(), which run
    only after the guard); the kernel bodies behind them are reached only through their tables;
  * no host function may contain an AVX-512 instruction.
A kernel file's copy of an inline function that host code also calls (a COMDAT copy the linker
took from a SIMD object) is host code too, so the link order is checked as well.
"""
from __future__ import annotations

import bisect
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest

import ddg_ops

# The compiled _C build is what is disassembled; the emulator library replaces it.
pytestmark = [pytest.mark.requires_ext, pytest.mark.cpu_kernel_only]

_INSN = re.compile(r"^\s*([0-9a-f]+):\t([0-9a-f ]+)\t(.*)$")
_FUNC = re.compile(r"^([0-9a-f]+) <(.+)>:$")
_REF = re.compile(r"\b([0-9a-f]+) <([^>+]+)(?:\+0x[0-9a-f]+)?>")
_AVX512_OPERAND = re.compile(r"%zmm\d|%k[0-7]\b|%[xy]mm(?:1[6-9]|2\d|3[01])\b")
# Prefixes that may stand before an EVEX prefix in 64-bit code (segment overrides, address size).
_PASS_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x67}


def is_avx512(raw: str, text: str) -> bool:
    """Whether one disassembled instruction (raw hex bytes, AT&T text) is an AVX-512 instruction."""
    if _AVX512_OPERAND.search(text):
        return True
    for byte in (int(b, 16) for b in raw.split()):
        if byte not in _PASS_PREFIXES:
            return byte == 0x62
    return False


@dataclass
class Disassembly:
    names: dict = field(default_factory=dict)        # start address -> symbol name
    avx512: dict = field(default_factory=dict)       # function start -> first AVX-512 instruction
    code_refs: dict = field(default_factory=dict)    # function start -> starts of functions referring to it
    relative_relocs: list = field(default_factory=list)  # (offset, function start or None)


def _demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


def disassemble(path: str) -> Disassembly:
    """Functions, their AVX-512 instructions and the code references between them. A reference is
    a direct call/jump target, an address an instruction takes (lea), or, through a GOT slot or a
    data object (vtable, function-pointer table) that an instruction takes the address of, every
    function address stored there (dynamic relocations)."""
    d = Disassembly()
    insns = []  # (function start, raw, text)
    ends = {}   # function start -> end of its last instruction
    current = None
    for line in _run("objdump", "-d", "-w", "--insn-width=16", path).splitlines():
        if m := _FUNC.match(line):
            current = int(m.group(1), 16)
            d.names[current] = m.group(2)
        elif current is not None and (m := _INSN.match(line)):
            insns.append((current, m.group(2), m.group(3)))
            ends[current] = int(m.group(1), 16) + len(m.group(2).split())
    starts = sorted(d.names)
    by_name = {name: start for start, name in d.names.items()}

    def function_at(addr):
        i = bisect.bisect_right(starts, addr) - 1
        return starts[i] if i >= 0 and addr < ends.get(starts[i], starts[i]) else None

    slots = {}  # address of a stored function address -> that function
    for line in _run("objdump", "-R", path).splitlines():
        parts = line.split()
        if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]+", parts[0]):
            continue
        offset = int(parts[0], 16)
        if parts[1] == "R_X86_64_RELATIVE" and parts[2].startswith("*ABS*+"):
            target = function_at(int(parts[2][len("*ABS*+"):], 16))
            d.relative_relocs.append((offset, target))
        else:
            target = by_name.get(re.split(r"[@+]", parts[2])[0])
        if target is not None:
            slots[offset] = target
    slot_offsets = sorted(slots)
    objects = []  # (start, end) of sized data symbols
    for line in _run("nm", "-S", "--defined-only", path).splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "dDrRvVbB" and int(parts[1], 16) > 0:
            objects.append((int(parts[0], 16), int(parts[0], 16) + int(parts[1], 16)))
    objects.sort()
    object_starts = [lo for lo, _ in objects]

    def targets(addr, name):
        if name.endswith("@plt"):
            return [by_name[name[:-4]]] if name[:-4] in by_name else []
        if (f := function_at(addr)) is not None:
            return [f]
        if addr in slots:
            return [slots[addr]]
        i = bisect.bisect_right(object_starts, addr) - 1
        if i >= 0 and addr < objects[i][1]:
            lo, hi = objects[i]
            j = bisect.bisect_left(slot_offsets, lo)
            found = []
            while j < len(slot_offsets) and slot_offsets[j] < hi:
                found.append(slots[slot_offsets[j]])
                j += 1
            return found
        return []

    for func, raw, text in insns:
        if func not in d.avx512 and is_avx512(raw, text):
            d.avx512[func] = text
        for addr, name in _REF.findall(text):
            for target in targets(int(addr, 16), name):
                if target != func:
                    d.code_refs.setdefault(target, set()).add(func)
    return d


# The entry points csrc/cpu/kernels.h declares: compiled with the SIMD flags, entered only after
# the host side has checked the CPU.
KERNEL_ENTRY_POINTS = ("ddg::cpu::guidance_kernels()", "ddg::cpu::bn_stats_kernels()",
                       "ddg::cpu::split_token_kernels()")


def _import_roots(path: str, d: Disassembly) -> set:
    """Functions that run when the library is loaded: .init_array/.fini_array entries, _init, PyInit__C."""
    arrays = []
    for line in _run("objdump", "-h", path).splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] in (".init_array", ".fini_array", ".preinit_array"):
            arrays.append((int(parts[3], 16), int(parts[3], 16) + int(parts[2], 16)))
    roots = {f for f, name in d.names.items() if name in ("_init", "PyInit__C")}
    for offset, target in d.relative_relocs:
        if any(lo <= offset < hi for lo, hi in arrays) and target is not None:
            roots.add(target)
    return roots


def host_functions(path: str, d: Disassembly, demangled: dict) -> set:
    """Every function reachable from the import roots by code references, not entering the kernel
    entry points."""
    callees = {}
    for target, referrers in d.code_refs.items():
        for r in referrers:
            callees.setdefault(r, set()).add(target)
    stop = {f for f, name in d.names.items() if demangled[name] in KERNEL_ENTRY_POINTS}
    seen, todo = set(), list(_import_roots(path, d))
    while todo:
        f = todo.pop()
        if f in seen or f in stop:
            continue
        seen.add(f)
        todo.extend(callees.get(f, ()))
    return seen


def avx512_in_host_code(path: str) -> tuple:
    """(host functions containing AVX-512 as (demangled name, first such instruction), the demangled
    names of all host functions)."""
    d = disassemble(path)
    demangled = _demangle(list(d.names.values()))
    host = host_functions(path, d, demangled)
    bad = sorted((demangled[d.names[f]], d.avx512[f]) for f in host if f in d.avx512)
    return bad, {demangled[d.names[f]] for f in host}


def _so_path() -> str:
    from ddg_ops import _C
    return _C.__file__


def _skip_reason():
    if not all(shutil.which(tool) for tool in ("objdump", "nm", "c++filt")):
        return "needs objdump, nm and c++filt (binutils) to disassemble the extension"
    if ddg_ops.EXTENSION.build_info.get("cpu_capability") != "avx512":
        return (f"the CPU kernels of this build are not AVX-512 kernels (cpu_capability "
                f"{ddg_ops.EXTENSION.build_info.get('cpu_capability')!r}): no AVX-512 code to locate")
    return None


def test_is_avx512_classifies_instructions():
    assert is_avx512("62 f1 7c 48 10 04 24", "vmovups (%rsp),%zmm0")
    assert is_avx512("62 f3 75 08 25 c2 96", "vpternlogd $0x96,%xmm2,%xmm1,%xmm0")  # EVEX on xmm (AVX512VL)
    assert is_avx512("c5 f8 92 c8", "kmovw  %eax,%k1")
    assert is_avx512("67 62 f1 7c 48 10 00", "vmovups (%eax),%zmm0")
    assert not is_avx512("c5 fc 10 04 24", "vmovups (%rsp),%ymm0")  # VEX: AVX
    assert not is_avx512("f3 0f 10 04 24", "movss  (%rsp),%xmm0")
    assert not is_avx512("48 89 e5", "mov    %rsp,%rbp")


def test_avx512_code_only_in_cpu_kernels():
    if reason := _skip_reason():
        pytest.skip(reason)
    path = _so_path()
    bad, host = avx512_in_host_code(path)
    listing = "\n".join(f"  {name[:300]}\n      first: {insn}" for name, insn in bad[:25])
    assert not bad, (f"{len(bad)} host functions (run at import or by the op wrappers) contain AVX-512 "
                     f"instructions, which a CPU without AVX-512 cannot execute:\n{listing}")
    # The traversal must reach the registrations' op wrappers and through them the host checks,
    # or the rule above checks nothing.
    assert any(name.startswith("ddg::cfg_combine_op(") for name in host), "host traversal missed the op functions"
    assert any(name.startswith("ddg::check_cpu_runs_kernels(") for name in host), "host traversal missed the CPU guard"


def test_kernels_hold_avx512_code():
    if reason := _skip_reason():
        pytest.skip(reason)
    d = disassemble(_so_path())
    demangled = _demangle([d.names[f] for f in d.avx512])
    kernel = [name for name in demangled.values() if "ddg::cpu::" in name]
    assert kernel, "an AVX-512 build whose CPU kernels contain no AVX-512 instruction: they lost their SIMD flags"
