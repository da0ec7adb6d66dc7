"""BN-statistics alignment loss (DeepInversion / DDIS) as forward hooks on a classifier's BatchNorm layers."""
from __future__ import annotations

import math
import weakref
from numbers import Real
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ddg_ops import BN_LOSS_FORMS, bn_stats_loss

_NAME = "BNStatAlignmentLoss"


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _pre_hook(ref, name, module, args):
    self = ref()
    if self is not None:
        self._snapshot_targets(name, module)


def _post_hook(ref, name, module, args, output):
    self = ref()
    if self is not None:
        self._accumulate(name, module, args)


class BNStatAlignmentLoss(nn.Module):
    r"""DeepInversion's BN-statistics loss ``sum_l s_l * R_l`` over a classifier's BatchNorm layers.

    Hooks are registered on the classifier's BN layers; every forward of the classifier adds,
    per hooked layer l, ``s_l * R_l`` computed by :func:`ddg_ops.bn_stats_loss` on the layer's
    **input** (the conv output) against its ``running_mean`` / ``running_var`` (docs/methods/ddis.md §4, §5):

    * ``form='unsquared'`` (DeepInversion, DDIS code): R_l = ||running_var - var||_2 + ||running_mean - mean||_2
    * ``form='squared'`` (DDIS paper): R_l = ||mean - running_mean||^2 + ||var - running_var||^2

    with per-channel batch mean and biased variance over every dim but 1 (fp32 accumulation,
    fp64 for fp64 inputs). ``s_l`` is ``layer_weights[l]`` (default 1), and the first chosen
    layer's weight is multiplied by ``first_bn_multiplier`` (DeepInversion's ImageNet default
    is 10; DDIS uses 1). Multiply the result by your global coefficient (DeepInversion's
    ``r_feature``, DDIS' ``lambda_bn``).

    Reading the loss: calling the module (``bn_loss()``) returns the sum of everything
    accumulated since the last call or :meth:`reset` and clears the accumulator, so any number
    of classifier forwards may run between reads; with none it returns a zero tensor.
    :meth:`per_layer` gives the latest (detached) loss of each layer for logging. Set
    ``enabled = False`` to run the classifier without accumulating (e.g. for evaluation).

    Targets and train mode: the targets are the running statistics the layer holds **before**
    the forward that is being scored. A forward pre-hook snapshots them (a copy only when the
    layer is in training mode and tracks running stats, i.e. when its forward will update them),
    and the forward hook computes the loss. In eval mode -- DeepInversion's and DDIS' setting,
    where the hook reads ``module.running_mean`` at hook time -- this is identical to DeepInversion.
    In train mode DeepInversion's literal hook would read the stats *after* BN's forward already
    moved them toward the very batch being scored; this module does not, so the batch does not
    pull its own target. Note that a train-mode classifier still normalises with batch statistics
    and its BN forward still updates (i.e. corrupts) the running stats with the synthetic inputs:
    put the classifier in ``eval()`` unless you really want that. Targets are detached constants
    (fp32/fp64 as stored; they are cast to the statistics' dtype).

    Mixed precision: under ``torch.autocast`` the BN inputs may be fp16/bf16; statistics and
    loss are still computed in fp32.

    ``sync=True`` merges each layer's statistics across the processes of ``process_group`` as
    SyncBatchNorm does (see :func:`ddg_ops.bn_stats_loss`): every rank gets the loss of the global
    batch and its inputs the exact gradient of that one loss (not of the sum over ranks).

    The classifier is *not* a submodule: the loss' ``state_dict``/``parameters``/``.to()`` do
    not include or move it. Hooks are removed by :meth:`remove`, on leaving a ``with`` block,
    or when this object is garbage-collected.

    Args:
        model: the pretrained classifier (any ``nn.Module`` with BatchNorm layers).
        layers: names (as in ``model.named_modules()``) of the BN layers to hook, in the order
            that ``layer_weights`` sequences and ``first_bn_multiplier`` refer to; default: every
            ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, ...) in ``named_modules()`` order.
        form: 'unsquared' or 'squared'.
        first_bn_multiplier: s_0, multiplies the first chosen layer's weight.
        layer_weights: dict name -> weight (unlisted layers get 1) or a sequence with one weight
            per chosen layer.
        sync, process_group: cross-process statistics (``torch.distributed`` must be initialised).
    """

    def __init__(self, model: nn.Module, layers: Optional[Sequence[str]] = None, form: str = "unsquared",
                 first_bn_multiplier: float = 1.0,
                 layer_weights: Optional[Union[Mapping[str, float], Sequence[float]]] = None,
                 sync: bool = False, process_group=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_NAME}: 'model' must be an nn.Module (the classifier), got {type(model).__name__}")
        if form not in BN_LOSS_FORMS:
            raise ValueError(f"{_NAME}: 'form' must be one of {', '.join(map(repr, BN_LOSS_FORMS))}, got {form!r}")
        _check_weight("first_bn_multiplier", first_bn_multiplier)
        if not isinstance(sync, bool):
            raise TypeError(f"{_NAME}: 'sync' must be a bool, got {type(sync).__name__}")

        modules = dict(model.named_modules())
        if layers is None:
            names = [n for n, m in modules.items() if isinstance(m, _BatchNorm)]
            if not names:
                raise ValueError(f"{_NAME}: 'model' must contain at least one BatchNorm layer "
                                 f"(torch.nn.modules.batchnorm._BatchNorm), got a {type(model).__name__} with none")
        else:
            names = _check_layers(layers, modules)
        untracked = [n for n in names if modules[n].running_mean is None or modules[n].running_var is None]
        if untracked:
            raise ValueError(f"{_NAME}: the chosen BatchNorm layers must have running statistics (the targets), "
                             f"got layers with track_running_stats=False: {untracked}"
                             + ("; pass 'layers' to leave them out" if layers is None else ""))

        weights = _layer_weights(layer_weights, names)
        weights[names[0]] *= float(first_bn_multiplier)

        self.layers = tuple(names)
        self.weights: Dict[str, float] = weights
        self.form = form
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.sync = sync
        self.process_group = process_group
        self.enabled = True
        # Plain attributes (object.__setattr__): nn.Module would register the classifier as a submodule.
        object.__setattr__(self, "_model", model)
        self._total: Optional[torch.Tensor] = None
        self._latest: Dict[str, torch.Tensor] = {}
        self._targets: Dict[str, tuple] = {}
        self._handles: list = []
        ref = weakref.ref(self)
        for name in names:
            bn = modules[name]
            self._handles.append(bn.register_forward_pre_hook(_bind(_pre_hook, ref, name)))
            self._handles.append(bn.register_forward_hook(_bind(_post_hook, ref, name)))
        # Hooks hold only a weak reference; dropping the loss object removes them.
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)

    @property
    def model(self) -> nn.Module:
        """The hooked classifier (not a submodule)."""
        return self._model

    # -- hooks ---------------------------------------------------------------------------------
    def _snapshot_targets(self, name: str, bn: _BatchNorm) -> None:
        if not self.enabled:
            return
        mean, var = bn.running_mean, bn.running_var
        if bn.training and bn.track_running_stats:
            # BN's forward is about to update the buffers in place: score against the stats before it.
            mean, var = mean.detach().clone(), var.detach().clone()
        self._targets[name] = (mean, var)

    def _accumulate(self, name: str, bn: _BatchNorm, args) -> None:
        if not self.enabled:
            return
        target = self._targets.pop(name, None)
        mean, var = target if target is not None else (bn.running_mean, bn.running_var)
        if mean is None or var is None:
            raise RuntimeError(f"{_NAME}: layer {name!r} has no running statistics at forward time "
                               f"(running_mean/running_var is None)")
        out = bn_stats_loss(args[0], mean.detach(), var.detach(), form=self.form, weight=self.weights[name],
                            sync=self.sync, process_group=self.process_group)
        self._latest[name] = out.loss.detach()
        self._total = out.loss if self._total is None else self._total + out.loss

    # -- reading ------------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        """Sum of the weighted per-layer losses accumulated since the last read; resets the sum."""
        total = self._total
        self._total = None
        if total is None:
            ref = self._model.get_submodule(self.layers[0]).running_mean
            dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
            return torch.zeros((), dtype=dtype, device=ref.device)
        return total

    def reset(self) -> None:
        """Drop the accumulated loss (and its autograd graph) and the per-layer log."""
        self._total = None
        self._latest = {}
        self._targets = {}

    def per_layer(self) -> Dict[str, torch.Tensor]:
        """Latest weighted loss of each layer that has run since construction/reset (detached)."""
        return dict(self._latest)

    # -- hook lifetime ------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook from the classifier; later classifier forwards add nothing."""
        _remove_handles(self._handles)
        self._targets = {}

    @property
    def hooked(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "BNStatAlignmentLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return (f"layers={len(self.layers)}, form={self.form!r}, first_bn_multiplier={self.first_bn_multiplier}, "
                f"sync={self.sync}, hooked={self.hooked}")


