"""set_attention_backend: 'sdpa' brings every xformers attention layer back to the SDPA processor of its kind
(the output equal to the untouched model's), 'xformers' says which package is missing; bad arguments."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from ddg_models import ATTENTION_BACKENDS, set_attention_backend

diffusers = pytest.importorskip("diffusers")
from diffusers.models import attention_processor as ap  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=4).eval()


def unet_out(unet):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return unet(torch.randn(2, 4, 7, 9, generator=g), torch.tensor([3.0, 700.0]),
                    encoder_hidden_states=torch.randn(2, 5, 8, generator=g)).sample


def sd3_out(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(hidden_states=torch.randn(2, 4, 4, 4, generator=g),
                     encoder_hidden_states=torch.randn(2, 3, 16, generator=g),
                     pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([10.0, 900.0])).sample


def processor_kinds(model):
    return {type(p) for p in model.attn_processors.values()}


def test_sdpa_restores_unet_attention_after_xformers():
    unet = tiny_unet()
    expected = unet_out(unet)
    assert processor_kinds(unet) == {ap.AttnProcessor2_0}
    unet.set_attn_processor(ap.XFormersAttnProcessor())  # what the 'xformers' backend installs
    assert set_attention_backend(unet, "sdpa") == len(unet.attn_processors) > 0
    assert processor_kinds(unet) == {ap.AttnProcessor2_0}
    torch.testing.assert_close(unet_out(unet), expected, rtol=0, atol=0)


def test_sdpa_keeps_sd3_joint_attention_joint():
    model = tiny_sd3()
    expected = sd3_out(model)
    assert processor_kinds(model) == {ap.JointAttnProcessor2_0}
    model.set_attn_processor(ap.XFormersJointAttnProcessor())
    holder = nn.ModuleDict({"transformer": model})  # any module that holds diffusers models
    assert set_attention_backend(holder, "sdpa") == len(model.attn_processors) > 0
    assert processor_kinds(model) == {ap.JointAttnProcessor2_0}
    torch.testing.assert_close(sd3_out(model), expected, rtol=0, atol=0)


def test_sdpa_on_a_model_without_attention_is_a_no_op():
    assert set_attention_backend(nn.Sequential(nn.Linear(2, 2)), "sdpa") == 0


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None,
                    reason="xformers is installed: the missing-package error cannot happen")
def test_xformers_without_the_package_names_it():
    unet = tiny_unet()
    with pytest.raises(ImportError, match=r"backend 'xformers' needs the xformers package.*ddg\[xformers\]"):
        set_attention_backend(unet, "xformers")
    assert processor_kinds(unet) == {ap.AttnProcessor2_0}  # left as it was


def test_bad_arguments():
    assert ATTENTION_BACKENDS == ("sdpa", "xformers")
    with pytest.raises(ValueError, match=r"'backend' must be one of \('sdpa', 'xformers'\), got 'flash'"):
        set_attention_backend(tiny_unet(), "flash")
    with pytest.raises(TypeError, match="'module' must be an nn.Module, got function"):
        set_attention_backend(tiny_unet, "sdpa")
