"""SWAD's loss-valley selection on validation-loss curves: the reference rule (the SWAD authors' LossValley)
against a transcription of that code's decisions, and the paper's rule on hand-checked curves: where averaging
starts, which segments join, where the dead valley stops it, the never-converged fallback, resume from a
state_dict."""
import collections
import random

import pytest
import torch
from torch import nn

from ddg_models import SWAD

pytestmark = pytest.mark.usefixtures("one_thread")
SEGMENT = 4  # steps per segment


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("frozen_stat", torch.ones(1))


def run(losses, swad=None, model=None, start=0, valley="paper", **kw):
    """Weights w = step at every step; segment k covers steps k*SEGMENT+1 .. (k+1)*SEGMENT."""
    model = model or Scalar()
    swad = swad or SWAD(model, valley=valley, **kw)
    for k in range(start, len(losses)):
        for s in range(k * SEGMENT + 1, (k + 1) * SEGMENT + 1):
            with torch.no_grad():
                model.w.fill_(float(s))
            swad.update(model, s)
        swad.evaluate(losses[k], (k + 1) * SEGMENT)
    return swad, model


def segment_mean(k):
    return sum(range(k * SEGMENT + 1, (k + 1) * SEGMENT + 1)) / SEGMENT


# losses per segment: descent, a minimum at segment 3, a valley up to segment 8, then a jump (dead valley)
CURVE = [5.0, 4.0, 3.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]


