"""DP-DMD / DMD2 losses: the DMD gradient against DP-DMD's formula and the 0.5*MSE stop-gradient trick
(velocity and epsilon), the noise levels (per batch / per sample), the fake-score loss, the anchor target and
loss, and the two-time-scale schedule."""
import pytest
import torch

from ddg_losses import (AnchorLoss, DDPMNoise, DistributionMatchingLoss, FakeScoreLoss, FlowMatchingNoise,
                        TwoTimeScaleSchedule, anchor_target)

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (3, 4, 5, 5)


def _stop_gradient_mse_grad(x, g):
    """Autograd of the reference formulation 0.5 * mse(x, sg(x - g)) (DMD2's code)."""
    x = x.detach().clone().requires_grad_(True)
    loss = 0.5 * torch.nn.functional.mse_loss(x, (x - g).detach())
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad


def _rows_mean_abs(t):
    return t.flatten(1).abs().mean(1).view(-1, 1, 1, 1)


def test_velocity_dmd_gradient_matches_spec_formula():
    x = torch.randn(SHAPE, requires_grad=True)
    u, c, f = (torch.randn(SHAPE) for _ in range(3))
    out = DistributionMatchingLoss(3.5, "velocity")(x, u, c, f)
    v_real = u + 3.5 * (c - u)
    g = (v_real - f) / _rows_mean_abs(v_real)
    torch.testing.assert_close(out.grad, g, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out.loss, x)
    ref_loss, ref_grad = _stop_gradient_mse_grad(x, g)
    torch.testing.assert_close(grad, g / x.numel(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-7)


def test_velocity_form_equals_x0_form_of_dpdmd_reference():
    """DP-DMD's code: x0 = x_s - s v, p = x_s - x0, g = (p_real - p_fake) / mean|p_real|: sigma cancels."""
    x = torch.randn(SHAPE)
    x_s, u, c, f = (torch.randn(SHAPE, dtype=torch.float64) for _ in range(4))
    sigma = 0.37
    v_real = u + 3.5 * (c - u)
    p_real, p_fake = x_s - (x_s - sigma * v_real), x_s - (x_s - sigma * f)
    g_ref = (p_real - p_fake) / _rows_mean_abs(p_real)
    out = DistributionMatchingLoss(3.5)(x.double(), u, c, f)
    torch.testing.assert_close(out.grad, g_ref)


def test_epsilon_dmd_gradient_matches_dmd2_formula_per_sample_alpha_bar():
    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    x_t, u, c, f = (torch.randn(SHAPE, dtype=torch.float64) for _ in range(4))
    ab = torch.tensor([0.9, 0.5, 0.05], dtype=torch.float64)
    out = DistributionMatchingLoss(8.0, "epsilon")(x, u, c, f, x_t=x_t, alpha_bar=ab)
    a = ab.view(-1, 1, 1, 1)
    eps_real = u + 8.0 * (c - u)
    x0_real = (x_t - (1 - a).sqrt() * eps_real) / a.sqrt()
    x0_fake = (x_t - (1 - a).sqrt() * f) / a.sqrt()
    g = (x0_fake - x0_real) / _rows_mean_abs(x.detach() - x0_real)  # (p_real - p_fake) with p = x - x0
    torch.testing.assert_close(out.grad, g)
    (grad,) = torch.autograd.grad(out.loss, x)
    torch.testing.assert_close(grad, _stop_gradient_mse_grad(x, g)[1])


def test_noised_flow_loss_feeds_the_scores_the_noised_point_and_timestep():
    x = torch.randn(SHAPE, requires_grad=True)
    noise = torch.randn(SHAPE)
    schedule = FlowMatchingNoise(torch.tensor([0.25]))  # a one-entry table: sigma is known
    seen = {}
    w_u, w_c, w_f = 0.3, 0.7, 0.9

    def real(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return w_u * x_t, w_c * x_t

    out = DistributionMatchingLoss(2.0).noised(x, real, lambda x_t, t: w_f * x_t, schedule, noise=noise)
    x_t = 0.75 * x.detach() + 0.25 * noise
    torch.testing.assert_close(seen["x_t"], x_t)
    torch.testing.assert_close(seen["t"], torch.full((3,), 250.0))
    v_real = (w_u + 2.0 * (w_c - w_u)) * x_t
    expected = (v_real - w_f * x_t) / _rows_mean_abs(v_real)
    torch.testing.assert_close(out.grad, expected, rtol=1e-5, atol=1e-6)
    assert out.level.coef.tolist() == [0.25] * 3


def test_noised_epsilon_loss_passes_x_t_and_alpha_bar():
    ab_table = torch.linspace(0.99, 0.01, 100)
    schedule = DDPMNoise(ab_table, min_step=2, max_step=98)
    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(SHAPE, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    out = DistributionMatchingLoss(1.75, "epsilon").noised(x, lambda x_t, t: (0.1 * x_t, 0.2 * x_t),
                                                           lambda x_t, t: 0.3 * x_t, schedule, noise=noise,
                                                           generator=gen)
    a = out.level.coef.double().view(-1, 1, 1, 1)
    assert torch.equal(out.level.coef, ab_table[out.level.timestep.long()])
    x_t = a.sqrt() * x.detach() + (1 - a).sqrt() * noise
    eps_real = (0.1 + 1.75 * 0.1) * x_t
    x0_real = (x_t - (1 - a).sqrt() * eps_real) / a.sqrt()
    x0_fake = (x_t - (1 - a).sqrt() * 0.3 * x_t) / a.sqrt()
    torch.testing.assert_close(out.grad, (x0_fake - x0_real) / _rows_mean_abs(x.detach() - x0_real))


def test_noised_rejects_a_schedule_of_the_other_parameterization():
    with pytest.raises(ValueError, match="noised: the noise schedule must be for prediction='velocity'"):
        DistributionMatchingLoss(3.5).noised(torch.randn(2, 3), None, None, DDPMNoise(torch.rand(10) * 0.9 + 0.05))


def test_flow_noise_per_batch_and_per_sample_timesteps():
    table = torch.linspace(0.01, 1.0, 1000)
    per_batch = FlowMatchingNoise(table).draw(64, generator=torch.Generator().manual_seed(0))
    assert per_batch.coef.unique().numel() == 1 and torch.equal(per_batch.timestep, 1000 * per_batch.coef)
    per_sample = FlowMatchingNoise(table, per_sample=True).draw(64, generator=torch.Generator().manual_seed(0))
    assert per_sample.coef.unique().numel() > 32
    assert bool(torch.isin(per_sample.coef, table).all())


def test_ddpm_noise_draws_in_range_per_sample():
    level = DDPMNoise(torch.linspace(0.999, 0.001, 1000), min_step=20, max_step=980).draw(
        4096, generator=torch.Generator().manual_seed(0))
    assert level.timestep.min() >= 20 and level.timestep.max() <= 979 and level.timestep.unique().numel() > 500


def test_noise_schedules_reject_bad_tables():
    with pytest.raises(ValueError, match="FlowMatchingNoise: 'sigmas' must lie in"):
        FlowMatchingNoise(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="DDPMNoise: need 0 <= min_step < max_step"):
        DDPMNoise(torch.rand(10), min_step=5, max_step=5)


@pytest.mark.parametrize("schedule", [FlowMatchingNoise(torch.tensor([0.6])),
                                      DDPMNoise(torch.full((4,), 0.36), per_sample=False)])
def test_fake_score_loss_is_the_flow_or_epsilon_mse_and_trains_only_the_fake(schedule):
    fake = torch.nn.Linear(5, 5)
    x = torch.randn(6, 5, requires_grad=True)
    noise = torch.randn(6, 5)
    out = FakeScoreLoss(schedule)(lambda x_t, t: fake(x_t), x, noise=noise)
    if schedule.prediction == "velocity":
        x_t, target = 0.4 * x + 0.6 * noise, noise - x
    else:
        x_t, target = 0.6 * x + 0.8 * noise, noise
    torch.testing.assert_close(out.loss, (fake(x_t) - target).square().mean())
    out.loss.backward()
    assert x.grad is None and fake.weight.grad is not None


def test_anchor_target_is_the_average_velocity_and_straight_paths_recover_eps_minus_x0():
    x1, x0 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma_k = 0.851
    z_k = (1 - sigma_k) * x0 + sigma_k * x1  # the teacher state on a straight path from x0
    torch.testing.assert_close(anchor_target(x1, z_k, sigma_k), x1 - x0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(anchor_target(x1, x0, 0.0), x1 - x0)
    with pytest.raises(ValueError, match="anchor_target: 'sigma_k' must be in"):
        anchor_target(x1, z_k, 1.0)


def test_anchor_loss_value_and_gradient():
    v0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    x1, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    loss = AnchorLoss(0.05)(v0, x1, z, 0.935)
    target = (x1 - z) / (1 - 0.935)
    torch.testing.assert_close(loss, 0.05 * (v0 - target).square().mean())
    (grad,) = torch.autograd.grad(loss, v0)
    torch.testing.assert_close(grad, 2 * 0.05 * (v0 - target) / v0.numel())
    with pytest.raises(ValueError, match="AnchorLoss: 'weight' must be >= 0"):
        AnchorLoss(-1.0)


def test_ttur_alternate_is_dpdmd_five_fake_then_one_generator():
    ttur = TwoTimeScaleSchedule(5, "alternate")
    phases = [ttur.phases(i) for i in range(12)]
    assert phases == [("fake",)] * 5 + [("generator",)] + [("fake",)] * 5 + [("generator",)]
    assert ttur.generator_updates(1800) == 300


def test_ttur_every_step_is_dmd2():
    ttur = TwoTimeScaleSchedule(10, "every_step")
    assert ttur.phases(0) == ("generator", "fake") and ttur.phases(1) == ("fake",)
    assert [i for i in range(31) if ttur.update_generator(i)] == [0, 10, 20, 30]
    assert all(ttur.update_fake(i) for i in range(31))


def test_ttur_rejects_bad_arguments():
    with pytest.raises(ValueError, match="TwoTimeScaleSchedule: 'ratio' must be a positive int"):
        TwoTimeScaleSchedule(0)
    with pytest.raises(ValueError, match="TwoTimeScaleSchedule: 'mode' must be one of"):
        TwoTimeScaleSchedule(5, "sometimes")
    with pytest.raises(ValueError, match="'iteration' must be an int >= 0"):
        TwoTimeScaleSchedule(5).phases(-1)



@pytest.mark.parametrize("bad", [torch.randn(1, 4, 5, 5), torch.randn(4, 5, 5), "noise"])
def test_given_noise_must_match_x_instead_of_broadcasting(bad):
    # A [1, ...] or [C, H, W] noise used to broadcast in the mix: every sample silently got the same draw.
    x = torch.randn(SHAPE)
    flow = FlowMatchingNoise(torch.linspace(0.05, 1.0, 20))
    with pytest.raises(ValueError, match=r"FakeScoreLoss: 'noise' must be a tensor shaped like 'x' \(3, 4, 5, 5\)"):
        FakeScoreLoss(flow)(lambda x_t, t: x_t, x, noise=bad)
    with pytest.raises(ValueError, match="DistributionMatchingLoss.noised: 'noise' must be a tensor shaped like 'x'"):
        DistributionMatchingLoss(3.5).noised(x, lambda x_t, t: (x_t, x_t), lambda x_t, t: x_t, flow, noise=bad)
    with pytest.raises(ValueError, match="FakeScoreLoss: 'noise' must be a tensor shaped like 'x'"):
        FakeScoreLoss(DDPMNoise(torch.linspace(0.99, 0.01, 50)))(lambda x_t, t: x_t, x, noise=bad)
