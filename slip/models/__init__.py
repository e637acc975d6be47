"""Model builders: one flat builder per tower family, and named presets (vit_b16, rn50, ...) over them."""
from __future__ import annotations

import functools
import inspect
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from slip.models.heads import CLIP_INITIAL_LOGIT_SCALE, SSLHead
from slip.models.image_text import ALL_INPUTS, ImageTextModel
from slip.models.text import TextTransformer
from slip.models.vision import ModifiedResNet, check_patch_dropout, vit_tower

__all__ = [
    "ALL_INPUTS", "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ImageTextModel", "MODEL_BUILDERS", "build_from_arch", "build_resnet_model",
    "build_vit_model", "rn50", "rn101", "rn50x4", "rn50x16", "rn50x64", "tiny", "vit_b16", "vit_l16",
    "vit_s16", "vit_ti16",
]


# Pixel normalisation is part of a model: SLIP trained with ImageNet statistics, OpenAI CLIP with its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalization(mean: Sequence[float], std: Sequence[float]) -> dict[str, tuple[float, ...]]:
    """Validated per-channel mean and std, as plain tuples for the arch record."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"image_mean and image_std need 3 values each, std > 0; got {mean} and {std}")
    return {"image_mean": mean, "image_std": std}


def _parts_for(inputs: Sequence[str]) -> tuple[bool, bool]:
    """Which optional parts the inputs need: (text tower and projections, SSL head)."""
    unknown = sorted(set(inputs) - set(ALL_INPUTS))
    if unknown or not inputs:
        raise ValueError(f"model inputs must be a non-empty subset of {list(ALL_INPUTS)}, got {list(inputs)}")
    return "text" in inputs or "image" in inputs, "aug1" in inputs or "aug2" in inputs


def _assemble(
    visual: Any,
    arch: dict[str, Any],
    project_image: bool,
) -> ImageTextModel:
    with_text, with_ssl = _parts_for(arch["inputs"])
    text = None
    if with_text:
        text = TextTransformer(
            vocab_size=arch["vocab_size"],
            context_length=arch["context_length"],
            width=arch["text_width"],
            layers=arch["text_layers"],
            heads=arch["text_heads"],
        )
    ssl_head = None
    if with_ssl:
        ssl_head = SSLHead(visual.num_features, arch["ssl_mlp_dim"], arch["ssl_embed_dim"], arch["ssl_head_norm"])
    return ImageTextModel(
        visual,
        embed_dim=arch["embed_dim"],
        text=text,
        project_image=project_image,
        ssl_head=ssl_head,
        logit_scale_init=arch["logit_scale_init"],
        arch=arch,
    )


def build_vit_model(
    *,
    image_size: int = 224,
    patch_size: int = 16,
    vision_width: int = 768,
    vision_layers: int = 12,
    vision_heads: int = 12,
    openai_layout: bool = False,
    drop_path_rate: float = 0.0,
    patch_dropout: float = 0.0,
    ssl_patch_dropout: float | None = None,
    embed_dim: int = 512,
    text_width: int = 512,
    text_layers: int = 12,
    text_heads: int = 8,
    context_length: int = 77,
    vocab_size: int = 49408,
    ssl_mlp_dim: int = 4096,
    ssl_embed_dim: int = 256,
    ssl_head_norm: str = "batch",
    logit_scale_init: float = CLIP_INITIAL_LOGIT_SCALE,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    inputs: Sequence[str] = ALL_INPUTS,
) -> ImageTextModel:
    """A model with a timm ViT image tower; text tower and SSL head only where `inputs` need them.

    `ssl_head_norm`: the SSL head's hidden normalisation, "batch" (SLIP's), "layer" or "none".
    `patch_dropout`: the share of patch tokens the CLIP view ("image") drops in training (FLIP), drawn per image;
    `ssl_patch_dropout`: the same for the SSL views (None: as `patch_dropout`). Evaluation uses every token.
    """
    check_patch_dropout("patch_dropout", patch_dropout)
    ssl_patch_dropout = check_patch_dropout("ssl_patch_dropout",
                                            patch_dropout if ssl_patch_dropout is None else ssl_patch_dropout)
    arch = dict(locals(), family="vit", inputs=tuple(inputs), **_normalization(image_mean, image_std))
    visual = vit_tower(
        image_size=image_size,
        patch_size=patch_size,
        width=vision_width,
        depth=vision_layers,
        heads=vision_heads,
        openai_layout=openai_layout,
        drop_path_rate=drop_path_rate,
        patch_dropout=max(patch_dropout, ssl_patch_dropout),
    )
    model = _assemble(visual, arch, project_image=True)
    model.view_patch_dropout.update(image=float(patch_dropout), aug1=float(ssl_patch_dropout),
                                    aug2=float(ssl_patch_dropout))
    return model


def build_resnet_model(
    *,
    image_size: int = 224,
    vision_layers: Sequence[int] = (3, 4, 6, 3),
    vision_width: int = 64,
    vision_heads: int | None = None,
    embed_dim: int = 1024,
    text_width: int = 512,
    text_layers: int = 12,
    text_heads: int = 8,
    context_length: int = 77,
    vocab_size: int = 49408,
    ssl_mlp_dim: int = 4096,
    ssl_embed_dim: int = 256,
    ssl_head_norm: str = "batch",
    logit_scale_init: float = CLIP_INITIAL_LOGIT_SCALE,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    inputs: Sequence[str] = ALL_INPUTS,
    channels_last: bool = True,
) -> ImageTextModel:
    """A model with CLIP's ModifiedResNet image tower, whose attention pool projects to `embed_dim`.

    `channels_last`: the tower convolves in NHWC layout (RN50 fwd + bwd 1.15-1.20x on CPU, median of 8 pairs; see
    benchmarks/results/model_fastpaths.md).
    """
    vision_heads = vision_heads or vision_width * 32 // 64
    arch = dict(locals(), family="resnet", inputs=tuple(inputs), vision_layers=tuple(vision_layers),
                **_normalization(image_mean, image_std))
    visual = ModifiedResNet(
        layers=tuple(vision_layers),
        output_dim=embed_dim,
        heads=vision_heads,
        image_size=image_size,
        width=vision_width,
        channels_last=channels_last,
    )
    return _assemble(visual, arch, project_image=False)


def _preset_of(builder: Callable[..., ImageTextModel], **preset: Any) -> Callable[[Callable], Callable]:
    """Make the decorated (docstring-only) function build `builder(**preset, **overrides)`; its signature is the
    builder's with the preset's defaults, so config checks see every key and its default."""
    def decorate(function: Callable) -> Callable[..., ImageTextModel]:
        @functools.wraps(function)
        def build(**overrides: Any) -> ImageTextModel:
            return builder(**{**preset, **overrides})

        signature = inspect.signature(builder)
        build.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]
            parameter.replace(default=preset.get(name, parameter.default))
            for name, parameter in signature.parameters.items()])
        return build
    return decorate


@_preset_of(build_vit_model, image_size=32, patch_size=4, vision_width=128, vision_layers=4, vision_heads=4,
            embed_dim=128, text_width=128, text_layers=3, text_heads=4, context_length=32, ssl_mlp_dim=512,
            ssl_embed_dim=128)
def tiny(**overrides: Any) -> ImageTextModel:
    """The CPU-sized ViT of conf/model/tiny.yaml (32 px, 4x4 patches, 128 wide, 4 layers; 128-wide 3-layer text)."""


@_preset_of(build_vit_model, vision_width=192, vision_layers=12, vision_heads=3)
def vit_ti16(**overrides: Any) -> ImageTextModel:
    """ViT-Ti/16 image tower (192 wide, 12 layers, 3 heads): the CPU-friendly size."""


@_preset_of(build_vit_model, vision_width=384, vision_layers=12, vision_heads=12)
def vit_s16(**overrides: Any) -> ImageTextModel:
    """ViT-S/16 in SLIP's MoCo-v3 variant (384 wide, 12 layers, 12 heads)."""