def test_valley_start_end_and_average():
    swad, _ = run(CURVE, n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    # converged once segments [3, 4, 5] have their minimum first: start = segment 3 (ends at step 16)
    assert swad.converge_step == 4 * SEGMENT
    assert swad.threshold == pytest.approx(1.3 * (2.5 + 2.6 + 2.7) / 3)
    # segment 8 (3.0 <= 3.38) joins; segment 9's look-ahead window (9..14) is all 5.0 > threshold: dead valley
    assert swad.dead_valley
    used = [k for k, h in enumerate(swad.final_history()) if h["used"]]
    assert used == [3, 4, 5, 6, 7, 8]
    final = swad.final_model()
    expected = sum(segment_mean(k) for k in used) / len(used)
    assert final.w.item() == pytest.approx(expected)
    assert final.frozen_stat.item() == 1.0


def test_segments_waiting_for_look_ahead_are_decided_at_the_end():
    curve = CURVE[:9]  # training stops inside the valley: segments 4..8 lack a full look-ahead window
    swad, _ = run(curve, n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    assert not swad.dead_valley
    final = swad.final_model()
    used = [k for k, h in enumerate(swad.final_history()) if h["used"]]
    assert used == [3, 4, 5, 6, 7, 8]
    assert final.w.item() == pytest.approx(sum(segment_mean(k) for k in used) / len(used))


def test_end_stops_at_first_segment_above_threshold_within_shorter_window():
    curve = [5.0, 4.0, 3.0, 2.5, 2.6, 2.7, 4.0, 4.0]  # threshold 3.38; segments 6, 7 above it
    swad, _ = run(curve, n_converge=3, n_tolerance=2, tolerance_ratio=0.3)
    swad.final_model()
    assert [k for k, h in enumerate(swad.final_history()) if h["used"]] == [3, 4, 5]


def test_never_converged_returns_last_segment():
    swad, _ = run([5.0, 4.0, 3.0, 2.0, 1.0], n_converge=3)
    assert not swad.converged
    assert swad.final_model().w.item() == pytest.approx(segment_mean(4))


@pytest.mark.parametrize("valley", ["reference", "paper"])
@pytest.mark.parametrize("stop", [2, 4, 6, 9])
def test_resume_from_state_dict_gives_the_same_average(valley, stop):
    full, _ = run(CURVE, n_converge=3, n_tolerance=6, valley=valley)
    model = Scalar()
    first, _ = run(CURVE[:stop], model=model, n_converge=3, n_tolerance=6, valley=valley)
    first.final_model()  # asking for the model mid-run changes nothing
    resumed = SWAD(Scalar(), n_converge=3, n_tolerance=6, valley=valley)
    resumed.load_state_dict(first.state_dict())
    run(CURVE, swad=resumed, model=model, start=stop)
    assert resumed.final_model().w.item() == full.final_model().w.item()
    assert resumed.final_history() == full.final_history()


def test_bad_arguments():
    with pytest.raises(ValueError, match="SWAD: 'n_converge'"):
        SWAD(Scalar(), n_converge=0)
    with pytest.raises(TypeError, match="SWAD: 'model'"):
        SWAD("model")
    with pytest.raises(ValueError, match="SWAD: 'valley' must be one of"):
        SWAD(Scalar(), valley="pseudocode")
    with pytest.raises(ValueError, match="written with valley='paper'"):
        SWAD(Scalar()).load_state_dict(SWAD(Scalar(), valley="paper").state_dict())
    swad = SWAD(Scalar())
    with pytest.raises(ValueError, match="SWAD.evaluate: no update"):
        swad.evaluate(1.0, 10)
    with pytest.raises(ValueError, match="SWAD.final_model: no segment"):
        swad.final_model()


# ----------------------------------------------------------------------------------------------------------
# The reference rule. ``transcribed_loss_valley`` restates, decision for decision, the SWAD authors' LossValley
# (two deques of the last n_converge / n_tolerance segments, the backward extension at convergence, the
# oldest-of-the-window addition, the end-of-training flush) and their AveragedModel's running mean (an update
# with a count of zero copies the weights). Segment k's weight is the mean of its steps (segment_mean).


class _Avg:
    def __init__(self, value):
        self.value, self.n, self.members = value, 0, []

    def update(self, k):
        self.value = segment_mean(k) if self.n == 0 else self.value + (segment_mean(k) - self.value) / (self.n + 1)
        self.members = [k] if self.n == 0 else self.members + [k]
        self.n += 1


def transcribed_loss_valley(losses, n_converge, n_tolerance, ratio):
    """(final weight, members with repetition, dead) the reference code reaches on ``losses``."""
    end = lambda k: (k + 1) * SEGMENT  # noqa: E731
    converge_q, smooth_q = collections.deque(maxlen=n_converge), collections.deque(maxlen=n_tolerance)
    final, converge_step, dead, threshold = None, None, False, None
    for k, loss in enumerate(losses):
        if dead:
            continue
        converge_q.append(k)
        smooth_q.append(k)
        if converge_step is None:
            if len(converge_q) < n_converge:
                continue
            qloss = [losses[i] for i in converge_q]
            if qloss.index(min(qloss)) == 0:
                converge_step = end(converge_q[0])
                final = _Avg(segment_mean(converge_q[0]))
                threshold = sum(qloss) / len(qloss) * (1.0 + ratio)
                if n_tolerance < n_converge:
                    for i in range(n_converge - n_tolerance):
                        final.update(converge_q[1 + i])
                elif n_tolerance > n_converge:
                    q = list(smooth_q)[: n_tolerance - n_converge + 1]
                    start = 0
                    for i in reversed(range(len(q))):
                        if losses[q[i]] > threshold:
                            start = i + 1
                            break
                    for i in q[start + 1:]:
                        final.update(i)
            continue
        if end(smooth_q[0]) < converge_step:
            continue
        if min(losses[i] for i in smooth_q) > threshold:
            dead = True
            continue
        final.update(smooth_q[0])
    if final is None:
        return segment_mean(len(losses) - 1), [len(losses) - 1], dead
    if not dead:
        smooth_q.popleft()
        while smooth_q and min(losses[i] for i in smooth_q) <= threshold:
            final.update(smooth_q.popleft())
    return final.value, final.members, dead


def valley_curve(rng, n):
    """A validation-loss curve shaped like a DomainBed run's: a noisy descent into a valley, a noisy floor and,
    sometimes, a rise out of it (over-fitting) or a late spike."""
    floor, descent = rng.uniform(0.2, 1.0), rng.randint(1, max(1, n // 2))
    curve = []
    for k in range(n):
        base = floor + (2.0 * (descent - k) / descent if k < descent else 0.0)
        if k > descent + rng.randint(2, 8) and rng.random() < 0.5:
            base += 0.15 * (k - descent)
        curve.append(round(base + rng.gauss(0, 0.08 * floor) + (3.0 if rng.random() < 0.03 else 0.0), 4))
    return curve


@pytest.mark.parametrize("n_converge, n_tolerance", [(3, 6), (3, 3), (5, 2), (1, 1), (2, 8)])
def test_reference_rule_matches_the_transcription(n_converge, n_tolerance):
    rng = random.Random(n_converge * 100 + n_tolerance)
    for trial in range(40):
        curve = valley_curve(rng, rng.randint(1, 30))
        ratio = rng.choice([0.0, 0.05, 0.3])
        swad, _ = run(curve, valley="reference", n_converge=n_converge, n_tolerance=n_tolerance,
                      tolerance_ratio=ratio)
        weight, members, dead = transcribed_loss_valley(curve, n_converge, n_tolerance, ratio)
        label = (trial, curve, ratio)
        assert swad.dead_valley == dead, label
        used = [h["used"] for h in swad.final_history()]
        assert used == [members.count(k) for k in range(len(curve))], label
        assert swad.final_model().w.item() == pytest.approx(weight, rel=1e-6), label


def test_reference_rule_on_a_hand_checked_curve():
    """CURVE with C=3, T=6: converges when segment 5 arrives (segments 3, 4, 5; minimum first); the backward
    extension looks at segments 0..3 (T-C+1 = 4 of the window 0..5): segment 2 (3.0) is within the threshold
    3.38, segment 1 (4.0) is not, so it adds 3 (the segment after 2): the opened average is replaced by segment 3.
    Then segment k joins when segment k+5 arrives: 3 again (at 8), 4 (at 9), ...; at segment 14 the window 9..14
    is all 5.0 > 3.38: dead valley. Members: 3 twice, 4..8."""
    swad, _ = run(CURVE, valley="reference", n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    assert swad.converge_step == 4 * SEGMENT and swad.dead_valley
    assert swad.threshold == pytest.approx(1.3 * (2.5 + 2.6 + 2.7) / 3)
    assert [h["used"] for h in swad.final_history()][:10] == [0, 0, 0, 2, 1, 1, 1, 1, 1, 0]
    expected = (2 * segment_mean(3) + sum(segment_mean(k) for k in range(4, 9))) / 7
    assert swad.final_model().w.item() == pytest.approx(expected)
