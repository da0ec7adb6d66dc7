"""ddg_models: nn.Modules and samplers built on ddg_ops (teachers with CFG, samplers, heads, classifiers).

The diffusers/transformers-based modules are imported on first use, so the heads load without diffusers;
``dir(ddg_models)`` lists them all the same.
"""
import importlib

from .attention_backend import ATTENTION_BACKENDS, set_attention_backend
from .classifiers import (CLASSIFIER_NAMES, build_classifier, classifier_of, feature_dim, load_classifier,
                          pooled_features, register_classifier, registered_classifiers)
from .simple_mlp_adaln import SimpleMLPAdaLN
from .split_token_head import (SplitTokenDiffusionHead, SplitTokenHeadConfig, convert_simple_mlp_adaln_state_dict,
                               convert_split_token_head_state_dict)

# Name -> submodule, imported on first use (these need diffusers / transformers).
_LAZY = {
    # Frozen teachers, their prompt encoder and VAE codec, and how a denoiser is called
    "GuidedTeacher": "guided_teacher", "PromptEncoder": "prompt_encoder", "VAECodec": "vae_codec",
    "StableDiffusionTeacher": "sd_teacher", "images_to_sd": "sd_teacher",
    "model_prediction": "model_call", "concat_conditions": "model_call",
    # Samplers and generators
    "FusedGuidanceStep": "guided_sampling",
    "DAGSampler": "dag_sampler", "ClassifierPreprocess": "classifier_preprocess", "ClassAlignmentTokens": "class_token",
    "FewStepGenerator": "few_step_generator", "FewStepOutput": "few_step_generator",
    "shifted_flow_sigmas": "few_step_generator", "BackwardSimulationGenerator": "backward_simulation",
    # Vision backbones, zero-shot heads and the student's conditioning of a teacher
    "build_backbone": "vision_backbones", "CLIPVisionBackbone": "vision_backbones",
    "FrozenBNResNetBackbone": "vision_backbones", "TorchvisionViTBackbone": "vision_backbones",
    "BACKBONES": "vision_backbones",
    "ZeroShotHead": "zero_shot_head", "encode_class_prompts": "zero_shot_head", "DDGStudent": "ddg_student",
    "ProbabilityWeightedPromptAdapter": "student_conditioning", "PatchTokenAdapter": "student_conditioning",
    "StudentConditioning": "student_conditioning", "CONDITIONING_MODES": "student_conditioning",
    # Weight averaging
    "SWAD": "swad",
}

__all__ = ["SimpleMLPAdaLN", "SplitTokenDiffusionHead",
           "SplitTokenHeadConfig", "convert_simple_mlp_adaln_state_dict", "convert_split_token_head_state_dict",
           "CLASSIFIER_NAMES", "build_classifier", "classifier_of", "feature_dim", "load_classifier", "pooled_features",
           "register_classifier", "registered_classifiers", "ATTENTION_BACKENDS", "set_attention_backend"]
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
