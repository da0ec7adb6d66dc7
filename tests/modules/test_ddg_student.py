"""DDG student (backbones, projection, zero-shot head) and the conditioning adapters: values against hand
computations, shapes, frozen BN, and gradients that reach exactly the student parts they should."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

from ddg_models import (CLIPVisionBackbone, DDGStudent, FrozenBNResNetBackbone, PatchTokenAdapter,  # noqa: E402
                        ProbabilityWeightedPromptAdapter, StudentConditioning, TorchvisionViTBackbone, ZeroShotHead,
                        build_backbone, encode_class_prompts)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_clip_vision(projection_dim=12):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4, num_channels=1, projection_dim=projection_dim)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_student(classes=5, dim=12):
    head = ZeroShotHead(torch.randn(classes, dim), logit_scale=50.0)
    return DDGStudent(CLIPVisionBackbone(tiny_clip_vision(projection_dim=8)), head)


def test_zero_shot_head_matches_hand_computation():
    text = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    head = ZeroShotHead(text, logit_scale=10.0)
    z = torch.tensor([[1.0, 0.0], [-6.0, 8.0]])
    # cosines: row 0: (3/5, 0), row 1: (-18+32)/(10*5)=0.28, (-16)/(10*2) = -0.8
    expected = 10.0 * torch.tensor([[0.6, 0.0], [0.28, -0.8]])
    torch.testing.assert_close(head(z), expected)
    assert not list(head.parameters()), "the zero-shot head must not be optimised"
    assert set(head.state_dict()) == {"weight", "logit_scale"}


def test_zero_shot_head_rejects_bad_input():
    with pytest.raises(ValueError, match="ZeroShotHead.*class_embeddings"):
        ZeroShotHead(torch.randn(3))
    with pytest.raises(ValueError, match="ZeroShotHead.*logit_scale"):
        ZeroShotHead(torch.randn(3, 4), logit_scale=0.0)
    with pytest.raises(ValueError, match="ZeroShotHead: input width 5"):
        ZeroShotHead(torch.randn(3, 4))(torch.randn(2, 5))


def test_clip_backbone_pooled_is_clip_image_embedding_and_tokens_are_projected():
    model = tiny_clip_vision()
    backbone = CLIPVisionBackbone(model)
    x = torch.randn(3, 1, 16, 16)
    pooled, tokens = backbone(x)
    assert tokens.shape == (3, 17, 12) and backbone.out_dim == backbone.token_dim == 12
    torch.testing.assert_close(pooled, model(pixel_values=x).image_embeds)
    hidden = model.vision_model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(tokens, model.visual_projection(model.vision_model.post_layernorm(hidden)))


def test_student_logits_are_head_of_projection_of_features():
    torch.manual_seed(0)
    student = tiny_student()
    x = torch.randn(4, 1, 16, 16)
    logits, z, tokens = student.encode(x)
    pooled, _ = student.backbone(x)
    torch.testing.assert_close(z, student.projection(pooled))
    torch.testing.assert_close(logits, student.head(z))
    torch.testing.assert_close(student(x), logits)
    assert logits.shape == (4, 5) and z.shape == (4, 12) and tokens.shape == (4, 17, 8)


def test_frozen_bn_resnet_keeps_statistics_and_excludes_bn_from_training():
    resnet = torchvision.models.resnet18(weights=None)
    backbone = FrozenBNResNetBackbone(resnet)
    backbone.train()
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = bns[0].running_mean.clone()
    pooled, tokens = backbone(torch.randn(2, 3, 64, 64) * 3 + 1)
    torch.testing.assert_close(bns[0].running_mean, before)
    assert pooled.shape == (2, 512) and tokens.shape == (2, 4, 512)
    torch.testing.assert_close(pooled, tokens.mean(1))
    student = DDGStudent(backbone, ZeroShotHead(torch.randn(3, 6)))
    trainable = {id(q) for q in student.featurizer_parameters()}
    bn_params = {id(q) for m in bns for q in m.parameters()}
    assert trainable and not trainable & bn_params
    assert all(not q.requires_grad for m in bns for q in m.parameters())


def test_torchvision_vit_backbone_class_token_is_vit_output():
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    backbone = TorchvisionViTBackbone(vit)
    x = torch.randn(2, 3, 32, 32)
    pooled, tokens = backbone(x)
    assert tokens.shape == (2, 5, 16)
    torch.testing.assert_close(pooled, vit(x))  # heads replaced by Identity: the class token


def test_build_backbone_errors():
    with pytest.raises(ValueError, match="build_backbone: 'name'"):
        build_backbone("resnet9000")
    with pytest.raises(ValueError, match="build_backbone: 'clip_vit' needs weights"):
        build_backbone("clip_vit")
    with pytest.raises(FileNotFoundError, match="build_backbone"):
        build_backbone("resnet50", "/no/such/file.pth")
    with pytest.raises(TypeError, match="DDGStudent: 'backbone'"):
        DDGStudent(nn.Linear(2, 2), ZeroShotHead(torch.randn(3, 4)))


def test_encode_class_prompts_is_normalised_clip_text_feature(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from examples.common.tiny_text import build_word_tokenizer, tiny_text_encoder

    tok = build_word_tokenizer(["a", "photo", "of", "cat", "dog", "sea", "lion"], tmp_path)
    text = tiny_text_encoder(tok, hidden_size=16, layers=1, projection_dim=8)
    clip = CLIPModel(CLIPConfig(text_config=text.config.to_dict(), vision_config=tiny_clip_vision(8).config.to_dict(),
                                projection_dim=8)).eval()
    emb = encode_class_prompts(clip, tok, ["cat", "dog", "sea_lion"])
    ids = tok(["a photo of a cat", "a photo of a dog", "a photo of a sea lion"], padding="max_length",
              return_tensors="pt")
    out = clip.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
    expected = F.normalize(getattr(out, "pooler_output", out), dim=-1)
    torch.testing.assert_close(emb, expected)
    with pytest.raises(ValueError, match="encode_class_prompts: 'template'"):
        encode_class_prompts(clip, tok, ["cat"], template="no slot")


# ------------------------------------------------------------------------------------------- conditioning

def test_probability_weighted_prompts_match_loop_and_do_not_materialise():
    torch.manual_seed(0)
    prompts = torch.randn(4, 6, 5)
    adapter = ProbabilityWeightedPromptAdapter(prompts, temperature=2.0)
    logits = torch.randn(3, 4, requires_grad=True)
    c = adapter(logits)
    p = torch.softmax(logits / 2.0, dim=-1)
    expected = torch.stack([sum(p[b, k] * prompts[k] for k in range(4)) for b in range(3)])
    torch.testing.assert_close(c, expected)
    c.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert "prompt_embeddings" not in adapter.state_dict()  # rebuilt from the teacher, never checkpointed
    with pytest.raises(ValueError, match=r"ProbabilityWeightedPromptAdapter: 'logits' must be \[B, 4\]"):
        adapter(torch.randn(3, 5))


def test_patch_token_adapter_eval_selection_padding_and_random_subset():
    torch.manual_seed(0)
    adapter = PatchTokenAdapter(token_dim=4, context_dim=6, num_tokens=5)
    tokens = torch.randn(2, 9, 4)
    adapter.eval()
    torch.testing.assert_close(adapter(tokens), adapter.proj(tokens[:, :5]))
    # training: class token first, then 4 distinct patch tokens drawn from positions 1..8
    adapter.train()
    g = torch.Generator().manual_seed(3)
    out = adapter(tokens, generator=g)
    torch.testing.assert_close(out[:, 0], adapter.proj(tokens[:, 0]))
    projected = adapter.proj(tokens)
    for b in range(2):
        picked = [int((projected[b] - out[b, j]).abs().sum(-1).argmin()) for j in range(1, 5)]
        assert len(set(picked)) == 4 and all(1 <= i <= 8 for i in picked)
    # fewer tokens than num_tokens: all kept, zero-padded
    short = PatchTokenAdapter(4, 6, num_tokens=7, has_cls_token=False).eval()
    out = short(tokens[:, :3])
    assert out.shape == (2, 7, 6)
    torch.testing.assert_close(out[:, :3], short.proj(tokens[:, :3]))
    assert out[:, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="PatchTokenAdapter: 'tokens'"):
        adapter(torch.randn(2, 9, 5))


def test_student_conditioning_modes_and_gradients_reach_only_the_student():
    torch.manual_seed(0)
    student = tiny_student()
    prompts = ProbabilityWeightedPromptAdapter(torch.randn(5, 17, 10))
    patches = PatchTokenAdapter(8, 10, num_tokens=17)
    x = torch.randn(3, 1, 16, 16)
    logits, _, tokens = student.encode(x)
    a = StudentConditioning("prompts", prompts=prompts)(logits, tokens)
    b = StudentConditioning("patches", patches=patches)(logits, tokens)
    both = StudentConditioning("both", prompts=prompts, patches=patches)
    torch.testing.assert_close(both(logits, tokens), a + b)
    assert a.shape == b.shape == (3, 17, 10)
    both(logits, tokens).square().mean().backward()
    assert all(q.grad is not None for q in student.backbone.parameters() if q.requires_grad)
    assert student.projection.weight.grad is not None and patches.proj.weight.grad is not None
    assert prompts.prompt_embeddings.grad is None and student.head.weight.grad is None
    with pytest.raises(ValueError, match="StudentConditioning: 'mode'"):
        StudentConditioning("text", prompts=prompts)
    with pytest.raises(ValueError, match="StudentConditioning: mode 'both' needs 'patches'"):
        StudentConditioning("both", prompts=prompts)
    with pytest.raises(ValueError, match="StudentConditioning: 'both' adds"):
        StudentConditioning("both", prompts=prompts, patches=PatchTokenAdapter(8, 10, num_tokens=9))


def test_prompt_conditioning_gradient_reaches_featurizer_only_through_probabilities():
    torch.manual_seed(0)
    student = tiny_student()
    cond = StudentConditioning("prompts", prompts=ProbabilityWeightedPromptAdapter(torch.randn(5, 4, 6)))
    logits, _, tokens = student.encode(torch.randn(2, 1, 16, 16))
    logits.retain_grad()
    cond(logits, tokens).sum().backward()
    # d(sum c)/d logits is the softmax Jacobian applied to sum_l,d E: non-zero, and the whole gradient path
    assert logits.grad.abs().sum() > 0
    assert student.backbone.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
