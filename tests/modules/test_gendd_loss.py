"""GenDDLoss against an independent, per-row computation of GenDD's training step (MAR DiffLoss
on the repeated rows, IDDPM's hybrid loss written from its definition), plus the semantics of
contraction, mixup and CFG dropout, gradient flow and input checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ddg_losses.gendd
import ddg_ops
from ddg_losses import GenDDLoss
from ddg_models import SimpleMLPAdaLN, SplitTokenDiffusionHead, convert_simple_mlp_adaln_state_dict

C, N, W, D_S, T, K = 4, 3, 16, 6, 20, 5  # token size, tokens, width, student dim, timesteps, classes
D_T = N * C


pytestmark = pytest.mark.usefixtures("one_thread")


def random_simple(learn_sigma=True, dtype=torch.float64, seed=0) -> SimpleMLPAdaLN:
    simple = SimpleMLPAdaLN(C, W, 2 * C if learn_sigma else C, D_S, 2, N, 16).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in simple.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    return simple


def make_loss(learn_sigma=True, dtype=torch.float64, prototypes=True, **kwargs):
    simple = random_simple(learn_sigma, dtype)
    head = SplitTokenDiffusionHead.from_simple_mlp_adaln(simple, num_timesteps=T)
    g = torch.Generator().manual_seed(3)
    protos = torch.randn(K, D_T, generator=g).to(dtype) if prototypes else None
    loss = GenDDLoss(head, prototypes=protos, **{"batch_mul": 4, **kwargs}).to(dtype)
    with torch.no_grad():  # a non-trivial cls_projector
        loss.cond_norm.weight.copy_(torch.rand(D_S, generator=g) + 0.5)
        loss.cond_norm.bias.copy_(torch.randn(D_S, generator=g))
    return loss, simple


def batch(B=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(B, D_S, generator=g, dtype=dtype) * 2 + 0.5
    f_t = torch.randn(B, D_T, generator=g, dtype=dtype).relu()  # post-ReLU pooled teacher features
    hard = torch.randint(0, K, (B,), generator=g)
    soft = torch.softmax(torch.randn(B, K, generator=g, dtype=dtype), 1)
    return f_s, f_t, hard, soft


def seed_with_t0(loss, B):
    """A seed whose draws include t = 0 rows (the decoder-NLL branch of the hybrid loss)."""
    for seed in range(100):
        if (loss.draw(B, torch.device("cpu"), torch.Generator().manual_seed(seed)).timesteps == 0).any():
            return seed
    raise AssertionError("no seed with t = 0")


# ---------------------------------------------------------------------------------- the manual reference

def approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """IDDPM's decoder likelihood of data in [-1, 1] with 256 bins."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def manual_loss(loss, simple, f_s, f_t, labels, draws):
    """GenDD's DiffModel.forward_train_stage2 + DiffLoss, row by row, with the given random draws."""
    B, R, lam = f_s.shape[0], loss.batch_mul, loss.contraction
    ln = loss.cond_norm
    z = (f_s - f_s.mean(1, keepdim=True)) / torch.sqrt(f_s.var(1, unbiased=False, keepdim=True) + ln.eps)
    z = z * ln.weight + ln.bias
    target = f_t
    if labels is not None:
        mu = loss.prototypes[labels] if labels.ndim == 1 else labels @ loss.prototypes
        target = f_t * (1 - lam) + mu * lam
    if draws.permutation is not None:
        m, perm = draws.mix, draws.permutation
        z = z * m + (1 - m) * z[perm]
        target = target * m + (1 - m) * target[perm]
    x0 = target.reshape(B * N, C).repeat(R, 1)
    z_rows = z.unsqueeze(1).repeat(1, N, 1).reshape(B * N, -1).repeat(R, 1) * draws.keep[:, None]
    chunk = torch.arange(N).repeat(B).repeat(R)
    t, eps = draws.timesteps, draws.noise
    s = ddg_ops.GaussianDiffusionSchedule.named("cosine", T)

    def at(table):
        return table.to(f_s.dtype)[t][:, None]

    x_t = at(s.sqrt_alphas_cumprod) * x0 + at(s.sqrt_one_minus_alphas_cumprod) * eps
    out = simple(x_t, t, z_rows, chunk)
    eps_hat = out[:, :C]
    mse = ((eps - eps_hat) ** 2).mean(1)
    if out.shape[1] == C:
        return mse.mean(), mse.mean()
    frac = (out[:, C:] + 1) / 2
    log_var_q = at(s.posterior_log_variance_clipped)
    log_var_p = frac * at(s.betas.log()) + (1 - frac) * log_var_q
    mean_q = at(s.posterior_mean_coef1) * x0 + at(s.posterior_mean_coef2) * x_t
    pred_x0 = at(s.sqrt_recip_alphas_cumprod) * x_t - at(s.sqrt_recipm1_alphas_cumprod) * eps_hat.detach()
    mean_p = at(s.posterior_mean_coef1) * pred_x0 + at(s.posterior_mean_coef2) * x_t
    kl = 0.5 * (-1.0 + log_var_p - log_var_q + torch.exp(log_var_q - log_var_p)
                + (mean_q - mean_p) ** 2 * torch.exp(-log_var_p))
    nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * log_var_p)
    vb = torch.where(t[:, None] == 0, nll, kl).mean(1) / math.log(2.0)
    return (mse + vb).mean(), mse.mean()


