"""The model registry: `@register_model` presets, `list_models()`, and building a model from its spec."""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from slip.models.heads import SSLHead
from slip.models.image_text import ImageTextModel
from slip.models.spec import ModelSpec
from slip.models.text import TextTransformer

__all__ = ["RegisteredModel", "build_model", "builder_of", "list_models", "register_model", "registered_models"]

SpecFunction = Callable[..., ModelSpec]


def build_model(spec: ModelSpec) -> ImageTextModel:
    """The model `spec` describes, in training mode; the text tower and SSL head only where its inputs need them."""
    visual = spec.vision.build_tower(spec.preprocess.image_size, spec.head.embed_dim)
    text = None
    if spec.with_text:
        text = TextTransformer(vocab_size=spec.text.vocab_size, context_length=spec.text.context_length,
                               width=spec.text.width, layers=spec.text.layers, heads=spec.text.heads)
    ssl_head = None
    if spec.with_ssl_head:
        ssl_head = SSLHead(visual.num_features, spec.head.ssl_mlp_dim, spec.head.ssl_embed_dim,
                           spec.head.ssl_head_norm)
    return ImageTextModel(visual, embed_dim=spec.head.embed_dim, text=text,
                          project_image=spec.vision.projects_image, ssl_head=ssl_head,
                          logit_scale_init=spec.head.logit_scale_init, spec=spec,
                          view_patch_dropout=spec.vision.view_patch_dropout())


def builder_of(spec_function: SpecFunction, **preset: Any) -> Callable[[Callable], Callable[..., ImageTextModel]]:
    """Make the decorated (docstring-only) function build `build_model(spec_function(**preset, **overrides))`;
    its signature is `spec_function`'s with the preset's defaults, so config checks see every key and default."""
    def decorate(function: Callable) -> Callable[..., ImageTextModel]:
        @functools.wraps(function)
        def build(**overrides: Any) -> ImageTextModel:
            return build_model(spec_function(**{**preset, **overrides}))

        signature = inspect.signature(spec_function)
        parameters = [parameter.replace(default=preset.get(name, parameter.default))
                      for name, parameter in signature.parameters.items()]
        build.__signature__ = signature.replace(  # type: ignore[attr-defined]
            return_annotation=ImageTextModel, parameters=parameters)
        build.__annotations__ = {**typing.get_type_hints(spec_function), "return": ImageTextModel}
        return build
    return decorate


@dataclass(frozen=True)
class RegisteredModel:
    """A registered preset: its builder (keyword overrides -> model) and its spec function (-> spec, unbuilt)."""

    builder: Callable[..., ImageTextModel]
    spec_function: SpecFunction
    preset: Mapping[str, Any]

    def spec(self, **overrides: Any) -> ModelSpec:
        """The spec `builder(**overrides)` builds."""
        return self.spec_function(**{**self.preset, **overrides})


_REGISTRY: dict[str, RegisteredModel] = {}  # filled once, at import, by the @register_model presets


def register_model(spec_function: SpecFunction, **preset: Any) -> Callable[[Callable], Callable[..., ImageTextModel]]:
    """Register the decorated (docstring-only) function under its name as the preset `spec_function(**preset)`;
    it becomes that preset's builder (see `builder_of`)."""
    def decorate(function: Callable) -> Callable[..., ImageTextModel]:
        if function.__name__ in _REGISTRY:
            raise ValueError(f"model {function.__name__!r} is already registered")
        build = builder_of(spec_function, **preset)(function)
        _REGISTRY[function.__name__] = RegisteredModel(build, spec_function, MappingProxyType(dict(preset)))
        return build
    return decorate


def registered_models() -> Mapping[str, RegisteredModel]:
    """Every registered preset by name (read-only)."""
    return MappingProxyType(_REGISTRY)


def list_models() -> list[str]:
    """The names of the registered presets, sorted."""
    return sorted(_REGISTRY)
