"""FewStepGenerator (shifted sigmas, Euler rollout, gradient flow: none into step 0 from the DMD term) and DMD2's
BackwardSimulationGenerator on plain modules and a tiny SD3Transformer2DModel (the teacher's tests are in
test_guided_teacher.py)."""
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from ddg_losses import AnchorLoss  # noqa: E402
from ddg_models import FewStepGenerator, shifted_flow_sigmas  # noqa: E402

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


def test_sd3_transformer_through_the_generator():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}
    x1 = torch.randn(2, 4, 8, 8)
    out = FewStepGenerator(model)(x1, cond)
    assert out.sample.shape == x1.shape and out.sample.requires_grad


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
