"""KLDistillationLoss against the hand-written Hinton formula, its gradient, the CE mix and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from ddg_losses import KLDistillationLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def hinton(s, t, T):
    """T^2 * mean_n sum_k p_t log(p_t / p_s), written out."""
    p_t = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    p_s = torch.exp(s / T) / torch.exp(s / T).sum(1, keepdim=True)
    return T * T * (p_t * (p_t.log() - p_s.log())).sum(1).mean()


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_matches_formula_fp64(T):
    s, t = torch.randn(2, 7, 5, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(KLDistillationLoss(T)(s, t), hinton(s, t, T))


def test_gradient_is_T_times_softmax_difference():
    # d/ds [T^2 KL] = T (p_s - p_t) / N: the T^2 factor keeps the gradient scale T-independent as T grows.
    T = 3.0
    s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    KLDistillationLoss(T)(s, t).backward()
    expected = T * (F.softmax(s / T, 1) - F.softmax(t / T, 1)) / 6
    torch.testing.assert_close(s.grad, expected.detach())
    assert t.grad is None  # the teacher is a constant


def test_zero_for_identical_logits_and_fp32_accumulation_for_half():
    x = torch.randn(5, 10)
    assert float(KLDistillationLoss(4.0)(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
    out = KLDistillationLoss(4.0)(x.half(), (x * 0.5).half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hinton(x.half().float(), (x * 0.5).half().float(), 4.0), rtol=1e-4, atol=1e-5)


def test_alpha_mixes_cross_entropy():
    s, t = torch.randn(2, 8, 3).unbind(0)
    y = torch.randint(0, 3, (8,))
    got = KLDistillationLoss(2.0, alpha=0.3)(s, t, y)
    torch.testing.assert_close(got, 0.3 * hinton(s, t, 2.0) + 0.7 * F.cross_entropy(s, y))


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(alpha=1.5), "alpha"), (dict(temperature="4"), "temperature")])
def test_bad_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=f"KLDistillationLoss.*{match}"):
        KLDistillationLoss(**kwargs)


def test_bad_inputs():
    loss = KLDistillationLoss()
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="student_logits"):
        loss(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="target.*required"):
        KLDistillationLoss(alpha=0.5)(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="target"):
        KLDistillationLoss(alpha=0.5)(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3))
