"""SWAD's loss-valley selection on synthetic validation-loss curves: where averaging starts, which segments
join, where the dead valley stops it, the never-converged fallback, and resume from a state_dict."""
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


def run(losses, swad=None, model=None, start=0, **kw):
    """Weights w = step at every step; segment k covers steps k*SEGMENT+1 .. (k+1)*SEGMENT."""
    model = model or Scalar()
    swad = swad or SWAD(model, **kw)
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
    used = [k for k, h in enumerate(swad.history) if h["used"]]
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
    used = [k for k, h in enumerate(swad.history) if h["used"]]
    assert used == [3, 4, 5, 6, 7, 8]
    assert final.w.item() == pytest.approx(sum(segment_mean(k) for k in used) / len(used))


def test_end_stops_at_first_segment_above_threshold_within_shorter_window():
    curve = [5.0, 4.0, 3.0, 2.5, 2.6, 2.7, 4.0, 4.0]  # threshold 3.38; segments 6, 7 above it
    swad, _ = run(curve, n_converge=3, n_tolerance=2, tolerance_ratio=0.3)
    swad.final_model()
    assert [k for k, h in enumerate(swad.history) if h["used"]] == [3, 4, 5]


def test_never_converged_returns_last_segment():
    swad, _ = run([5.0, 4.0, 3.0, 2.0, 1.0], n_converge=3)
    assert not swad.converged
    assert swad.final_model().w.item() == pytest.approx(segment_mean(4))


def test_resume_from_state_dict_gives_the_same_average():
    full, _ = run(CURVE, n_converge=3, n_tolerance=6)
    model = Scalar()
    first, _ = run(CURVE[:6], model=model, n_converge=3, n_tolerance=6)
    resumed = SWAD(Scalar(), n_converge=3, n_tolerance=6)
    resumed.load_state_dict(first.state_dict())
    run(CURVE, swad=resumed, model=model, start=6)
    assert resumed.final_model().w.item() == pytest.approx(full.final_model().w.item())
    assert [h["used"] for h in resumed.history] == [h["used"] for h in full.history]


def test_bad_arguments():
    with pytest.raises(ValueError, match="SWAD: 'n_converge'"):
        SWAD(Scalar(), n_converge=0)
    with pytest.raises(TypeError, match="SWAD: 'model'"):
        SWAD("model")
    swad = SWAD(Scalar())
    with pytest.raises(ValueError, match="SWAD.evaluate: no update"):
        swad.evaluate(1.0, 10)
    with pytest.raises(ValueError, match="SWAD.final_model: no segment"):
        swad.final_model()