# ---------------------------------------------------------------------------------- equality with the reference

@pytest.mark.parametrize("learn_sigma,labels,mix_beta", [(True, "hard", 1.0), (True, "soft", 0.0),
                                                         (False, "hard", 0.5), (True, None, 1.0)])
def test_loss_and_gradients_equal_manual_computation(learn_sigma, labels, mix_beta):
    loss, simple = make_loss(learn_sigma, mix_beta=mix_beta)
    f_s, f_t, hard, soft = batch()
    y = {"hard": hard, "soft": soft, None: None}[labels]
    seed = seed_with_t0(loss, f_s.shape[0])
    draws = loss.draw(f_s.shape[0], f_s.device, torch.Generator().manual_seed(seed))

    f_s_a = f_s.clone().requires_grad_()
    out = loss(f_s_a, f_t, y, generator=torch.Generator().manual_seed(seed))
    f_s_b = f_s.clone().requires_grad_()
    expected, expected_mse = manual_loss(loss, simple, f_s_b, f_t, y, draws)
    # The module's schedule tables are float32 (as the ops take them); the reference uses float64.
    tol = dict(atol=1e-6 * max(1.0, expected.abs().item()), rtol=1e-6)
    torch.testing.assert_close(out.loss, expected, **tol)
    torch.testing.assert_close(out.mse, expected_mse.detach(), **tol)
    torch.testing.assert_close(out.vb, (expected - expected_mse).detach(), **tol)
    assert out.mix.item() == draws.mix and (mix_beta > 0) == (draws.mix != 1.0)
    assert not out.mse.requires_grad and not out.vb.requires_grad
    if not learn_sigma:
        assert out.vb.item() == 0.0

    head_params = dict(loss.head.named_parameters())
    got = torch.autograd.grad(out.loss, [f_s_a, loss.cond_norm.weight, loss.cond_norm.bias, *head_params.values()])
    simple_params = dict(simple.named_parameters())
    want = torch.autograd.grad(expected, [f_s_b, loss.cond_norm.weight, loss.cond_norm.bias,
                                          *simple_params.values()])
    for name, g, w in zip(["f_S", "cond_norm.weight", "cond_norm.bias"], got, want):
        torch.testing.assert_close(g, w, atol=1e-6 * w.abs().max().item(), rtol=1e-5, msg=name)
    mapped = convert_simple_mlp_adaln_state_dict(dict(zip(simple_params, want[3:])))
    for (name, g) in zip(head_params, got[3:]):
        torch.testing.assert_close(g, mapped[name], atol=1e-6 * mapped[name].abs().max().item(), rtol=1e-5,
                                   msg=name)


def test_fp32_loss_is_close_to_fp64():
    loss64, _ = make_loss()
    loss32, _ = make_loss(dtype=torch.float32)
    f_s, f_t, hard, _ = batch()
    a = loss64(f_s, f_t, hard, generator=torch.Generator().manual_seed(0)).loss
    b = loss32(f_s.float(), f_t.float(), hard, generator=torch.Generator().manual_seed(0)).loss
    assert b.dtype == torch.float32
    torch.testing.assert_close(b.double(), a, atol=1e-4 * a.abs().item(), rtol=1e-4)