@_preset_of(build_vit_model, vision_width=768, vision_layers=12, vision_heads=12)
def vit_b16(**overrides: Any) -> ImageTextModel:
    """ViT-B/16 (768 wide, 12 layers, 12 heads)."""


@_preset_of(build_vit_model, vision_width=1024, vision_layers=24, vision_heads=16)
def vit_l16(**overrides: Any) -> ImageTextModel:
    """ViT-L/16 (1024 wide, 24 layers, 16 heads)."""


@_preset_of(build_resnet_model, vision_layers=(3, 4, 6, 3), vision_width=64, embed_dim=1024)
def rn50(**overrides: Any) -> ImageTextModel:
    """CLIP RN50: stages (3, 4, 6, 3), width 64, 1024-d joint space."""


@_preset_of(build_resnet_model, vision_layers=(3, 4, 23, 3), vision_width=64, embed_dim=512)
def rn101(**overrides: Any) -> ImageTextModel:
    """CLIP RN101: stages (3, 4, 23, 3), width 64, 512-d joint space."""


@_preset_of(build_resnet_model, vision_layers=(4, 6, 10, 6), vision_width=80, embed_dim=640, image_size=288,
            text_width=640, text_heads=10)
def rn50x4(**overrides: Any) -> ImageTextModel:
    """CLIP RN50x4: stages (4, 6, 10, 6), width 80, 640-d joint space, 288 px, 640-wide text."""


@_preset_of(build_resnet_model, vision_layers=(6, 8, 18, 8), vision_width=96, embed_dim=768, image_size=384,
            text_width=768, text_heads=12)
def rn50x16(**overrides: Any) -> ImageTextModel:
    """CLIP RN50x16: stages (6, 8, 18, 8), width 96, 768-d joint space, 384 px, 768-wide text."""


@_preset_of(build_resnet_model, vision_layers=(3, 15, 36, 10), vision_width=128, embed_dim=1024, image_size=448,
            text_width=1024, text_heads=16)
def rn50x64(**overrides: Any) -> ImageTextModel:
    """CLIP RN50x64: stages (3, 15, 36, 10), width 128, 1024-d joint space, 448 px, 1024-wide text."""


MODEL_BUILDERS: Mapping[str, Callable[..., ImageTextModel]] = MappingProxyType({
    builder.__name__: builder
    for builder in (tiny, vit_ti16, vit_s16, vit_b16, vit_l16, rn50, rn101, rn50x4, rn50x16, rn50x64)
})

ARCH_FAMILIES: Mapping[str, Callable[..., ImageTextModel]] = MappingProxyType({
    "vit": build_vit_model,
    "resnet": build_resnet_model,
})


def build_from_arch(arch: Mapping[str, Any]) -> ImageTextModel:
    """Rebuild a model from the plain `arch` record a model carries (as saved in checkpoints)."""
    arch = dict(arch)
    family = arch.pop("family", None)
    if family not in ARCH_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(ARCH_FAMILIES)}")
    return ARCH_FAMILIES[family](**arch)
