"""FewStepGenerator (shifted sigmas, Euler rollout, gradient flow: none into step 0 from the DMD term) and
CFGTeacher (one batched [uncond; cond] call, the anchor rollout = diffusers' CFG Euler sampling) on plain
modules, a tiny SD3Transformer2DModel and a tiny UNet2DConditionModel."""
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from ddg_losses import AnchorLoss  # noqa: E402
from ddg_models import CFGSampler, CFGTeacher, FewStepGenerator, model_prediction, shifted_flow_sigmas  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """A velocity model forward(x, timestep, label) that keeps its outputs (with retained grads)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.outputs, self.timesteps = [], []

    def forward(self, x, timestep, label):
        v = self.net(torch.cat([x, timestep[:, None] / 1000], 1)) * (1 + label[:, None])
        if v.requires_grad:
            v.retain_grad()
        self.outputs.append(v)
        self.timesteps.append(timestep)
        return v


def test_shifted_sigmas_match_the_spec_grids():
    torch.testing.assert_close(shifted_flow_sigmas(4), torch.tensor([1.0, 0.8577, 0.6022, 0.0089, 0.0]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(shifted_flow_sigmas(30)[[1, 5, 10, 15]], torch.tensor([0.988, 0.935, 0.851, 0.738]),
                               atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="shifted_flow_sigmas: 'num_steps' must be a positive int"):
        shifted_flow_sigmas(0)


def test_rollout_is_four_euler_steps_on_the_shifted_grid():
    model = Recorder()
    gen = FewStepGenerator(model)
    x1, label = torch.randn(5, 2), torch.ones(5)
    out = gen(x1, {"label": label})
    sig = shifted_flow_sigmas(4).tolist()
    x = x1
    for i in range(4):
        x = x + (sig[i + 1] - sig[i]) * model.net(torch.cat([x, torch.full((5, 1), sig[i])], 1)) * 2
    torch.testing.assert_close(out.sample, x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack([t[0] for t in model.timesteps]), 1000 * torch.tensor(sig[:4]))
    assert out.first_velocity is model.outputs[0]


@pytest.mark.parametrize("detach", [True, False])
def test_dmd_gradient_does_not_reach_step_zero_when_detached(detach):
    model = Recorder()
    out = FewStepGenerator(model, detach_first_step=detach)(torch.randn(5, 2), {"label": torch.zeros(5)})
    out.sample.square().sum().backward()  # any loss on the output, e.g. the DMD surrogate
    grads = [v.grad for v in model.outputs]
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1:])
    assert (grads[0] is None) == detach
    if not detach:
        assert grads[0].abs().sum() > 0


def test_anchor_loss_trains_step_zero_and_dmd_the_rest():
    model = Recorder()
    x1 = torch.randn(5, 2)
    out = FewStepGenerator(model)(x1, {"label": torch.zeros(5)})
    AnchorLoss(0.05)(out.first_velocity, x1, torch.zeros(5, 2), 0.5).backward()
    assert model.outputs[0].grad is not None and all(v.grad is None for v in model.outputs[1:])


def test_generator_checks_inputs():
    gen = FewStepGenerator(Recorder())
    with pytest.raises(ValueError, match="FewStepGenerator: 'noise' must be a floating"):
        gen(torch.zeros(5, 2, dtype=torch.long), {"label": torch.zeros(5)})
    with pytest.raises(TypeError, match="model_prediction: 'cond' must be a mapping"):
        gen(torch.zeros(5, 2), torch.zeros(5))


class TwoHeads(nn.Module):
    """v = a(x) for the null label 0, b(x) otherwise: CFG must mix exactly these."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x, timestep, label):
        s = (timestep / 1000)[:, None]
        return torch.where(label[:, None] > 0, self.b(x) * (1 + s), self.a(x) * (1 - s))


def test_teacher_is_frozen_and_guides_with_one_batched_call():
    net = TwoHeads()
    teacher = CFGTeacher(net, 3.5).train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x, t = torch.randn(4, 2), torch.full((4,), 600.0)
    cond, uncond = {"label": torch.ones(4)}, {"label": torch.zeros(4)}
    u, c = teacher.predict_pair(x, t, cond, uncond)
    torch.testing.assert_close(u, net(x, t, uncond["label"]))
    torch.testing.assert_close(c, net(x, t, cond["label"]))
    torch.testing.assert_close(teacher(x, t, cond, uncond), u + 3.5 * (c - u))


