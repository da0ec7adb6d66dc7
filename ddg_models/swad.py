"""SWAD: dense stochastic weight averaging over the loss valley (Cha et al., NeurIPS 2021; docs/methods/ddg.md §2.4).

Every training step the current weights join a running uniform *segment* average (torch.optim.swa_utils.
AveragedModel). At each evaluation the segment is closed with a validation loss and reset, and a loss-valley rule
decides which closed segments form the final average. Two rules (docs/methods/ddg.md §2.4 compares them):

``valley="reference"`` (default): the decisions of the SWAD authors' code (khanrc/swad ``LossValley``), which
DDG's and VL2V's results come from. With windows ``n_converge`` (C) and ``n_tolerance`` (T):

* convergence: once the oldest of the last C segments has the lowest loss among them, it is the converge segment;
  the threshold is ``(1 + tolerance_ratio) * mean(loss of those C segments)``. The average is opened on it and,
  when T > C, extended backwards: of the T - C segments before it and itself, those after the last one above the
  threshold, except the first of them, are added; when T < C the C - T segments after it are added.
* afterwards, at every new segment, the oldest of the last T segments is added when the minimum loss over those
  T segments is within the threshold, if it ended at or after the converge step; the first failure kills the
  valley (the authors' trainer then stops training: ``dead_valley``). At the end the segments still in the window
  (but its oldest) are added in order while the minimum over the rest stays within the threshold.
* never converged: the last segment.

The averaging follows that code's running mean too: the average opened on the converge segment counts it zero
times, so the first addition replaces it, and a segment can be added more than once (``history[k]["used"]``
counts the times). Those are the reference's decisions, kept so results are comparable with its numbers.

``valley="paper"``: the rule as the paper's pseudocode states it: the average starts with the converge segment,
every later segment is added when the minimum loss over it and the T - 1 segments after it is within the
threshold, the first failure ends the valley; segments still waiting for their look-ahead at the end are decided
on the segments that exist.

Segments are averaged with equal weight, which is the step-uniform average when every segment spans the same
number of steps (one evaluation period). Parameters are averaged in fp32; buffers (frozen BN statistics, class
embeddings) come from the latest segment in the average. Keep frozen teachers outside the averaged module:
AveragedModel deep-copies it.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

VALLEYS = ("reference", "paper")


class SWAD:
    """Segment averaging + loss-valley selection for ``model`` (an nn.Module).

    Call ``update(model, step)`` after every optimizer step from the start step on, ``evaluate(val_loss, step)``
    at every evaluation, and ``final_model()`` at the end (it does not change the state: training may go on).
    """

    def __init__(self, model: nn.Module, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3,
                 valley: str = "reference"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SWAD: 'model' must be an nn.Module, got {type(model).__name__}")
        for name, value in (("n_converge", n_converge), ("n_tolerance", n_tolerance)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SWAD: {name!r} must be a positive int, got {value!r}")
        if not tolerance_ratio >= 0:
            raise ValueError(f"SWAD: 'tolerance_ratio' must be >= 0, got {tolerance_ratio}")
        if valley not in VALLEYS:
            raise ValueError(f"SWAD: 'valley' must be one of {VALLEYS}, got {valley!r}")
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        self.valley = valley
        self._template = copy.deepcopy(model).cpu()  # architecture for rebuilding segments from state_dicts
        self._params = [name for name, _ in self._template.named_parameters()]
        self.segment = AveragedModel(model, use_buffers=False)
        self.segment_start: Optional[int] = None
        self.history: List[Dict[str, Any]] = []  # every closed segment: {start, end, loss, used}
        self.threshold: Optional[float] = None
        self.converge_step: Optional[int] = None
        self.dead_valley = False
        self._states: Dict[int, Dict[str, torch.Tensor]] = {}  # closed segments the rule may still need
        self._pending: List[int] = []  # paper: segments after the converge one, not yet decided
        self._avg: Optional[Dict[str, torch.Tensor]] = None  # the final average (fp32 parameters)
        self._n = 0
        self._members: List[int] = []  # segments in the average, with repetition

    # ------------------------------------------------------------------------------------------- training
    def update(self, model: nn.Module, step: int) -> None:
        """Add the current weights of ``model`` to the running segment average."""
        if self.segment_start is None:
            self.segment_start = step
        self.segment.update_parameters(model)

    def evaluate(self, val_loss: float, step: int) -> None:
        """Close the running segment with ``val_loss`` (the validation loss the valley is judged on: the
        reference feeds the current weights' loss on the training domains' held-out split), then reset it."""
        if self.segment_start is None:
            raise ValueError(f"SWAD.evaluate: no update since the last evaluation (step {step})")
        val_loss = float(val_loss)
        if val_loss != val_loss:
            raise ValueError(f"SWAD.evaluate: 'val_loss' is NaN at step {step}")
        k = len(self.history)
        self.history.append({"start": self.segment_start, "end": step, "loss": val_loss, "used": 0})
        state = {n: v.detach().cpu().clone() for n, v in self.segment.module.state_dict().items()}
        self.segment.n_averaged.zero_()  # reset: the next update_parameters copies the weights afresh
        self.segment_start = None
        if self.dead_valley:
            return
        self._states[k] = state
        if self.valley == "reference":
            self._reference_step(k)
        else:
            if self.converged:
                self._pending.append(k)
            self._paper_step(final=False)
        self._forget()

    # -------------------------------------------------------------------------------- the reference rule
    def _window(self, size: int, upto: Optional[int] = None) -> List[int]:
        end = len(self.history) if upto is None else upto
        return list(range(max(0, end - size), end))

    def _loss(self, k: int) -> float:
        return self.history[k]["loss"]

    def _reference_step(self, k: int) -> None:
        converge_q, smooth_q = self._window(self.n_converge), self._window(self.n_tolerance)
        if self.converge_step is None:
            if len(converge_q) < self.n_converge:
                return
            losses = [self._loss(i) for i in converge_q]
            if min(range(len(losses)), key=losses.__getitem__) != 0:
                return
            first = converge_q[0]
            self.converge_step = self.history[first]["end"]
            self.threshold = (1.0 + self.tolerance_ratio) * sum(losses) / len(losses)
            self._open(first)
            if self.n_tolerance < self.n_converge:
                for i in converge_q[1:1 + self.n_converge - self.n_tolerance]:
                    self._add(i)
            elif self.n_tolerance > self.n_converge:
                back = smooth_q[:self.n_tolerance - self.n_converge + 1]
                start = 0
                for j in reversed(range(len(back))):
                    if self._loss(back[j]) > self.threshold:
                        start = j + 1
                        break
                for i in back[start + 1:]:
                    self._add(i)
            return
        if self.history[smooth_q[0]]["end"] < self.converge_step:
            return
        if min(self._loss(i) for i in smooth_q) > self.threshold:
            self.dead_valley = True
            return
        self._add(smooth_q[0])

    def _reference_final(self) -> None:
        rest = self._window(self.n_tolerance)[1:]
        while rest and min(self._loss(i) for i in rest) <= self.threshold:
            self._add(rest.pop(0))

    # ------------------------------------------------------------------------------------ the paper rule
    def _paper_step(self, final: bool) -> None:
        if self.converge_step is None:
            window = self._window(self.n_converge)
            if len(window) < self.n_converge:
                return
            losses = [self._loss(i) for i in window]
            if min(range(len(losses)), key=losses.__getitem__) != 0:
                return
            self.threshold = (1.0 + self.tolerance_ratio) * sum(losses) / len(losses)
            self.converge_step = self.history[window[0]]["end"]
            self._open(window[0])
            self._add(window[0])
            self._pending = window[1:]
        while self._pending and (final or len(self._pending) >= self.n_tolerance):
            if min(self._loss(i) for i in self._pending[:self.n_tolerance]) > self.threshold:
                self.dead_valley = True
                self._pending = []
                return
            self._add(self._pending.pop(0))

    # ------------------------------------------------------------------------------------- the average
    def _open(self, k: int) -> None:
        """Open the average on segment ``k`` with a count of zero (the next ``_add`` replaces it)."""
        self._avg = {n: self._states[k][n].float().clone() for n in self._params}
        self._n, self._members = 0, []

    def _add(self, k: int) -> None:
        if self._n == 0:
            self._avg = {n: self._states[k][n].float().clone() for n in self._params}
            for i in self._members:
                self.history[i]["used"] -= 1
            self._members = []
        else:
            for n in self._params:
                self._avg[n] += (self._states[k][n].float() - self._avg[n]) / (self._n + 1)
        self._n += 1
        self._members.append(k)
        self.history[k]["used"] += 1

    def _forget(self) -> None:
        """Drop the states no decision can need any more (all but the rule's windows and the latest member)."""
        keep = set(self._window(max(self.n_converge, self.n_tolerance))) | set(self._pending)
        if self._members:
            keep.add(self._members[-1])
        for k in [k for k in self._states if k not in keep]:
            del self._states[k]

    # ------------------------------------------------------------------------------------------- results
    @property
    def converged(self) -> bool:
        return self.converge_step is not None

    def final_model(self) -> nn.Module:
        """The averaged model (a plain nn.Module of the student's class, in eval mode). Segments still waiting for
        a decision are decided on a copy (``final_history``): the SWAD state is unchanged, training may go on."""
        if not self.history:
            raise ValueError("SWAD.final_model: no segment was evaluated")
        if not self.converged:  # never converged: the last segment, as the reference falls back to
            return self._module(self._states[len(self.history) - 1]).eval()
        done = self._finished()
        module = self._module(self._states[done._members[-1]] if done._members else self._states[max(self._states)])
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(done._avg[n].to(p.dtype))
        return module.eval()

    def final_history(self) -> List[Dict[str, Any]]:
        """``history`` with the end-of-training decisions made: ``used`` = times in the final average."""
        if not self.converged:
            return [dict(h, used=int(k == len(self.history) - 1)) for k, h in enumerate(self.history)]
        return self._finished().history

    def _finished(self) -> "SWAD":
        done = copy.copy(self)
        done.history = [dict(h) for h in self.history]
        done._members, done._pending = list(self._members), list(self._pending)
        done._avg = {n: v.clone() for n, v in self._avg.items()}
        if not self.dead_valley:
            if self.valley == "reference":
                done._reference_final()
            else:
                done._paper_step(final=True)
        return done

    def _module(self, state: Dict[str, torch.Tensor]) -> nn.Module:
        module = copy.deepcopy(self._template)
        module.load_state_dict(state)
        return module

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume selection (the running segment, the segments the rule may still need, the
        final average)."""
        return {"valley": self.valley, "segment": self.segment.state_dict(), "segment_start": self.segment_start,
                "history": self.history, "threshold": self.threshold, "converge_step": self.converge_step,
                "dead_valley": self.dead_valley, "states": self._states, "pending": self._pending,
                "avg": self._avg, "n": self._n, "members": self._members}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("valley") != self.valley:
            raise ValueError(f"SWAD.load_state_dict: the state was written with valley={state.get('valley')!r}, "
                             f"this SWAD uses valley={self.valley!r}")
        self.segment.load_state_dict(state["segment"])
        self.segment_start = state["segment_start"]
        self.history = [dict(h) for h in state["history"]]
        self.threshold, self.converge_step = state["threshold"], state["converge_step"]
        self.dead_valley = state["dead_valley"]
        self._states = dict(state["states"])
        self._pending, self._members, self._n = list(state["pending"]), list(state["members"]), state["n"]
        self._avg = None if state["avg"] is None else {n: v.clone() for n, v in state["avg"].items()}
