"""The facts a self-test report starts from: versions, the build record, the device, whether the
device's compute capability is covered by the architectures the CUDA kernels were built for,
and which backend each op has on that device."""
from __future__ import annotations

import platform
import re
from typing import Dict, List, Optional, Tuple

import torch

from .._ext import STATE as EXTENSION
from ..bench._utils import _device_name
from ..info import _backend


def parse_arch_list(arch_list: Optional[str]) -> List[Tuple[int, int, str, bool]]:
    """TORCH_CUDA_ARCH_LIST entries ('8.0;8.6 9.0+PTX', '9.0a') as (major, minor, suffix, ptx)."""
    entries = []
    for item in re.split(r"[;\s]+", arch_list or ""):
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", item.strip())
        if m:
            entries.append((int(m.group(1)), int(m.group(2)), m.group(3), bool(m.group(4))))
    return entries


def arch_coverage(capability: Tuple[int, int], arch_list: Optional[str]) -> Tuple[Optional[bool], str]:
    """Whether kernels built for ``arch_list`` run on a device of ``capability``: (covered, how).

    A cubin for sm_XY runs on devices of the same major version and minor >= Y (an arch-specific
    'a' cubin only on exactly XY); PTX for compute_XY is JIT-compiled by the driver for any device
    >= XY (slower first launch). covered is None when the list does not say (built for the GPUs
    visible at build time)."""
    major, minor = capability
    entries = parse_arch_list(arch_list)
    if not entries:
        return None, f"arch list {arch_list!r} does not name architectures"
    sass = [f"sm_{a}{b}{s}" for a, b, s, _ in entries
            if a == major and (b == minor if s else b <= minor)]
    if sass:
        return True, f"SASS for {', '.join(sass)}"
    ptx = [f"compute_{a}{b}" for a, b, s, p in entries if p and (a, b) <= (major, minor)]
    if ptx:
        return True, f"PTX {', '.join(ptx)} only: JIT-compiled at first launch"
    return False, f"no SASS or PTX for sm_{major}{minor} in {arch_list!r}: 'no kernel image is available'"


def device_facts(device: torch.device) -> Dict[str, object]:
    facts: Dict[str, object] = {"type": device.type, "name": _device_name(device)}
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        props = torch.cuda.get_device_properties(device)
        covered, how = arch_coverage(capability, EXTENSION.build_info.get("cuda_arch_list"))
        facts.update(capability=f"{capability[0]}.{capability[1]}", memory_gib=round(props.total_memory / 2**30, 1),
                     multiprocessors=props.multi_processor_count, arch_covered=covered, arch_coverage=how)
    else:
        # The SIMD level ATen dispatches to on this CPU; the build's CPU kernels need at least build_info's.
        facts.update(threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    return facts


def collect(device: torch.device, ops: List[str]) -> Dict[str, object]:
    """Everything the report's facts section prints (also the JSON's 'facts')."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension": {"loaded": EXTENSION.loaded, "reason": EXTENSION.reason,
                      "device_types": sorted(EXTENSION.device_types)},
        "build_info": dict(EXTENSION.build_info),
        "device": device_facts(device),
        "backends": {op: _backend(op, device.type) for op in ops},
    }
