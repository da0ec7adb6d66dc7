"""ddg_ops.diffusion_loss and the schedule tables against IDDPM written the original way.

An independent fp64 transcription of improved-diffusion's GaussianDiffusion (numpy tables,
q_sample -> predict x_start from eps -> q_posterior -> p_mean_variance with LEARNED_RANGE ->
normal_kl / discretized_gaussian_log_likelihood at t = 0, mean over dims / ln 2, plus the MSE,
the vb term seeing the frozen eps prediction), its space_timesteps and SpacedDiffusion betas.
It shares no code with ddg_ops: the op's shortcut (d = mean_coef * (eps_hat - eps), one
[T, 3] table) must reproduce the long way round, values and gradients.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import ddg_ops
from ddg_ops import GaussianDiffusionSchedule, space_timesteps


# ------------------------------------------------------------------------------ IDDPM, transcribed

def _betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def _get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return _betas_for_alpha_bar(num_diffusion_timesteps,
                                    lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise NotImplementedError(schedule_name)


def _iddpm_space_timesteps(num_timesteps, section_counts):
    if isinstance(section_counts, str):
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def _spaced_betas(betas, use_timesteps):
    """SpacedDiffusion.__init__: new betas from the base alphas_cumprod on the kept steps."""
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    last_alpha_cumprod = 1.0
    new_betas, timestep_map = [], []
    for i, alpha_cumprod in enumerate(alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
            last_alpha_cumprod = alpha_cumprod
            timestep_map.append(i)
    return np.array(new_betas), timestep_map


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, *, means, log_scales):
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = _approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = _approx_standard_normal_cdf(min_in)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def _mean_flat(tensor):
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


class IDDPM:
    """GaussianDiffusion with model_mean_type=EPSILON, model_var_type=LEARNED_RANGE, loss_type=MSE."""

    def __init__(self, betas):
        self.betas = betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1],
                                                               self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @staticmethod
    def _extract(arr, timesteps, broadcast_shape):
        res = torch.from_numpy(arr)[timesteps].double()
        while len(res.shape) < len(broadcast_shape):
            res = res[..., None]
        return res.expand(broadcast_shape)

    def q_sample(self, x_start, t, noise):
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        posterior_mean = (self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                          + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return posterior_mean, self._extract(self.posterior_log_variance_clipped, t, x_t.shape)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def p_mean_variance(self, model_output, x, t):
        C = x.shape[1]
        model_output, model_var_values = torch.split(model_output, C, dim=1)
        min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
        max_log = self._extract(np.log(self.betas), t, x.shape)
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)  # clip_denoised=False
        model_mean, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return model_mean, model_log_variance

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        true_mean, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        mean, log_variance = self.p_mean_variance(model_output, x_t, t)
        kl = _normal_kl(true_mean, true_log_variance_clipped, mean, log_variance)
        kl = _mean_flat(kl) / np.log(2.0)
        decoder_nll = -_discretized_gaussian_log_likelihood(x_start, means=mean, log_scales=0.5 * log_variance)
        decoder_nll = _mean_flat(decoder_nll) / np.log(2.0)
        return torch.where((t == 0), decoder_nll, kl)

    def training_losses(self, model_output, x_start, t, noise):
        """The hybrid loss of a [M, 2C] model output (the model call already made)."""
        x_t = self.q_sample(x_start, t, noise=noise)
        C = x_t.shape[1]
        eps_out, model_var_values = torch.split(model_output, C, dim=1)
        frozen_out = torch.cat([eps_out.detach(), model_var_values], dim=1)
        vb = self._vb_terms_bpd(frozen_out, x_start, x_t, t)
        mse = _mean_flat((noise - eps_out) ** 2)
        return mse + vb, mse


# ------------------------------------------------------------------------------ tests

SCHEDULES = ["cosine", "linear"]


def _case(M0, R, C, seed):
    g = torch.Generator().manual_seed(seed)
    M = M0 * R
    x0 = torch.randn(M0, C, generator=g, dtype=torch.float64) * 1.2  # inside [-1, 1] and beyond
    x0[0, :4] = torch.tensor([0.9995, -0.9995, 1.7, -0.3], dtype=torch.float64)[:C]
    noise = torch.randn(M, C, generator=g, dtype=torch.float64)
    eps_hat = noise + 0.5 * torch.randn(M, C, generator=g, dtype=torch.float64)
    v = torch.randn(M, C, generator=g, dtype=torch.float64) * 0.7
    t = torch.randint(0, 1000, (M,), generator=g)
    fixed = torch.tensor([0, 0, 1, 2, 10, 500, 998, 999, 0, 999, 0, 0, 0])
    t[:min(M, fixed.numel())] = fixed[:M]
    return x0, noise, torch.cat([eps_hat, v], 1), t


def _iddpm_loss(name, x0, R, noise, model_output, t):
    iddpm = IDDPM(_get_named_beta_schedule(name, 1000))
    mo = model_output.detach().double().requires_grad_()
    loss, mse = iddpm.training_losses(mo, x0.repeat(R, 1), t, noise)
    return loss, mse, mo


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C", [64, 4])
@pytest.mark.parametrize("name", SCHEDULES)
def test_hybrid_loss_matches_iddpm(name, C, dtype):
    M0, R = 10, 3
    x0, noise, model_output, t = _case(M0, R, C, seed=C)
    loss, mse, mo = _iddpm_loss(name, x0, R, noise, model_output, t)
    assert (t == 0).sum() >= 6 and (t == 999).sum() >= 2
    coefs = GaussianDiffusionSchedule.named(name).loss_coefs()
    out_mo = model_output.to(dtype).requires_grad_()
    out = ddg_ops.diffusion_loss(out_mo, noise.to(dtype), t, coefs, x0.to(dtype), reduction="none")
    # The op reads fp32 schedule coefficients (and computes in fp32 for fp32 inputs).
    rtol = 1e-5 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.loss.double(), loss.detach(), atol=rtol, rtol=rtol)
    torch.testing.assert_close(out.mse.double(), mse.detach(), atol=1e-6, rtol=1e-6)
    grad_out = torch.randn(M0 * R, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(loss, mo, grad_out)
    (g,) = torch.autograd.grad(out.loss, out_mo, grad_out.to(out.loss.dtype))
    torch.testing.assert_close(g.double(), g_ref, atol=rtol * g_ref.abs().max().item(), rtol=rtol)
    mean = ddg_ops.diffusion_loss(out_mo, noise.to(dtype), t, coefs, x0.to(dtype))
    torch.testing.assert_close(mean.loss.double(), loss.detach().mean(), atol=rtol, rtol=rtol)


@pytest.mark.parametrize("name", SCHEDULES)
def test_vb_branches_by_timestep(name):
    """The decoder NLL is taken exactly at t = 0 and the KL elsewhere: the IDDPM loss changes
    with x0 only at t = 0 (the KL depends on x0 - mu_theta, which the eps parametrization fixes)."""
    x0, noise, model_output, t = _case(4, 2, 8, seed=7)
    coefs = GaussianDiffusionSchedule.named(name).loss_coefs()
    a = ddg_ops.diffusion_loss(model_output, noise, t, coefs, x0, reduction="none").loss
    b = ddg_ops.diffusion_loss(model_output, noise, t, coefs, x0 + 0.3, reduction="none").loss
    ref_a = _iddpm_loss(name, x0, 2, noise, model_output, t)[0].detach()
    ref_b = _iddpm_loss(name, x0 + 0.3, 2, noise, model_output, t)[0].detach()
    at0 = t == 0
    assert at0.any() and (~at0).any()
    torch.testing.assert_close(a[~at0], b[~at0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ref_a[~at0], ref_b[~at0], atol=1e-6, rtol=1e-6)
    assert ((a - b)[at0].abs() > 1e-3).all()
    torch.testing.assert_close(b, ref_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_tables_match_iddpm(name):
    iddpm = IDDPM(_get_named_beta_schedule(name, 1000))
    ours = GaussianDiffusionSchedule.named(name, 1000)
    for attr in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        torch.testing.assert_close(getattr(ours, attr), torch.from_numpy(getattr(iddpm, attr)), atol=1e-12,
                                   rtol=1e-10, msg=attr)
    sab, s1m = ours.noising_tables()
    assert sab.dtype == s1m.dtype == torch.float32 and sab.shape == (1000,)
    torch.testing.assert_close(sab, torch.from_numpy(iddpm.sqrt_alphas_cumprod).float(), atol=0, rtol=1e-7)
    torch.testing.assert_close(s1m, torch.from_numpy(iddpm.sqrt_one_minus_alphas_cumprod).float(), atol=0, rtol=1e-7)
    coefs = ours.loss_coefs()
    assert coefs.shape == (1000, 3) and coefs.dtype == torch.float32
    expected = np.stack([iddpm.posterior_mean_coef1 * iddpm.sqrt_recipm1_alphas_cumprod, np.log(iddpm.betas),
                         iddpm.posterior_log_variance_clipped], 1)
    torch.testing.assert_close(coefs, torch.from_numpy(expected).float(), atol=0, rtol=1e-6)
    # The first column maps eps_hat - eps to mu_q - mu_theta: check it on one step the long way.
    t = torch.tensor([0, 1, 500, 999])
    x_start, eps, eps_hat = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    x_t = iddpm.q_sample(x_start, t, eps)
    mu_q, _ = iddpm.q_posterior_mean_variance(x_start, x_t, t)
    mu_theta, _ = iddpm.p_mean_variance(torch.cat([eps_hat, torch.zeros_like(eps_hat)], 1), x_t, t)
    torch.testing.assert_close(mu_q - mu_theta, coefs[t].double()[:, :1] * (eps_hat - eps), atol=1e-9, rtol=1e-6)
    # Fixed-variance samplers: FIXED_LARGE and FIXED_SMALL.
    torch.testing.assert_close(ours.fixed_log_variance(large=True),
                               torch.from_numpy(np.log(np.append(iddpm.posterior_variance[1], iddpm.betas[1:]))))
    torch.testing.assert_close(ours.fixed_log_variance(large=False),
                               torch.from_numpy(iddpm.posterior_log_variance_clipped))


def test_cosine_betas_are_clipped_and_linear_rescaled():
    cos = GaussianDiffusionSchedule.named("cosine", 1000).betas
    assert cos.max() == 0.999 and cos[-1] == 0.999 and (cos[:-1] < 0.999).all()
    lin = GaussianDiffusionSchedule.named("linear", 100).betas  # 1000-step range, rescaled by 10
    torch.testing.assert_close(lin[[0, -1]], torch.tensor([1e-3, 0.2], dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(lin, torch.from_numpy(_get_named_beta_schedule("linear", 100)))


# Hand-computed: 1000 steps cut into sections of 334, 333, 333; strides 333/9 = 37,
# 332/14 = 23.714..., 332/19 = 17.473...; positions rounded (none falls on .5).
TEN_FIFTEEN_TWENTY = ([0, 37, 74, 111, 148, 185, 222, 259, 296, 333]
                      + [334, 358, 381, 405, 429, 453, 476, 500, 524, 547, 571, 595, 619, 642, 666]
                      + [667, 684, 702, 719, 737, 754, 772, 789, 807, 824, 842, 859, 877, 894, 912, 929, 947,
                         964, 982, 999])


@pytest.mark.parametrize("num,spacing,expected", [
    (1000, "10,15,20", TEN_FIFTEEN_TWENTY),
    # 100 of 1000: stride 999/99 = 111/11, position k -> round(111 k / 11) (k/11 never ends in .5).
    (1000, "100", [round(Fraction(111 * k, 11)) for k in range(100)]),
    (1000, 100, [0, 10, 20, 30, 40, 50, 61, 71, 81, 91] + [round(Fraction(111 * k, 11)) for k in range(10, 100)]),
    (6, "5", [0, 1, 2, 4, 5]),  # stride 1.25: position 2.5 rounds half to even, as Python's round
    (10, "1", [0]),
    (10, "10", list(range(10))),
    (10, "2,3", [0, 4, 5, 7, 9]),
    (7, [2, 1, 1], [0, 2, 3, 5]),  # sections 3, 2, 2
])
def test_space_timesteps_hand_computed(num, spacing, expected):
    assert space_timesteps(num, spacing) == expected
    assert sorted(_iddpm_space_timesteps(num, spacing if not isinstance(spacing, int) else [spacing])) == expected


@pytest.mark.parametrize("spacing", ["100", "64", "250", "10,15,20", "1,2,3,4", "1000"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_respace_matches_spaced_diffusion(name, spacing):
    betas = _get_named_beta_schedule(name, 1000)
    kept = _iddpm_space_timesteps(1000, spacing)
    new_betas, timestep_map = _spaced_betas(betas, kept)
    respaced = GaussianDiffusionSchedule.named(name, 1000).respace(spacing)
    assert respaced.num_timesteps == len(kept) and respaced.timestep_map.tolist() == timestep_map
    torch.testing.assert_close(respaced.betas, torch.from_numpy(new_betas), atol=1e-15, rtol=1e-12)
    # The sub-schedule keeps the base alpha_bar at the kept steps; its tables are IDDPM's on the new betas.
    base = IDDPM(betas)
    torch.testing.assert_close(respaced.alphas_cumprod, torch.from_numpy(base.alphas_cumprod[timestep_map]),
                               atol=1e-15, rtol=1e-11)
    spaced = IDDPM(new_betas)
    torch.testing.assert_close(respaced.posterior_log_variance_clipped,
                               torch.from_numpy(spaced.posterior_log_variance_clipped), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("spacing", ["20", "100", "10,15,20"])
def test_respace_skip_last_timestep_is_the_kept_steps_below_t_minus_1(spacing):
    """The chain without t = T-1 is IDDPM's respacing on the remaining kept steps (betas re-derived from
    their alpha_bar, the first one from alpha_bar = 1)."""
    base = GaussianDiffusionSchedule.named("cosine", 1000)
    full, skipped = base.respace(spacing), base.respace(spacing, skip_last_timestep=True)
    assert int(full.timestep_map[-1]) == 999 and skipped.num_timesteps == full.num_timesteps - 1
    assert torch.equal(skipped.timestep_map, full.timestep_map[:-1])
    torch.testing.assert_close(skipped.alphas_cumprod, full.alphas_cumprod[:-1], atol=1e-15, rtol=1e-12)
    kept = [t for t in space_timesteps(1000, spacing) if t < 999]
    new_betas, _ = _spaced_betas(_get_named_beta_schedule("cosine", 1000), kept)
    torch.testing.assert_close(skipped.betas, torch.from_numpy(new_betas), atol=1e-15, rtol=1e-12)


def test_respace_skip_last_timestep_needs_two_steps_left():
    with pytest.raises(ValueError, match="skip_last_timestep needs spacing 2 to keep at least 2"):
        GaussianDiffusionSchedule.named("cosine", 1000).respace(2, skip_last_timestep=True)


def test_space_timesteps_rejects_too_many_steps():
    with pytest.raises(ValueError, match="cannot take 11 steps from a section of 10"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="cannot take 6 steps from a section of 5"):
        space_timesteps(10, "6,5")
