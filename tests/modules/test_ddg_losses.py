"""DDG's losses (Stage I image-text alignment, Stage II guided denoising) against hand computations."""
import math

import pytest
import torch

from ddg_losses import GuidedDenoisingLoss, ImageTextAlignmentLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_alignment_loss_hand_values():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    image = torch.tensor([[1.0, 1.0], [0.0, 5.0]])       # cosines: 1/sqrt(2), 1
    text = torch.tensor([[-3.0, 0.0], [4.0, 3.0]])        # cosines: -1, 3/5
    cos_img = (1 / math.sqrt(2) + 1.0) / 2
    cos_txt = (-1.0 + 0.6) / 2
    for lmd in (0.0, 0.25, 0.5, 1.0):
        expected = lmd * -cos_img + (1 - lmd) * -cos_txt
        assert ImageTextAlignmentLoss(lmd)(z, image, text).item() == pytest.approx(expected, abs=1e-6)
    assert ImageTextAlignmentLoss(0.0)(z, None, text).item() == pytest.approx(-cos_txt, abs=1e-6)


def test_alignment_loss_gradient_and_errors():
    z = torch.randn(4, 3, requires_grad=True)
    ImageTextAlignmentLoss(0.5)(z, torch.randn(4, 3), torch.randn(4, 3)).backward()
    assert z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ImageTextAlignmentLoss: 'lmd'"):
        ImageTextAlignmentLoss(1.5)
    with pytest.raises(ValueError, match="ImageTextAlignmentLoss: 'image_embeddings'"):
        ImageTextAlignmentLoss(0.5)(z, None, torch.randn(4, 3))
    with pytest.raises(ValueError, match="ImageTextAlignmentLoss: 'text_embeddings'"):
        ImageTextAlignmentLoss(0.5)(z, torch.randn(4, 3), torch.randn(4, 2))


class LinearTeacher:
    """A stand-in with the StableDiffusionTeacher interface whose 'UNet' is eps = A z_t + mean_L(context) * t/1000:
    the loss is then computable by hand."""

    def __init__(self):
        self.alphas = torch.linspace(0.99, 0.01, 1000)
        self.a = torch.tensor(0.7)

    def encode_images(self, x):
        return x.mean(1, keepdim=True) * 0.5

    def sample_training_inputs(self, z0, generator=None):
        t = torch.randint(0, 1000, (z0.shape[0],), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        abar = self.alphas[t].view(-1, 1, 1, 1)
        return abar.sqrt() * z0 + (1 - abar).sqrt() * noise, t, noise, noise

    def _unet(self, z_t, t, c):
        return self.a * z_t + c.mean(dim=(1, 2)).view(-1, 1, 1, 1) * (t.view(-1, 1, 1, 1) / 1000)

    def guided_noise_prediction(self, z_t, t, context, negative, w, rescale=0.0):
        cond = self._unet(z_t, t, context)
        if w == 1.0:
            return cond
        return self._unet(z_t, t, negative.expand(len(z_t), -1, -1)) * (1 - w) + w * cond


@pytest.mark.parametrize("w", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 3])
def test_diffusion_loss_hand_value(w, k):
    teacher = LinearTeacher()
    x = torch.randn(2, 3, 4, 4)
    context = torch.randn(2, 5, 6, requires_grad=True)
    negative = torch.randn(2, 5, 6)
    loss = GuidedDenoisingLoss(w, timesteps_per_image=k)(teacher, x, context, negative,
                                                                torch.Generator().manual_seed(0))
    # by hand: same draws, K copies per image, eps_hat = eps_n + w (eps_c - eps_n)
    g = torch.Generator().manual_seed(0)
    z0 = (x.mean(1, keepdim=True) * 0.5).repeat_interleave(k, 0)
    t = torch.randint(0, 1000, (2 * k,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    abar = teacher.alphas[t].view(-1, 1, 1, 1)
    z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    scale = (t.view(-1, 1, 1, 1) / 1000)
    eps_c = 0.7 * z_t + context.detach().mean(dim=(1, 2)).repeat_interleave(k).view(-1, 1, 1, 1) * scale
    eps_n = 0.7 * z_t + negative.mean(dim=(1, 2)).repeat_interleave(k).view(-1, 1, 1, 1) * scale
    pred = eps_c if w == 1.0 else eps_n + w * (eps_c - eps_n)
    assert loss.item() == pytest.approx(((pred - noise) ** 2).mean().item(), rel=1e-5)
    loss.backward()
    assert context.grad.abs().sum() > 0


def test_diffusion_loss_errors():
    with pytest.raises(ValueError, match="GuidedDenoisingLoss: 'guidance_scale'"):
        GuidedDenoisingLoss(-1.0)
    with pytest.raises(ValueError, match="GuidedDenoisingLoss: 'timesteps_per_image'"):
        GuidedDenoisingLoss(timesteps_per_image=0)
    with pytest.raises(ValueError, match="GuidedDenoisingLoss: 3 images but 2 contexts"):
        GuidedDenoisingLoss()(LinearTeacher(), torch.randn(3, 3, 4, 4), torch.randn(2, 5, 6))
