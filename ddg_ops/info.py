"""``python -m ddg_ops.info``: versions, what the extension was built with, and which
backend each op uses on CPU and CUDA in this process."""
from __future__ import annotations

import json
import platform

import torch

import ddg_ops

OPS = ("cfg_combine", "cfg_step", "dmd_grad", "bn_stats", "split_token_prepare", "adaln_modulate",
       "gated_residual", "diffusion_loss")


def _backend(op: str, device_type: str) -> str:
    e = ddg_ops.EXTENSION
    if e.loaded and device_type in e.device_types:
        key = "CPU" if device_type == "cpu" else "CUDA"
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"ddg::{op}", key):
            return f"{device_type} kernel"
    return "reference (pure PyTorch)"


def report() -> str:
    e = ddg_ops.EXTENSION
    lines = [
        f"ddg_ops {ddg_ops.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"GPU visible: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        f"extension: {'loaded' if e.loaded else 'not loaded'} - {e.reason}",
        "build info: " + (json.dumps(e.build_info, sort_keys=True) if e.build_info else "none (not built)"),
        "",
        f"{'op':<21}{'on CPU tensors':<28}{'on CUDA tensors'}",
    ]
    lines += [f"{op:<21}{_backend(op, 'cpu'):<28}{_backend(op, 'cuda')}" for op in OPS]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
