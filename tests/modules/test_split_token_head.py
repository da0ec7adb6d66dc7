"""SplitTokenDiffusionHead (deduplicated, fused) against SimpleMLPAdaLN (the original per-row head):
forward, gradients, sampling, weight conversion and checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import torch

import ddg_ops
from ddg_models import (SimpleMLPAdaLN, SplitTokenDiffusionHead, convert_simple_mlp_adaln_state_dict,
                        convert_split_token_head_state_dict)
from ddg_models.simple_mlp_adaln import timestep_embedding
from ddg_models.split_token_head import simple_mlp_adaln_from_head
from tests._utils import assert_close, magnitude

C, W, D_S, FREQ, T = 4, 16, 6, 16, 50  # token size, width, condition size, sinusoid size, timesteps


pytestmark = pytest.mark.usefixtures("one_thread")


def random_simple(depth=3, num_tokens=3, learn_sigma=True, dtype=torch.float32, std=0.3, seed=0) -> SimpleMLPAdaLN:
    """An original-layout head with random non-zero weights (the zero init would hide most errors)."""
    simple = SimpleMLPAdaLN(C, W, 2 * C if learn_sigma else C, D_S, depth, num_tokens, FREQ).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in simple.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return simple


def pair(depth=3, num_tokens=3, learn_sigma=True, dtype=torch.float32, std=0.3, **config):
    simple = random_simple(depth, num_tokens, learn_sigma, dtype, std)
    head = SplitTokenDiffusionHead.from_simple_mlp_adaln(simple, num_timesteps=T, **config)
    return simple, head


def training_rows(B, N, R, dtype, seed=1):
    """Inputs of a training forward: rows tiled replica-outer, some conditions dropped, t covering 0 and T-1."""
    g = torch.Generator().manual_seed(seed)
    M = B * N * R
    sample_index, token_index = ddg_ops.split_token_rows(B, N, R)
    x = torch.randn(M, C, generator=g, dtype=dtype)
    t = torch.randint(0, T, (M,), generator=g)
    t[0], t[-1] = 0, T - 1
    cond = torch.randn(B, D_S, generator=g, dtype=dtype)
    keep = (torch.rand(M, generator=g) > 0.3).to(dtype)
    keep[1] = 0
    return x, t, cond, sample_index, token_index, keep


# ---------------------------------------------------------------------------------- forward / backward

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("num_tokens", [1, 3])
@pytest.mark.parametrize("time_path", ["gathered", "per_row"])
def test_forward_and_gradients_equal_simple_head(dtype, depth, num_tokens, time_path):
    simple, head = pair(depth, num_tokens, dtype=dtype)
    B = 4 if num_tokens == 1 else 2
    R = (T // (B * num_tokens)) + 1 if time_path == "gathered" else 3
    x, t, cond, si, ti, keep = training_rows(B, num_tokens, R, dtype)
    assert (x.shape[0] > T) == (time_path == "gathered")

    x_f, cond_f = x.clone().requires_grad_(), cond.clone().requires_grad_()
    out = head(x_f, t, cond_f, si, ti, keep)
    x_s, cond_s = x.clone().requires_grad_(), cond.clone().requires_grad_()
    expected = simple(x_s, t, cond_s[si] * keep[:, None], ti)  # CFG dropout as the original: z * (1 - drop)
    assert_close(out, expected, scale=magnitude(expected), msg="output")

    grad_out = torch.randn_like(out)
    head_params = dict(head.named_parameters())
    fused_grads = torch.autograd.grad(out, [x_f, cond_f, *head_params.values()], grad_out)
    simple_params = dict(simple.named_parameters())
    simple_grads = torch.autograd.grad(expected, [x_s, cond_s, *simple_params.values()], grad_out)
    assert_close(fused_grads[0], simple_grads[0], scale=magnitude(simple_grads[0]), msg="grad x_t")
    assert_close(fused_grads[1], simple_grads[1], scale=magnitude(simple_grads[1]), msg="grad cond")
    # Map the per-row head's parameter gradients into the fused layout (concatenated adaLN etc.).
    mapped = convert_simple_mlp_adaln_state_dict(dict(zip(simple_params, simple_grads[2:])))
    assert set(mapped) == set(head_params)
    for (name, g_fused) in zip(head_params, fused_grads[2:]):
        assert_close(g_fused, mapped[name], scale=magnitude(mapped[name]), msg=f"grad {name}")


def test_time_mlp_runs_on_distinct_timesteps_only_when_rows_exceed_them():
    _, head = pair()
    seen = []
    head.time_mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    for R, rows_seen in ((10, T), (2, 2 * 3 * 2)):  # M = 60 > T: T rows; M = 12 <= T: per row
        x, t, cond, si, ti, keep = training_rows(2, 3, R, torch.float32)
        head(x, t, cond, si, ti, keep)
        assert seen.pop() == rows_seen


def test_cond_embed_runs_per_sample_and_adaln_once(monkeypatch):
    _, head = pair(depth=3)
    rows = {}
    linear = torch.nn.functional.linear

    def recording_linear(input, weight, bias=None):
        rows.setdefault(id(weight), []).append(input.shape[0])
        return linear(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    x, t, cond, si, ti, keep = training_rows(2, 3, 4, torch.float32)
    head(x, t, cond, si, ti, keep)
    assert rows[id(head.cond_embed.weight)] == [2]  # B samples, not M rows
    assert rows[id(head.adaln.weight)] == [x.shape[0]]  # one GEMM for all 3 blocks and the final layer
    assert head.adaln.weight.shape == (11 * W, W)


def test_dropped_row_equals_zero_condition():
    _, head = pair()
    x, t, cond, si, ti, _ = training_rows(2, 3, 2, torch.float64)
    head = head.double()
    dropped = (si == 1).to(torch.float64)  # drop every row of sample 1
    zeroed = cond.clone()
    zeroed[1] = 0
    torch.testing.assert_close(head(x, t, cond, si, ti, 1 - dropped), head(x, t, zeroed, si, ti))
    torch.testing.assert_close(head(x, t, cond, si, ti, (1 - dropped).bool()), head(x, t, zeroed, si, ti))
    assert not torch.allclose(head(x, t, cond, si, ti), head(x, t, zeroed, si, ti))


def test_trunk_with_shared_condition_rows_equals_per_row_trunk():
    _, head = pair(dtype=torch.float64)
    head = head.double()
    U, M = 3, 7
    y = torch.randn(U, W, dtype=torch.float64)
    index = torch.tensor([2, 0, 0, 1, 2, 2, 1])
    hidden = torch.randn(M, W, dtype=torch.float64)
    rows = head.adaln_rows(y)
    torch.testing.assert_close(head.trunk(hidden, rows, index), head.trunk(hidden, rows[index]))


def test_initialisation_matches_the_spec():
    head = SplitTokenDiffusionHead(num_tokens=3, cond_dim=D_S, token_size=C, width=64, depth=2)
    simple = SimpleMLPAdaLN(C, 64, 2 * C, D_S, 2, 3)
    for layer in (head.adaln, head.final_linear):
        assert not layer.weight.any() and not layer.bias.any()
    for name, p in head.named_parameters():
        if name.endswith("bias") and not name.endswith("norm.bias"):
            assert not p.any(), name
    bound = math.sqrt(6 / (C + 64))
    assert head.input_proj.weight.abs().max() <= bound and head.input_proj.weight.std() > bound / 3
    for fused, original in ((head.time_mlp[0], simple.time_embed.mlp[0]), (head.time_mlp[2], simple.time_embed.mlp[2])):
        assert abs(fused.weight.std().item() - 0.02) < 0.003 and abs(original.weight.std().item() - 0.02) < 0.003
    x, t, cond, si, ti, keep = training_rows(2, 3, 2, torch.float32)
    assert not head(x, t, cond, si, ti, keep).any()  # zero output at init
    h, zero = torch.randn(5, 64), torch.zeros(5, 64)
    for block in head.blocks:  # zero modulation: every block is the identity
        torch.testing.assert_close(block(h, zero, zero, zero), h)


def test_timestep_sinusoid_is_cos_first_with_the_spec_frequencies():
    t = torch.tensor([0, 1, 7, 999])
    emb = timestep_embedding(t, 256)
    i = torch.arange(128, dtype=torch.float64)
    args = t[:, None].double() * 10000.0 ** (-i / 128)
    torch.testing.assert_close(emb.double(), torch.cat([args.cos(), args.sin()], 1), atol=2e-4, rtol=0)


# ---------------------------------------------------------------------------------- sampling

def reference_sample(simple, head, cond, num_samples, cfg_scale, temperature, num_steps, seed, fixed_variance="large",
                     skip_clipped_step=False):
    """SimpleMLPAdaLN's straightforward sampler on GenDD's rows: cond replicated sample-major (s, b, k),
    with an unconditional (z = 0) copy of every row when guided."""
    B, N = cond.shape[0], head.config.num_tokens
    z = cond[None, :, None, :].expand(num_samples, B, N, D_S).reshape(-1, D_S)
    chunk = torch.arange(N).repeat(num_samples * B)
    if cfg_scale != 1.0:
        z, chunk = torch.cat([z, torch.zeros_like(z)]), torch.cat([chunk, chunk])
    out = simple.sample(z, chunk, cfg=cfg_scale, temperature=temperature, schedule=head.sampling_schedule(num_steps, skip_clipped_step),
                        generator=torch.Generator().manual_seed(seed), fixed_variance=fixed_variance)
    return out[: num_samples * B * N].reshape(num_samples, B, N * C)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("learn_sigma,fixed_variance", [(True, "large"), (False, "large"), (False, "small")])
def test_sampling_equals_simple_sampler(cfg_scale, learn_sigma, fixed_variance):
    simple, head = pair(learn_sigma=learn_sigma, dtype=torch.float64, std=0.1, fixed_variance=fixed_variance)
    cond = torch.randn(2, D_S, dtype=torch.float64)
    got = head.sample(cond, num_samples=2, cfg_scale=cfg_scale, temperature=0.7, num_steps=10,
                      generator=torch.Generator().manual_seed(5), reduce="none")
    expected = reference_sample(simple, head, cond, 2, cfg_scale, 0.7, 10, seed=5, fixed_variance=fixed_variance)
    assert got.shape == (2, 2, 3 * C)
    torch.testing.assert_close(got, expected, atol=1e-9 * magnitude(expected), rtol=1e-9)
    mean = head.sample(cond, num_samples=2, cfg_scale=cfg_scale, temperature=0.7, num_steps=10,
                       generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(mean, expected.mean(0), atol=1e-9 * magnitude(expected), rtol=1e-9)


def test_sampling_without_the_clipped_step_is_the_shorter_chain():
    simple, head = pair(dtype=torch.float64, std=0.1)
    cond = torch.randn(2, D_S, dtype=torch.float64)
    got = head.sample(cond, num_samples=2, cfg_scale=2.0, num_steps=10, generator=torch.Generator().manual_seed(3),
                      reduce="none", skip_clipped_step=True)
    expected = reference_sample(simple, head, cond, 2, 2.0, 1.0, 10, seed=3, skip_clipped_step=True)
    torch.testing.assert_close(got, expected, atol=1e-9 * magnitude(expected), rtol=1e-9)
    as_coded = head.sample(cond, num_samples=2, cfg_scale=2.0, num_steps=10, generator=torch.Generator().manual_seed(3),
                           reduce="none")
    assert not torch.allclose(got, as_coded)


def test_sampling_fp32_and_cfg_changes_the_result():
    simple, head = pair(std=0.1)
    cond = torch.randn(3, D_S)
    got = head.sample(cond, num_samples=2, cfg_scale=2.0, num_steps="5,5", generator=torch.Generator().manual_seed(1),
                      reduce="none")
    expected = reference_sample(simple, head, cond, 2, 2.0, 1.0, "5,5", seed=1)
    torch.testing.assert_close(got, expected, atol=1e-4 * magnitude(expected), rtol=1e-4)
    unguided = head.sample(cond, num_samples=2, num_steps="5,5", generator=torch.Generator().manual_seed(1),
                           reduce="none")
    assert not torch.allclose(got, unguided)


def test_sampling_is_reproducible_under_a_seed():
    _, head = pair(std=0.1)
    cond = torch.randn(2, D_S)
    a, b, c = (head.sample(cond, num_samples=3, cfg_scale=2.0, num_steps=10,
                           generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.manual_seed(9)
    d = head.sample(cond, num_samples=3, cfg_scale=2.0, num_steps=10)
    torch.manual_seed(9)
    assert torch.equal(d, head.sample(cond, num_samples=3, cfg_scale=2.0, num_steps=10))


def test_respaced_sampling_feeds_original_timesteps_and_deduplicates():
    simple = random_simple(std=0.1)
    head = SplitTokenDiffusionHead.from_simple_mlp_adaln(simple)  # 1000 steps
    seen = {"time": [], "cond_embed": [], "adaln": [], "input_proj": []}
    original = head.time_embedding
    head.time_embedding = lambda t: seen["time"].append(t.clone()) or original(t)
    for name in ("cond_embed", "adaln", "input_proj"):
        getattr(head, name).register_forward_hook(lambda m, a, o, name=name: seen[name].append(a[0].shape[0]))
    B, S, N = 2, 3, 3
    head.sample(torch.randn(B, D_S), num_samples=S, cfg_scale=2.0, num_steps=10)
    assert len(seen["time"]) == 1  # the time MLP runs once, on one row per step
    assert seen["time"][0].tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert seen["cond_embed"] == [B]
    assert seen["adaln"] == [B * N + N] * 10  # distinct conditions: B N conditional + N unconditional
    assert seen["input_proj"] == [S * B * N] * 10  # once for both copies


def test_simple_sampler_step_is_iddpm_p_sample():
    """The oracle itself: one step of a zero-output head (eps = 0, v = 0) from known noise."""
    simple = SimpleMLPAdaLN(C, W, 2 * C, D_S, 1, 1).double()  # zero init: output 0
    schedule = ddg_ops.GaussianDiffusionSchedule.named("cosine", 1000).respace(2)
    z, chunk = torch.randn(3, D_S, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
    out = simple.sample(z, chunk, temperature=0.5, schedule=schedule, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, C, generator=g).double()  # the samplers draw fp32 noise
    noise = torch.randn(3, C, generator=g).double()
    ac = schedule.alphas_cumprod
    for i, n in ((1, noise), (0, None)):
        pred_x0 = x / ac[i].sqrt()  # eps = 0
        prev = ac[i - 1] if i else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - ac[i] / prev
        mean = beta * prev.sqrt() / (1 - ac[i]) * pred_x0 + (1 - prev) * (1 - beta).sqrt() / (1 - ac[i]) * x
        log_var = 0.5 * beta.log() + 0.5 * schedule.posterior_log_variance_clipped[i]  # v = 0: half way
        x = mean if n is None else mean + (0.5 * log_var).exp() * n * 0.5
    torch.testing.assert_close(out, x)


# ---------------------------------------------------------------------------------- conversion / checkpoints

def test_converter_round_trip_and_adaln_chunk_order():
    simple = random_simple(depth=2)
    original = simple.state_dict()
    fused = convert_simple_mlp_adaln_state_dict(original)
    back = convert_split_token_head_state_dict(fused)
    assert set(back) == set(original)
    for k in original:
        assert torch.equal(back[k], original[k]), k
    ada = fused["adaln.weight"].split(W)
    assert len(ada) == 3 * 2 + 2
    for j, (source, part) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]):
        rows = original[f"res_blocks.{source}.adaLN_modulation.1.weight"].split(W)[part]
        assert torch.equal(ada[j], rows), j  # [shift, scale, gate] of each block in order
    final_shift, final_scale = original["final_layer.adaLN_modulation.1.bias"].split(W)
    assert torch.equal(fused["adaln.bias"].split(W)[6], final_shift)
    assert torch.equal(fused["adaln.bias"].split(W)[7], final_scale)
    prefixed = convert_split_token_head_state_dict(fused, prefix="diffloss.net.")
    assert set(prefixed) == {"diffloss.net." + k for k in original}


def test_simple_head_built_from_a_fused_head_is_the_same_function():
    _, head = pair(depth=2, learn_sigma=False)
    simple = simple_mlp_adaln_from_head(head)
    assert simple.out_channels == C and len(simple.res_blocks) == 2
    x, t, cond, si, ti, keep = training_rows(2, 3, 2, torch.float32)
    expected = simple(x, t, cond[si] * keep[:, None], ti)
    assert_close(head(x, t, cond, si, ti, keep), expected, scale=magnitude(expected))


def test_load_from_a_gendd_checkpoint_with_prefix():
    simple = random_simple(learn_sigma=False)
    checkpoint = {f"diffloss.net.{k}": v for k, v in simple.state_dict().items()}
    checkpoint.update({"model.fc.weight": torch.zeros(3, 3), "cls_projector.0.weight": torch.ones(D_S)})
    head = SplitTokenDiffusionHead.from_simple_mlp_adaln(checkpoint, prefix="diffloss.net.", num_timesteps=T)
    cfg = head.config
    assert (cfg.num_tokens, cfg.cond_dim, cfg.token_size, cfg.width, cfg.depth, cfg.learn_sigma,
            cfg.frequency_embedding_size) == (3, D_S, C, W, 3, False, FREQ)
    x, t, cond, si, ti, keep = training_rows(2, 3, 2, torch.float32)
    expected = simple(x, t, cond[si] * keep[:, None], ti)
    assert_close(head(x, t, cond, si, ti, keep), expected, scale=magnitude(expected))


def test_converter_rejects_mismatching_weights():
    sd = random_simple().state_dict()
    with pytest.raises(ValueError, match="no key starts with prefix 'diffloss.net.'"):
        convert_simple_mlp_adaln_state_dict(sd, prefix="diffloss.net.")
    with pytest.raises(ValueError, match=r"missing \['cond_embed.bias'\]"):
        convert_simple_mlp_adaln_state_dict({k: v for k, v in sd.items() if k != "cond_embed.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        convert_simple_mlp_adaln_state_dict({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="disagrees with the weights' shapes.*'width': \\(32, 16\\)"):
        SplitTokenDiffusionHead.from_simple_mlp_adaln(sd, width=32)


def test_save_and_from_pretrained_round_trip(tmp_path):
    _, head = pair(dtype=torch.float64, learn_sigma=False, fixed_variance="small", noise_schedule="linear")
    head.save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["_class_name"] == "SplitTokenDiffusionHead" and config["noise_schedule"] == "linear"
    loaded = SplitTokenDiffusionHead.from_pretrained(tmp_path / "head")
    assert loaded.config == head.config and loaded.dtype == torch.float64
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.testing.assert_close(loaded.schedule.betas, head.schedule.betas)
    cond = torch.randn(2, D_S, dtype=torch.float64)
    a, b = (h.sample(cond, num_steps=5, generator=torch.Generator().manual_seed(0)) for h in (head, loaded))
    assert torch.equal(a, b)
    assert SplitTokenDiffusionHead.from_pretrained(tmp_path / "head", dtype=torch.float32).dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SplitTokenDiffusionHead.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------------------------- bad inputs

def test_rejects_bad_config_and_inputs():
    with pytest.raises(ValueError, match="SplitTokenDiffusionHead: 'depth' must be a positive int, got 0"):
        SplitTokenDiffusionHead(num_tokens=2, cond_dim=4, depth=0)
    with pytest.raises(ValueError, match="'noise_schedule' must be one of"):
        SplitTokenDiffusionHead(num_tokens=2, cond_dim=4, noise_schedule="sigmoid")
    with pytest.raises(ValueError, match="'fixed_variance' must be one of"):
        SplitTokenDiffusionHead(num_tokens=2, cond_dim=4, fixed_variance="medium")
    _, head = pair()
    x, t, cond, si, ti, keep = training_rows(2, 3, 2, torch.float32)
    with pytest.raises(ValueError, match=r"forward: 'x_t' must be a float \[M, 4\] tensor, got torch.float32 \(12, 5"):
        head(torch.randn(12, 5), t, cond, si, ti)
    with pytest.raises(ValueError, match=r"'timesteps' must be an int64 tensor of shape \[12\].*torch.int32"):
        head(x, t.int(), cond, si, ti)
    with pytest.raises(ValueError, match=r"'cond' must be a float \[B, 6\] tensor"):
        head(x, t, cond[:, :3], si, ti)
    with pytest.raises(ValueError, match=r"'keep' must be a float or bool tensor of shape \[12\]"):
        head(x, t, cond, si, ti, keep[:5])
    T = head.config.num_timesteps
    for bad_t in (T, -1):
        with pytest.raises(ValueError, match=rf"'timesteps' must lie in \[0, {T}\), got values in"):
            head(x, torch.full_like(t, bad_t), cond, si, ti)
    with pytest.raises(ValueError, match=r"'sample_index' must lie in \[0, 2\), got values in \[-1, "):
        head(x, t, cond, torch.where(si == 0, -1, si), ti)
    with pytest.raises(ValueError, match=r"'token_index' must lie in \[0, 3\)"):
        head(x, t, cond, si, ti + 1)
    with pytest.raises(ValueError, match=r"trunk: 'adaln_rows' must be \[U, 176\]"):
        head.trunk(torch.randn(3, W), torch.randn(3, W))
    with pytest.raises(ValueError, match="sample: 'num_samples' must be a positive int, got 0"):
        head.sample(cond, num_samples=0)
    with pytest.raises(ValueError, match="sample: 'reduce' must be 'mean' or 'none', got 'sum'"):
        head.sample(cond, reduce="sum")
    with pytest.raises(ValueError, match=r"sample: 'cond' must be a float \[B, 6\] tensor"):
        head.sample(cond[0])
