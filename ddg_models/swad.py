"""SWAD: dense stochastic weight averaging over the loss valley (Cha et al., NeurIPS 2021; docs/methods/ddg.md §2.4).

Every training step the current weights join a running uniform *segment* average (torch.optim.swa_utils.
AveragedModel). At each evaluation the segment is closed with the mean source-validation loss and reset. The
loss-valley rule (khanrc/swad's ``LossValley``) then picks which segments form the final average:

* start: once the oldest of the last ``n_converge`` segments has the lowest loss among them, training has
  converged; that segment opens the final average and the threshold becomes
  ``(1 + tolerance_ratio) * mean(loss of those n_converge segments)``;
* every later segment is added when the minimum loss over it and the ``n_tolerance - 1`` segments after it
  (the smoothed loss) is within the threshold; the first segment that fails ends the valley ("dead valley")
  and nothing after it is added. At the end, segments still waiting for their look-ahead are decided on the
  segments that exist.
* never converged: the last segment is returned (khanrc's fallback).

Segments are averaged with equal weight (AveragedModel.update_parameters on the segment averages), which is the
step-uniform average when every segment spans the same number of steps (one evaluation period).
Keep frozen teachers outside the averaged module: AveragedModel deep-copies it.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class SWAD:
    """Segment averaging + loss-valley selection for ``model`` (an nn.Module; its buffers are taken from the
    latest weights, exact for frozen BN, else re-estimate BN statistics on the result).

    Call ``update(model)`` after every optimizer step from the start step on, ``evaluate(val_loss, step)`` at
    every evaluation, and ``final_model()`` at the end.
    """

    def __init__(self, model: nn.Module, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SWAD: 'model' must be an nn.Module, got {type(model).__name__}")
        for name, value in (("n_converge", n_converge), ("n_tolerance", n_tolerance)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SWAD: {name!r} must be a positive int, got {value!r}")
        if not tolerance_ratio >= 0:
            raise ValueError(f"SWAD: 'tolerance_ratio' must be >= 0, got {tolerance_ratio}")
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        self._template = copy.deepcopy(model).cpu()  # architecture for rebuilding segments from state_dicts
        self.segment = self._new_average(model)
        self.segment_start: Optional[int] = None
        self.segments: List[Dict[str, Any]] = []  # closed segments not yet decided: {state, loss, start, end}
        self.history: List[Dict[str, Any]] = []   # every closed segment: {start, end, loss, used}
        self.final: Optional[AveragedModel] = None
        self.threshold: Optional[float] = None
        self.converge_step: Optional[int] = None
        self.dead_valley = False

    @staticmethod
    def _new_average(model: nn.Module) -> AveragedModel:
        # Buffers (frozen BN statistics, the head's class embeddings) follow the latest model; only parameters
        # are averaged, as in SWAD's frozen-BN setting.
        return AveragedModel(model, use_buffers=False)

    # ------------------------------------------------------------------------------------------- training
    def update(self, model: nn.Module, step: int) -> None:
        """Add the current weights of ``model`` to the running segment average."""
        if self.segment_start is None:
            self.segment_start = step
        self.segment.update_parameters(model)

    def evaluate(self, val_loss: float, step: int) -> None:
        """Close the running segment with its validation loss (of the segment average), then reset it."""
        if self.segment_start is None:
            raise ValueError(f"SWAD.evaluate: no update since the last evaluation (step {step})")
        val_loss = float(val_loss)
        if val_loss != val_loss:
            raise ValueError(f"SWAD.evaluate: 'val_loss' is NaN at step {step}")
        record = {"state": {k: v.detach().cpu().clone() for k, v in self.segment.module.state_dict().items()},
                  "loss": val_loss, "start": self.segment_start, "end": step}
        self.history.append({"start": self.segment_start, "end": step, "loss": val_loss, "used": False})
        self.segment.n_averaged.zero_()  # reset: the next update_parameters copies the weights afresh
        self.segment_start = None
        if self.dead_valley:
            return
        self.segments.append(record)
        self._select(final=False)

    def _select(self, final: bool) -> None:
        if self.final is None:
            window = self.segments[-self.n_converge:]
            if len(window) < self.n_converge:
                return
            losses = [s["loss"] for s in window]
            if min(range(len(losses)), key=losses.__getitem__) != 0:
                self.segments = self.segments[-(self.n_converge - 1):] if self.n_converge > 1 else []
                return
            self.threshold = (1.0 + self.tolerance_ratio) * sum(losses) / len(losses)
            self.segments = window
            first = self.segments.pop(0)
            self.converge_step = first["end"]
            first_module = self._module(first["state"])
            self.final = self._new_average(first_module)
            self.final.update_parameters(first_module)  # n_averaged 0 -> 1: the first segment counts
            self._mark_used(first)
        while self.segments and (final or len(self.segments) >= self.n_tolerance):
            smoothed = min(s["loss"] for s in self.segments[:self.n_tolerance])
            if smoothed > self.threshold:
                self.dead_valley = True
                self.segments = []
                return
            segment = self.segments.pop(0)
            self.final.update_parameters(self._module(segment["state"]))
            self._mark_used(segment)

    def _module(self, state: Dict[str, torch.Tensor]) -> nn.Module:
        module = copy.deepcopy(self._template)
        module.load_state_dict(state)
        return module

    def _mark_used(self, segment: Dict[str, Any]) -> None:
        for h in self.history:
            if h["start"] == segment["start"] and h["end"] == segment["end"]:
                h["used"] = True

    # ------------------------------------------------------------------------------------------- results
    @property
    def converged(self) -> bool:
        return self.final is not None

    def final_model(self) -> nn.Module:
        """The averaged model (a plain nn.Module of the student's class, in eval mode)."""
        if not self.history:
            raise ValueError("SWAD.final_model: no segment was evaluated")
        if self.final is None:  # never converged: the last segment, as khanrc/swad falls back to
            last = self._last_state
            return self._module(last).eval()
        if not self.dead_valley:
            self._select(final=True)
        return copy.deepcopy(self.final.module).eval()

    @property
    def _last_state(self) -> Dict[str, torch.Tensor]:
        if not self.segments:
            raise ValueError("SWAD.final_model: not converged and no segment kept")
        return self.segments[-1]["state"]

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume selection (the running segment, undecided segments, the final average)."""
        return {"segment": self.segment.state_dict(), "segment_start": self.segment_start,
                "segments": self.segments, "history": self.history, "threshold": self.threshold,
                "converge_step": self.converge_step, "dead_valley": self.dead_valley,
                "final": None if self.final is None else self.final.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.segment.load_state_dict(state["segment"])
        self.segment_start = state["segment_start"]
        self.segments, self.history = list(state["segments"]), list(state["history"])
        self.threshold, self.converge_step = state["threshold"], state["converge_step"]
        self.dead_valley = state["dead_valley"]
        self.final = None
        if state["final"] is not None:
            self.final = self._new_average(copy.deepcopy(self._template))
            self.final.load_state_dict(state["final"])
