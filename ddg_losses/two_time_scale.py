"""Two-time-scale update rule (TTUR) of the generator and the fake score (docs/methods/dpdmd.md §2.3, §3.2).

* ``mode='alternate'`` (DP-DMD): each iteration does one thing, the generator when
  ``(iteration + 1) % (ratio + 1) == 0`` and the fake score otherwise: ratio fake updates per
  generator update, never both in one iteration.
* ``mode='every_step'`` (DMD2): the fake score updates every iteration; the generator too when
  ``iteration % ratio == 0``.
"""
from __future__ import annotations

from typing import Tuple

TTUR_MODES = ("alternate", "every_step")


class TwoTimeScaleSchedule:
    """Which networks update at a (0-based) iteration.

    Args:
        ratio: fake updates per generator update (DP-DMD ``per_train_fake_num`` 5; DMD2 5 SDXL / 10 SD1.5).
        mode: 'alternate' (DP-DMD) or 'every_step' (DMD2).
    """

    def __init__(self, ratio: int = 5, mode: str = "alternate"):
        if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 1:
            raise ValueError(f"TwoTimeScaleSchedule: 'ratio' must be a positive int, got {ratio!r}")
        if mode not in TTUR_MODES:
            raise ValueError(f"TwoTimeScaleSchedule: 'mode' must be one of {TTUR_MODES}, got {mode!r}")
        self.ratio, self.mode = ratio, mode

    def _check(self, iteration: int) -> None:
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise ValueError(f"TwoTimeScaleSchedule: 'iteration' must be an int >= 0, got {iteration!r}")

    def update_generator(self, iteration: int) -> bool:
        self._check(iteration)
        if self.mode == "alternate":
            return (iteration + 1) % (self.ratio + 1) == 0
        return iteration % self.ratio == 0

    def update_fake(self, iteration: int) -> bool:
        self._check(iteration)
        return self.mode == "every_step" or not self.update_generator(iteration)

    def phases(self, iteration: int) -> Tuple[str, ...]:
        """The updates of this iteration in order: ('generator',), ('fake',) or ('generator', 'fake')."""
        return tuple(name for name, on in (("generator", self.update_generator(iteration)),
                                           ("fake", self.update_fake(iteration))) if on)

    def generator_updates(self, iterations: int) -> int:
        """How many generator updates ``iterations`` iterations contain."""
        return sum(self.update_generator(i) for i in range(iterations))

    def __repr__(self) -> str:
        return f"TwoTimeScaleSchedule(ratio={self.ratio}, mode={self.mode!r})"
