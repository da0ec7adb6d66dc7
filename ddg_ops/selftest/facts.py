"""The facts a self-test report starts from: versions, the build record, the device, whether the
device's compute capability is covered by the architectures the CUDA kernels were built for,
and which backend each op has on that device."""
from __future__ import annotations

import platform
from typing import Dict, List, Optional, Tuple

import torch

from .._archs import archs_from_arch_list, kernel_image_for
from .._ext import STATE as EXTENSION
from ..bench._utils import _device_name
from ..info import _backend


def arch_coverage(capability: Tuple[int, int], arch_list: Optional[str]) -> Tuple[Optional[bool], str]:
    """Whether kernels built for ``arch_list`` run on a device of ``capability``: (covered, how), by
    the rules ddg_ops applies at import (ddg_ops/_archs.py). covered is None when the list names no
    arch (built for the GPUs visible at build time)."""
    sass, ptx = archs_from_arch_list(arch_list)
    if not sass:
        return None, f"arch list {arch_list!r} does not name architectures"
    image = kernel_image_for(tuple(capability), sass, ptx)
    if image is None:
        return False, (f"no SASS or PTX for sm_{capability[0]}{capability[1]} in {arch_list!r}: "
                       "'no kernel image is available'")
    if image.startswith("sm_"):
        return True, f"SASS for {image}"
    return True, f"PTX {image} only: JIT-compiled at first launch"


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