def test_teacher_rollout_equals_diffusers_cfg_euler_sampling():
    teacher = CFGTeacher(TwoHeads(), 3.5)
    x1 = torch.randn(4, 2)
    cond, uncond = {"label": torch.ones(4)}, {"label": torch.zeros(4)}
    z, sigma = teacher.rollout(x1, cond, uncond, num_inference_steps=30, steps=30)
    sampler = CFGSampler(lambda x, t, e: teacher.model(x, t.expand(x.shape[0]), e),
                         FlowMatchEulerDiscreteScheduler(shift=3.0), 3.5)
    ref = sampler(x1, torch.ones(4), torch.zeros(4), 30)
    assert sigma == 0.0
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    z10, sigma10 = teacher.rollout(x1, cond, uncond, 30, 10)
    assert abs(sigma10 - 0.8513) < 1e-3
    with pytest.raises(ValueError, match="CFGTeacher.rollout: 'steps' must be an int"):
        teacher.rollout(x1, cond, uncond, 30, 31)


def test_sd3_transformer_through_generator_and_teacher():
    from diffusers import SD3Transformer2DModel

    def tiny():
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                     caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8)

    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    x1 = torch.randn(2, 4, 8, 8)
    out = FewStepGenerator(tiny())(x1, cond)
    assert out.sample.shape == x1.shape and out.sample.requires_grad
    teacher = CFGTeacher(tiny(), 3.5)
    u, c = teacher.predict_pair(x1, 1000.0, cond, uncond)
    ref = teacher.model(x1, timestep=torch.full((2,), 1000.0), return_dict=False, **cond)[0]
    torch.testing.assert_close(c, ref, rtol=1e-4, atol=1e-5)


def test_unet_epsilon_teacher_pair():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4)
    teacher = CFGTeacher(unet, 1.75, prediction="epsilon")
    x_t = torch.randn(2, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8)}
    uncond = {"encoder_hidden_states": torch.zeros(2, 3, 8)}
    u, c = teacher.predict_pair(x_t, torch.tensor([10.0, 500.0]), cond, uncond)
    torch.testing.assert_close(c, model_prediction(unet, x_t, torch.tensor([10.0, 500.0]), cond), rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(ValueError, match="CFGTeacher.rollout: the Euler rollout needs a flow-matching"):
        teacher.rollout(x_t, cond, uncond, 30, 5)
    with pytest.raises(ValueError, match="CFGTeacher: 'prediction' must be one of"):
        CFGTeacher(unet, 1.0, prediction="sample")


class EpsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 2)

    def forward(self, x, timestep, label):
        return self.net(torch.cat([x, timestep[:, None] / 1000], 1)) + label[:, None]


def test_backward_simulation_matches_dmd2_and_backpropagates_only_the_last_pass():
    from ddg_models import BackwardSimulationGenerator

    ab = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    model = EpsMLP()
    gen = BackwardSimulationGenerator(model, ab)
    x1, cond = torch.randn(4, 2), {"label": torch.zeros(4)}

    def x0(x, t):
        a = float(ab[t])
        return (x - (1 - a) ** 0.5 * model(x, torch.full((4,), float(t)), cond["label"])) / a ** 0.5

    out = gen(x1, cond, step=2, generator=torch.Generator().manual_seed(5))
    rng = torch.Generator().manual_seed(5)
    x = x1
    for t, t_next in ((999, 749), (749, 499)):  # re-noised with new noise each time
        x = float(ab[t_next]) ** 0.5 * x0(x, t).detach() + (1 - float(ab[t_next])) ** 0.5 * torch.randn(
            4, 2, generator=rng)
    torch.testing.assert_close(out.sample, x0(x, 499), rtol=1e-5, atol=1e-5)
    assert out.first_velocity is None and out.sample.requires_grad
    (g,) = torch.autograd.grad(out.sample.sum(), model.net.weight)
    assert g.abs().sum() > 0
    assert gen.sample(x1, cond).shape == x1.shape
    with pytest.raises(ValueError, match="BackwardSimulationGenerator: 'step' must be an int in"):
        gen(x1, cond, step=4)
    with pytest.raises(ValueError, match="'timesteps' must be strictly descending"):
        BackwardSimulationGenerator(model, ab, timesteps=(249, 499))
