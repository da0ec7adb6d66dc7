"""``python -m ddg_ops.info``: versions, what the extension was built with (CPU SIMD level, CUDA
archs), whether this machine's CPU and GPUs can run it, and which backend each op uses on CPU
and CUDA in this process."""
from __future__ import annotations

import json
import platform

import torch

import ddg_ops
from ddg_ops import _ext
from ddg_ops._archs import kernel_image_for
from ddg_ops.op_registry import REGISTRY


def _backend(op: str, device_type: str) -> str:
    e = ddg_ops.EXTENSION
    if device_type == "cuda" and torch.cuda.is_available() and "cuda" in e.device_types:
        if not _ext.cuda_device_runs_kernels(torch.cuda.current_device()):
            return "reference (no kernel image)"
    if e.loaded and device_type in e.device_types:
        key = "CPU" if device_type == "cpu" else "CUDA"
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"ddg::{op}", key):
            return f"{device_type} kernel"
    return "reference (pure PyTorch)"


def _targets() -> list:
    e = ddg_ops.EXTENSION
    info = e.build_info
    if not info:
        return []
    features = ", ".join(info.get("cpu_kernel_features", [])) or "none"
    lines = [f"CPU kernels: {info.get('cpu_capability')} (needs {features}): "
             + (f"NOT usable here - {e.cpu_problem}" if e.cpu_problem else "this CPU runs them")]
    if "cuda" not in info.get("backends", []):
        return lines + ["CUDA archs: none (CPU-only build)"]
    sass, ptx = info.get("cuda_sass_archs", []), info.get("cuda_ptx_archs", [])
    lines.append(f"CUDA archs: requested {info.get('cuda_arch_list')!r} -> SASS {', '.join(sass) or '-'}; "
                 f"PTX {', '.join(ptx) or '-'}")
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        cap = torch.cuda.get_device_capability(i)
        image = kernel_image_for(cap, sass, ptx)
        how = {None: "no kernel image: ops use the reference"}.get(
            image, f"runs {image}" + (" (JIT from PTX)" if image and image.startswith("compute") else ""))
        lines.append(f"  cuda:{i} {torch.cuda.get_device_name(i)} (capability {cap[0]}.{cap[1]}): {how}")
    return lines


def report() -> str:
    e = ddg_ops.EXTENSION
    lines = [
        f"ddg_ops {ddg_ops.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"GPU visible: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        f"extension: {'loaded' if e.loaded else 'not loaded'} - {e.reason}",
        "build info: " + (json.dumps(e.build_info, sort_keys=True) if e.build_info else "none (not built)"),
        *_targets(),
        "",
        f"{'op':<21}{'family':<13}{'on CPU tensors':<28}{'on CUDA tensors'}",
    ]
    lines += [f"{r.name:<21}{r.family:<13}{_backend(r.name, 'cpu'):<28}{_backend(r.name, 'cuda')}" for r in REGISTRY]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
