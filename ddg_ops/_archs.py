"""Which GPUs and CPUs a build of ``ddg_ops._C`` can run on (docs/build.md, "Import checks").

Pure Python without torch: ``setup.py`` loads this file by path to record the arch list it
compiled for, and ``ddg_ops._ext`` uses the same functions at import.

A CUDA arch is written ``M.m`` (optionally with the arch-specific suffix ``a``, e.g. ``9.0a``):
  * SASS for ``M.m`` runs on capability ``(M, n)`` with ``n >= m`` (same major only);
  * PTX for ``M.m`` is JIT-compiled by the driver for any capability ``>= (M, m)``;
  * an ``a`` arch (SASS or PTX) uses features of exactly that capability and runs only there.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Tuple

Capability = Tuple[int, int]

_GENCODE = re.compile(r"arch=compute_(\d+)([a-z]?),code=(sm|compute)_(\d+)([a-z]?)")


def _arch_from_digits(digits: str, suffix: str) -> str:
    return f"{digits[:-1]}.{digits[-1]}{suffix}"


def archs_from_gencode_flags(flags: Iterable[str]) -> Tuple[list, list]:
    """(SASS archs, PTX archs) of nvcc ``-gencode=arch=compute_XY,code=sm_XY|compute_XY`` flags,
    each sorted by capability."""
    sass, ptx = set(), set()
    for flag in flags:
        for _, _, kind, digits, suffix in _GENCODE.findall(flag):
            (sass if kind == "sm" else ptx).add(_arch_from_digits(digits, suffix))
    return sorted(sass, key=parse_arch), sorted(ptx, key=parse_arch)


def archs_from_arch_list(arch_list: Optional[str]) -> Tuple[list, list]:
    """(SASS archs, PTX archs) named by a TORCH_CUDA_ARCH_LIST string ('8.0;9.0+PTX', '8.6 9.0a');
    entries that are not archs (e.g. 'visible GPUs') are ignored."""
    sass, ptx = [], []
    for item in re.split(r"[;\s]+", arch_list or ""):
        m = re.fullmatch(r"(\d+\.\d[a]?)(\+PTX)?", item.strip())
        if m:
            sass.append(m.group(1))
            if m.group(2):
                ptx.append(m.group(1))
    return sass, ptx


def parse_arch(arch: str) -> Tuple[int, int, bool]:
    """``'8.6'`` -> (8, 6, False); ``'9.0a'`` -> (9, 0, True)."""
    m = re.fullmatch(r"(\d+)\.(\d)(a?)", arch.strip())
    if not m:
        raise ValueError(f"ddg_ops: CUDA arch must look like '8.0' or '9.0a', got {arch!r}")
    return int(m.group(1)), int(m.group(2)), bool(m.group(3))


def kernel_image_for(capability: Capability, sass: Sequence[str], ptx: Sequence[str]) -> Optional[str]:
    """The image a device of ``capability`` would load from a build with these archs: ``'sm_XY'``
    (SASS, preferred as the driver does), ``'compute_XY'`` (PTX, JIT-compiled), or None when
    nothing in the build runs on it ("no kernel image is available for execution on the device")."""
    major, minor = capability
    runnable = [(m, n, a) for m, n, a in map(parse_arch, sass)
                if m == major and (n == minor if a else n <= minor)]
    if runnable:
        m, n, a = max(runnable)
        return f"sm_{m}{n}{'a' if a else ''}"
    jittable = [(m, n, a) for m, n, a in map(parse_arch, ptx)
                if ((m, n) == (major, minor) if a else (m, n) <= (major, minor))]
    if jittable:
        m, n, a = max(jittable)
        return f"compute_{m}{n}{'a' if a else ''}"
    return None


def missing_cpu_features(required: Iterable[str], available: Optional[Iterable[str]]) -> Optional[list]:
    """The CPU features (``/proc/cpuinfo`` flag names) the CPU kernels were compiled for that this
    CPU lacks, sorted; ``[]`` when it has them all, None when ``available`` is unknown."""
    if available is None:
        return None
    return sorted(set(required) - set(available))


def read_cpu_flags(path: str = "/proc/cpuinfo") -> Optional[frozenset]:
    """The running CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return frozenset(m.group(1).split()) if m else None
