"""Models: a typed spec (`slip.models.spec`) built by `build_model`, the two keyword builders over it, and the
registered presets (vit_b16, rn50, ...)."""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping

from slip.models.image_text import ALL_INPUTS, ImageTextModel
from slip.models.registry import builder_of, build_model, list_models, register_model, registered_models
from slip.models.keywords import resnet_spec, spec_from_legacy_arch, vit_spec
from slip.models.spec import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, HeadSpec, ModelSpec,
                              Preprocess, ResNetSpec, TextSpec, ViTSpec, VisionSpec)

__all__ = [
    "ALL_INPUTS", "FAMILY_BUILDERS", "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
    "HeadSpec", "ImageTextModel", "MODEL_BUILDERS", "ModelSpec", "Preprocess", "ResNetSpec", "TextSpec", "ViTSpec",
    "VisionSpec", "build_model", "build_resnet_model", "build_vit_model", "list_models", "model_spec",
    "register_model", "registered_models", "resnet_spec", "rn50", "rn101", "rn50x4", "rn50x16", "rn50x64",
    "spec_from_legacy_arch", "tiny", "vit_b16", "vit_l16", "vit_s16", "vit_spec", "vit_ti16",
]


@builder_of(vit_spec)
def build_vit_model(**overrides: Any) -> ImageTextModel:
    """A model with a timm ViT image tower; text tower and SSL head only where `inputs` need them.

    `ssl_head_norm`: the SSL head's hidden normalisation, "batch" (SLIP's), "layer" or "none".
    `patch_dropout`: the share of patch tokens the CLIP view ("image") drops in training (FLIP), drawn per image;
    `ssl_patch_dropout`: the same for the SSL views (None: as `patch_dropout`). Evaluation uses every token.
    """


@builder_of(resnet_spec)
def build_resnet_model(**overrides: Any) -> ImageTextModel:
    """A model with CLIP's ModifiedResNet image tower, whose attention pool projects to `embed_dim`.

    `channels_last`: the tower convolves in NHWC layout (RN50 fwd + bwd 1.15-1.20x on CPU, median of 8 pairs; see
    benchmarks/results/model_fastpaths.md).
    """


@register_model(vit_spec, image_size=32, patch_size=4, vision_width=128, vision_layers=4, vision_heads=4,
                embed_dim=128, text_width=128, text_layers=3, text_heads=4, context_length=32, ssl_mlp_dim=512,
                ssl_embed_dim=128)
def tiny(**overrides: Any) -> ImageTextModel:
    """The CPU-sized ViT of conf/model/tiny.yaml (32 px, 4x4 patches, 128 wide, 4 layers; 128-wide 3-layer text)."""


@register_model(vit_spec, vision_width=192, vision_layers=12, vision_heads=3)
def vit_ti16(**overrides: Any) -> ImageTextModel:
    """ViT-Ti/16 image tower (192 wide, 12 layers, 3 heads): the CPU-friendly size."""


@register_model(vit_spec, vision_width=384, vision_layers=12, vision_heads=12)
def vit_s16(**overrides: Any) -> ImageTextModel:
    """ViT-S/16 in SLIP's MoCo-v3 variant (384 wide, 12 layers, 12 heads)."""


@register_model(vit_spec, vision_width=768, vision_layers=12, vision_heads=12)
def vit_b16(**overrides: Any) -> ImageTextModel:
    """ViT-B/16 (768 wide, 12 layers, 12 heads)."""


@register_model(vit_spec, vision_width=1024, vision_layers=24, vision_heads=16)
def vit_l16(**overrides: Any) -> ImageTextModel:
    """ViT-L/16 (1024 wide, 24 layers, 16 heads)."""


@register_model(resnet_spec, vision_layers=(3, 4, 6, 3), vision_width=64, embed_dim=1024)
def rn50(**overrides: Any) -> ImageTextModel:
    """CLIP RN50: stages (3, 4, 6, 3), width 64, 1024-d joint space."""


@register_model(resnet_spec, vision_layers=(3, 4, 23, 3), vision_width=64, embed_dim=512)
def rn101(**overrides: Any) -> ImageTextModel:
    """CLIP RN101: stages (3, 4, 23, 3), width 64, 512-d joint space."""


@register_model(resnet_spec, vision_layers=(4, 6, 10, 6), vision_width=80, embed_dim=640, image_size=288,
                text_width=640, text_heads=10)
def rn50x4(**overrides: Any) -> ImageTextModel:
    """CLIP RN50x4: stages (4, 6, 10, 6), width 80, 640-d joint space, 288 px, 640-wide text."""


@register_model(resnet_spec, vision_layers=(6, 8, 18, 8), vision_width=96, embed_dim=768, image_size=384,
                text_width=768, text_heads=12)
def rn50x16(**overrides: Any) -> ImageTextModel:
    """CLIP RN50x16: stages (6, 8, 18, 8), width 96, 768-d joint space, 384 px, 768-wide text."""


@register_model(resnet_spec, vision_layers=(3, 15, 36, 10), vision_width=128, embed_dim=1024, image_size=448,
                text_width=1024, text_heads=16)
def rn50x64(**overrides: Any) -> ImageTextModel:
    """CLIP RN50x64: stages (3, 15, 36, 10), width 128, 1024-d joint space, 448 px, 1024-wide text."""


MODEL_BUILDERS: Mapping[str, Callable[..., ImageTextModel]] = MappingProxyType({
    name: entry.builder for name, entry in sorted(registered_models().items())})

# The keyword builders beside the presets, and the spec function of each (for create_model by these names).
FAMILY_BUILDERS: Mapping[str, tuple[Callable[..., ImageTextModel], Callable[..., ModelSpec]]] = MappingProxyType({
    "build_vit_model": (build_vit_model, vit_spec),
    "build_resnet_model": (build_resnet_model, resnet_spec),
})


def model_spec(name: str, **overrides: Any) -> ModelSpec:
    """The spec that the preset or keyword builder `name` builds with `overrides`, without building it."""
    if name in registered_models():
        return registered_models()[name].spec(**overrides)
    if name in FAMILY_BUILDERS:
        return FAMILY_BUILDERS[name][1](**overrides)
    known = ", ".join(sorted([*registered_models(), *FAMILY_BUILDERS]))
    raise ValueError(f"unknown model name {name!r}; known: {known}")
