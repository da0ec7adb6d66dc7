"""Which kernel the attention layers of diffusers models run: PyTorch's scaled_dot_product_attention or xformers.

``sdpa`` is diffusers' default on torch 2 (its ``*2_0`` processors), so it needs nothing beyond torch; ``xformers``
is the optional memory-efficient backend (the ``xformers`` extra), switched on through diffusers'
``set_use_memory_efficient_attention_xformers`` on every attention layer.
"""
from __future__ import annotations

from typing import List

from torch import nn

ATTENTION_BACKENDS = ("sdpa", "xformers")


def _attention_layers(module: nn.Module) -> List[nn.Module]:
    """diffusers' attention layers: they carry a ``processor`` and can switch it to xformers."""
    return [m for m in module.modules()
            if hasattr(m, "processor") and callable(getattr(m, "set_use_memory_efficient_attention_xformers", None))]


def _switch_to_sdpa(layer: nn.Module) -> None:
    """Give an attention layer that runs xformers the SDPA processor of the same kind; others stay as they are.

    diffusers' own switch back (``set_use_memory_efficient_attention_xformers(False)``) would give a joint (SD3)
    attention layer the plain processor, so the stateless processors are mapped here by kind; the stateful ones
    (IP-Adapter, Custom Diffusion) go through diffusers, which carries their weights over.
    """
    from diffusers.models import attention_processor as ap

    sdpa_of = {ap.XFormersAttnProcessor: ap.AttnProcessor2_0, ap.XFormersJointAttnProcessor: ap.JointAttnProcessor2_0,
               ap.XFormersAttnAddedKVProcessor: ap.AttnAddedKVProcessor2_0}
    kind = type(layer.processor)
    if kind in sdpa_of:
        layer.set_processor(sdpa_of[kind]())
    elif "XFormers" in kind.__name__:
        layer.set_use_memory_efficient_attention_xformers(False)


def set_attention_backend(module: nn.Module, backend: str) -> int:
    """Run every diffusers attention layer inside ``module`` (a UNet, an SD3 transformer, or any module holding
    them) with ``backend``: 'sdpa' or 'xformers'. Returns how many attention layers it set.

    'xformers' needs the xformers package and a CUDA device; without the package this raises an ImportError
    that says so.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"set_attention_backend: 'backend' must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"set_attention_backend: 'module' must be an nn.Module, got {type(module).__name__}")
    layers = _attention_layers(module)
    if backend == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError as e:
            raise ImportError("set_attention_backend: backend 'xformers' needs the xformers package, which is not "
                              "installed (pip install 'ddg[xformers]'); 'sdpa' needs nothing beyond torch") from e
        for layer in layers:
            layer.set_use_memory_efficient_attention_xformers(True)
        return len(layers)
    for layer in layers:
        _switch_to_sdpa(layer)
    return len(layers)
