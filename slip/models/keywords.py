"""Model specs from builder keywords: `vit_spec` and `resnet_spec` (the keywords configs and presets write), and
the flat `arch` records of earlier checkpoints read into specs, in one place.

The keywords both tower families take (text tower, heads, normalisation, inputs) are defined once, in
`_shared_keywords`; each family adds its tower's keywords and may change a shared default.
"""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable, Mapping, Sequence

from slip.models.heads import CLIP_INITIAL_LOGIT_SCALE
from slip.models.image_text import ALL_INPUTS
from slip.models.spec import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ModelSpec, ResNetSpec,
                              ViTSpec, spec_from_kwargs)

__all__ = ["resnet_spec", "spec_from_legacy_arch", "vit_spec"]


def _shared_keywords(
    *,
    # the text tower
    text_width: int = 512, text_layers: int = 12, text_heads: int = 8, context_length: int = 77,
    vocab_size: int = 49408,
    # the joint space and the SSL head
    embed_dim: int = 512, logit_scale_init: float = CLIP_INITIAL_LOGIT_SCALE,
    ssl_mlp_dim: int = 4096, ssl_embed_dim: int = 256, ssl_head_norm: str = "batch",
    # preprocessing, and which inputs the model takes
    image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
    inputs: Sequence[str] = ALL_INPUTS,
) -> dict[str, Any]:
    """The keywords of every tower family, with their values."""
    return dict(locals())


def _family(**shared_defaults: Any) -> Callable[[Callable[..., ModelSpec]], Callable[..., ModelSpec]]:
    """Make a spec function of the decorated one, which takes its tower's keywords and `**shared` (the shared
    keywords, all given): it takes every keyword, shared ones defaulting to `shared_defaults` or
    `_shared_keywords`', and its signature and type hints say so, for config checks and presets."""
    def decorate(function: Callable[..., ModelSpec]) -> Callable[..., ModelSpec]:
        own = [p for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]
        shared = [p.replace(default=shared_defaults.get(p.name, p.default))
                  for p in inspect.signature(_shared_keywords).parameters.values()]
        own_names = {p.name for p in own}

        @functools.wraps(function)
        def spec_function(**kwargs: Any) -> ModelSpec:
            shared_kwargs = {name: value for name, value in kwargs.items() if name not in own_names}
            try:
                shared_values = _shared_keywords(**{**shared_defaults, **shared_kwargs})
            except TypeError:  # name the function the caller called
                unknown = sorted(set(shared_kwargs) - {p.name for p in shared})
                raise TypeError(f"{function.__name__}() got an unexpected keyword argument {unknown[0]!r}") from None
            return function(**{name: value for name, value in kwargs.items() if name in own_names}, **shared_values)

        spec_function.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*own, *shared], return_annotation=ModelSpec)
        spec_function.__annotations__ = {**typing.get_type_hints(function), **typing.get_type_hints(_shared_keywords),
                                         "return": ModelSpec}
        spec_function.__annotations__.pop("shared", None)
        return spec_function
    return decorate


@_family()
def vit_spec(
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
    **shared: Any,
) -> ModelSpec:
    """The spec of a model with a timm ViT image tower (`ssl_patch_dropout` None: as `patch_dropout`)."""
    kwargs = {**{name: value for name, value in locals().items() if name != "shared"}, **shared}
    if ssl_patch_dropout is None:
        kwargs["ssl_patch_dropout"] = patch_dropout
    return spec_from_kwargs(ViTSpec, kwargs)


@_family(embed_dim=1024, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
def resnet_spec(
    *,
    image_size: int = 224,
    vision_layers: Sequence[int] = (3, 4, 6, 3),
    vision_width: int = 64,
    vision_heads: int | None = None,
    channels_last: bool = True,
    **shared: Any,
) -> ModelSpec:
    """The spec of a model with CLIP's ModifiedResNet image tower (`vision_heads` None: width * 32 / 64, CLIP's)."""
    kwargs = {**{name: value for name, value in locals().items() if name != "shared"}, **shared}
    if vision_heads is None:
        kwargs["vision_heads"] = vision_width * 32 // 64 if isinstance(vision_width, int) else vision_width
    return spec_from_kwargs(ResNetSpec, kwargs)


# The keyword functions of each `family` that the flat `arch` records of earlier checkpoints name.
_LEGACY_FAMILIES = {"vit": vit_spec, "resnet": resnet_spec}


def spec_from_legacy_arch(arch: Mapping[str, Any]) -> ModelSpec:
    """The spec of an earlier version's flat `arch` record (builder keywords plus `family`); keys it lacks (added
    later) take the builder's defaults."""
    arch = dict(arch)
    family = arch.pop("family", None)
    if family not in _LEGACY_FAMILIES:
        raise ValueError(f"arch record: family={family!r} is not one of {sorted(_LEGACY_FAMILIES)}")
    try:
        return _LEGACY_FAMILIES[family](**arch)
    except TypeError as error:  # a key no builder takes
        raise ValueError(f"arch record: {error}") from None