def _bind(fn, ref, name):
    def hook(*args):
        return fn(ref, name, *args)
    return hook


def _check_weight(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{_NAME}: {what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{_NAME}: {what} must be finite, got {value}")


def _check_layers(layers, modules: Mapping[str, nn.Module]) -> list:
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(f"{_NAME}: 'layers' must be a list of module names, got {type(layers).__name__}"
                        + (f" {layers!r} (wrap a single name in a list)" if isinstance(layers, str) else ""))
    names = list(layers)
    if not names:
        raise ValueError(f"{_NAME}: 'layers' must name at least one BatchNorm layer, got an empty list")
    bn_names = [n for n, m in modules.items() if isinstance(m, _BatchNorm)]
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{_NAME}: 'layers' must hold module names (str), got {type(name).__name__} {name!r}")
        if name not in modules:
            raise ValueError(f"{_NAME}: 'layers' entry {name!r} is not a module of the model; BatchNorm layers "
                             f"are: {_short(bn_names)}")
        if not isinstance(modules[name], _BatchNorm):
            raise ValueError(f"{_NAME}: 'layers' entry {name!r} must be a BatchNorm layer (_BatchNorm), got "
                             f"{type(modules[name]).__name__}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{_NAME}: 'layers' must name each layer once, got duplicates {dupes}")
    return names


def _layer_weights(layer_weights, names: list) -> Dict[str, float]:
    if layer_weights is None:
        return {n: 1.0 for n in names}
    if isinstance(layer_weights, Mapping):
        unknown = [k for k in layer_weights if k not in names]
        if unknown:
            raise ValueError(f"{_NAME}: 'layer_weights' keys must be chosen layers, got unknown names {unknown}; "
                             f"chosen layers are: {_short(names)}")
        for k, w in layer_weights.items():
            _check_weight(f"'layer_weights'[{k!r}]", w)
        return {n: float(layer_weights.get(n, 1.0)) for n in names}
    if isinstance(layer_weights, (str, bytes)) or not isinstance(layer_weights, Sequence):
        raise TypeError(f"{_NAME}: 'layer_weights' must be a dict name -> weight or a sequence of weights, "
                        f"got {type(layer_weights).__name__}")
    if len(layer_weights) != len(names):
        raise ValueError(f"{_NAME}: 'layer_weights' must have one weight per chosen layer ({len(names)}), "
                         f"got {len(layer_weights)}")
    for i, w in enumerate(layer_weights):
        _check_weight(f"'layer_weights'[{i}]", w)
    return {n: float(w) for n, w in zip(names, layer_weights)}


def _short(names: list, limit: int = 8) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"