def test_draws_follow_the_documented_order():
    loss, _ = make_loss(cond_drop_prob=0.3)
    B, M = 4, 4 * N * 4
    draws = loss.draw(B, torch.device("cpu"), torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(B, generator=g)
    seed = int(torch.randint(0, 2 ** 63 - 1, (1,), generator=g))
    m = np.random.default_rng(seed).beta(1.0, 1.0)
    keep = (torch.rand(M, generator=g) >= 0.3).double()
    t = torch.randint(0, T, (M,), generator=g)
    noise = torch.randn(M, C, generator=g).double()
    assert torch.equal(draws.permutation, perm) and draws.mix == m
    assert torch.equal(draws.keep, keep) and torch.equal(draws.timesteps, t) and torch.equal(draws.noise, noise)
    np.random.seed(11)  # without a generator: numpy's global RNG, as GenDD
    first = loss.draw(B, torch.device("cpu")).mix
    np.random.seed(11)
    assert loss.draw(B, torch.device("cpu")).mix == first


def test_loss_is_reproducible_under_a_seed():
    loss, _ = make_loss()
    f_s, f_t, hard, _ = batch()
    a, b, c = (loss(f_s, f_t, hard, generator=torch.Generator().manual_seed(s)).loss for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------- semantics

@pytest.fixture
def captured(monkeypatch):
    """What GenDDLoss hands to split_token_prepare and to the head."""
    seen = {}
    prepare = ddg_losses.gendd.split_token_prepare

    def spy(*args, **kwargs):
        seen["x_t"], seen["x0"] = prepare(*args, **kwargs)
        return seen["x_t"], seen["x0"]

    monkeypatch.setattr(ddg_losses.gendd, "split_token_prepare", spy)
    return seen


def run(loss, captured, f_s, f_t, labels, seed=0):
    calls = {}
    handle = loss.head.register_forward_pre_hook(lambda m, args: calls.update(cond=args[2], keep=args[5]))
    out = loss(f_s, f_t, labels, generator=torch.Generator().manual_seed(seed))
    handle.remove()
    draws = loss.draw(f_s.shape[0], f_s.device, torch.Generator().manual_seed(seed))
    return out, draws, calls["cond"], calls["keep"], captured["x0"]


@pytest.mark.parametrize("labels", ["hard", "soft", None])
def test_contraction_toward_class_prototypes(captured, labels):
    loss, _ = make_loss(mix_beta=0.0, contraction=0.7)
    f_s, f_t, hard, soft = batch()
    y = {"hard": hard, "soft": soft, None: None}[labels]
    _, _, _, _, x0 = run(loss, captured, f_s, f_t, y)
    W_cls = loss.prototypes
    mu = {"hard": W_cls[hard], "soft": soft @ W_cls, None: None}[labels]
    expected = f_t if mu is None else 0.3 * f_t + 0.7 * mu
    torch.testing.assert_close(x0, expected.reshape(-1, C))  # token k of sample b = dims [kC, kC + C)


def test_no_contraction_without_prototypes(captured):
    loss, _ = make_loss(prototypes=False, mix_beta=0.0)
    f_s, f_t, hard, _ = batch()
    _, _, _, _, x0 = run(loss, captured, f_s, f_t, hard)
    torch.testing.assert_close(x0, f_t.reshape(-1, C))


def test_mixup_mixes_condition_and_target_with_one_coefficient(captured):
    loss, _ = make_loss(contraction=0.0)
    f_s, f_t, _, _ = batch(B=6)
    out, draws, cond, _, x0 = run(loss, captured, f_s, f_t, None, seed=4)
    m, perm = out.mix.item(), draws.permutation
    assert 0 < m < 1 and not torch.equal(perm, torch.arange(6))
    z = loss.cond_norm(f_s)
    torch.testing.assert_close(cond, m * z + (1 - m) * z[perm])
    torch.testing.assert_close(x0, (m * f_t + (1 - m) * f_t[perm]).reshape(-1, C))


def test_mixup_off_with_beta_zero(captured):
    loss, _ = make_loss(contraction=0.0, mix_beta=0.0)
    f_s, f_t, _, _ = batch()
    out, draws, cond, _, x0 = run(loss, captured, f_s, f_t, None)
    assert out.mix.item() == 1.0 and draws.permutation is None
    torch.testing.assert_close(cond, loss.cond_norm(f_s))
    torch.testing.assert_close(x0, f_t.reshape(-1, C))


def test_mixup_coefficient_is_beta_distributed():
    loss, _ = make_loss(mix_beta=0.5, batch_mul=1)
    g = torch.Generator().manual_seed(0)
    m = np.array([loss.draw(2, torch.device("cpu"), g).mix for _ in range(2000)])
    assert ((m >= 0) & (m <= 1)).all()
    # Beta(0.5, 0.5): mean 1/2, variance 1/8 (a uniform m would give 1/12).
    assert abs(m.mean() - 0.5) < 0.03 and abs(m.var() - 0.125) < 0.01


@pytest.mark.parametrize("prob", [0.2, 0.0, 1.0])
def test_cfg_dropout_fraction(captured, prob):
    loss, _ = make_loss(cond_drop_prob=prob, batch_mul=30)
    f_s, f_t, _, _ = batch(B=100)
    _, draws, _, keep, _ = run(loss, captured, f_s, f_t, None)
    assert torch.equal(keep, draws.keep)  # the head gets the drawn mask
    dropped = 1 - keep.mean().item()  # M = 9000 rows: std of the fraction 0.004 at p = 0.2
    assert abs(dropped - prob) < 0.02
    assert set(keep.unique().tolist()) <= {0.0, 1.0}


def test_gradients_reach_student_cond_norm_and_head_only():
    loss, _ = make_loss()
    f_s, f_t, hard, _ = batch()
    f_s.requires_grad_()
    f_t.requires_grad_()  # a teacher feature that still carries a graph is treated as a constant
    loss(f_s, f_t, hard, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    assert not loss.prototypes.requires_grad and "prototypes" not in dict(loss.named_parameters())
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_holds_head_norm_and_prototypes_not_schedule_tables():
    loss, _ = make_loss()
    keys = set(loss.state_dict())
    assert {"prototypes", "cond_norm.weight", "cond_norm.bias", "head.adaln.weight"} <= keys
    assert not any(k in keys for k in ("sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", "loss_coefs"))


def test_sample_uses_cond_norm_and_the_head_sampler():
    loss, _ = make_loss()
    f_s = batch()[0]
    got = loss.sample(f_s, num_samples=3, cfg_scale=2.0, num_steps=5, generator=torch.Generator().manual_seed(0))
    expected = loss.head.sample(loss.cond_norm(f_s), num_samples=3, cfg_scale=2.0, num_steps=5,
                                generator=torch.Generator().manual_seed(0))
    assert got.shape == (4, D_T) and not got.requires_grad
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------- bad inputs

def test_rejects_bad_construction():
    head = SplitTokenDiffusionHead(num_tokens=N, cond_dim=D_S, token_size=C, width=W, depth=1, num_timesteps=T)
    with pytest.raises(TypeError, match="GenDDLoss: 'head' must be a ddg_models.SplitTokenDiffusionHead, got Linear"):
        GenDDLoss(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"GenDDLoss: 'prototypes' must be a float \[K, 12\] tensor.*\(5, 10\)"):
        GenDDLoss(head, prototypes=torch.randn(5, 10))
    with pytest.raises(ValueError, match=r"GenDDLoss: 'contraction' must be in \[0.0, 1.0\], got 1.5"):
        GenDDLoss(head, contraction=1.5)
    with pytest.raises(ValueError, match="GenDDLoss: 'mix_beta' must be in"):
        GenDDLoss(head, mix_beta=-1.0)
    with pytest.raises(ValueError, match="GenDDLoss: 'cond_drop_prob' must be in"):
        GenDDLoss(head, cond_drop_prob=1.2)
    with pytest.raises(ValueError, match="GenDDLoss: 'batch_mul' must be a positive int, got 0"):
        GenDDLoss(head, batch_mul=0)


def test_rejects_bad_inputs():
    loss, _ = make_loss()
    f_s, f_t, hard, soft = batch()
    with pytest.raises(ValueError, match=r"GenDDLoss.forward: 'student_features' must be a float \[B, 6\] tensor"):
        loss(f_s[:, :5], f_t)
    with pytest.raises(ValueError, match=r"'teacher_features' must be a float \[4, 12\] tensor.*\(3, 12\)"):
        loss(f_s, f_t[:3])
    with pytest.raises(ValueError, match=r"'labels' must be int64 \[4\] class ids or float \[4, 5\] soft labels, "
                                         r"got torch.int32"):
        loss(f_s, f_t, hard.int())
    with pytest.raises(ValueError, match=r"'labels' must be int64 \[4\] class ids or float \[4, 5\].*\(4, 3\)"):
        loss(f_s, f_t, soft[:, :3])
    with pytest.raises(ValueError, match=r"'labels' must be class ids in \[0, 5\), got values in \[0, 7\]"):
        loss(f_s, f_t, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="GenDDLoss.sample: 'student_features' must be a float"):
        loss.sample(f_t)
