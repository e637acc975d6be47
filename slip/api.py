"""The Python entry points: a model by name (with weights), its image transforms and tokenizer, zero-shot classifiers.

    import slip
    model, train_transform, eval_transform = slip.create_model_and_transforms("vit_b16", pretrained="last.pt")
    tokenizer = slip.get_tokenizer(model)
    classifier = slip.zero_shot_classifier(model, ["cat", "dog"], ["a photo of a {}."])
    probabilities = classifier(eval_transform(image)[None]).softmax(dim=-1)
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slip.checkpoint import CheckpointError
from slip.models import ARCH_FAMILIES, MODEL_BUILDERS, ImageTextModel
from slip.pretrained import load_pretrained
from slip.prompts import DEFAULT_TEMPLATES
from slip.tokenizer import DEFAULT_CONTEXT_LENGTH, Tokenizer, default_tokenizer

__all__ = ["ContextTokenizer", "ZeroShotClassifier", "create_model", "create_model_and_transforms",
           "get_tokenizer", "model_names", "zero_shot_classifier"]

# Arch entries that say which parts were built or how they were initialised, not what the weights compute with.
_NOT_SIZES = frozenset({"inputs", "logit_scale_init", "drop_path_rate", "channels_last", "ssl_head_norm",
                        "ssl_mlp_dim", "ssl_embed_dim", "patch_dropout", "ssl_patch_dropout"})


def model_names() -> list[str]:
    """Every name `create_model` takes: the presets (conf/model/*.yaml) and the builders of each tower family."""
    return sorted([*MODEL_BUILDERS, *(f"build_{family}_model" for family in ARCH_FAMILIES)])


def _builder(name: str) -> Callable[..., ImageTextModel]:
    if name in MODEL_BUILDERS:
        return MODEL_BUILDERS[name]
    families = {f"build_{family}_model": builder for family, builder in ARCH_FAMILIES.items()}
    if name in families:
        return families[name]
    raise ValueError(f"unknown model name {name!r}; known: {', '.join(model_names())}")


def _first_size_difference(named: dict[str, Any], loaded: dict[str, Any]) -> str | None:
    for key in sorted(set(named) & set(loaded) - _NOT_SIZES):
        a, b = named[key], loaded[key]
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            return f"{key}={b!r} where the named model has {a!r}"
    return None


def create_model(name: str, pretrained: str | os.PathLike | None = None, **overrides: Any) -> ImageTextModel:
    """The model `name` (see `model_names`) with `overrides` of its builder's arguments, in training mode; or,
    with `pretrained` (any file or directory `slip.load_pretrained` reads), those weights in eval mode, after
    checking that their architecture is the named one (parts the weights lack, e.g. an SSL head, are not built)."""
    builder = _builder(name)
    if pretrained is None:
        return builder(**overrides)
    loaded = load_pretrained(pretrained)
    with torch.device("meta"):
        parts = {"inputs": loaded.arch["inputs"]} if "inputs" in loaded.arch else {}
        named = builder(**{**parts, **overrides}).arch
    difference = _first_size_difference(named, loaded.arch)
    if difference is not None:
        raise CheckpointError(f"{pretrained}: not a {name} model: {difference}")
    return loaded


def create_model_and_transforms(name: str, pretrained: str | os.PathLike | None = None,
                                **overrides: Any) -> tuple[ImageTextModel, nn.Module, nn.Module]:
    """`create_model`, plus the image transforms its arch implies (PIL image -> normalised tensor): the training
    view (random resized crop 0.5-1, SLIP's CLIP view) and the evaluation view (resize, centre crop)."""
    from slip.data.transforms import clip_view, eval_view

    model = create_model(name, pretrained, **overrides)
    arch = model.arch
    size, mean, std = arch["image_size"], arch["image_mean"], arch["image_std"]
    return model, clip_view(size, mean, std), eval_view(size, mean, std)


@dataclass(frozen=True)
class ContextTokenizer:
    """CLIP's tokenizer bound to a context length: `tokenizer(texts)` -> int64 [N, context_length] ids."""

    tokenizer: Tokenizer
    context_length: int = DEFAULT_CONTEXT_LENGTH

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        """Token ids, SOT ... EOT then zeros; longer texts are cut and keep their EOT (as clip.tokenize)."""
        return self.tokenizer(texts, self.context_length)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """The text of a row of ids, special tokens and padding left out."""
        return self.tokenizer.decode([int(i) for i in ids if int(i) != 0])


def get_tokenizer(model: ImageTextModel | str | None = None) -> ContextTokenizer:
    """The tokenizer for `model` (a model or a name; its text context length), else for CLIP's 77 tokens."""
    context_length = DEFAULT_CONTEXT_LENGTH
    if isinstance(model, str):
        with torch.device("meta"):
            model = _builder(model)()
    if model is not None:
        context_length = model.arch.get("context_length", DEFAULT_CONTEXT_LENGTH)
    return ContextTokenizer(default_tokenizer(), context_length)


class ZeroShotClassifier(nn.Module):
    """Images -> logits over classes: 100 x cosine similarity with each class's text embedding (CLIP's rule).

    The class embeddings are the mean of the normalised embeddings of every template x every name of a class,
    renormalised (`slip.eval.zeroshot.text_classifier`); `class_names` keeps the order of the logits.
    """

    def __init__(self, model: ImageTextModel, class_embeddings: Tensor, class_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("class_embeddings", class_embeddings)
        self.class_names = list(class_names)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] (the eval transform's output) -> logits [B, classes]."""
        embeddings = F.normalize(self.model.encode_image(images.to(self.class_embeddings.device)).float(), dim=-1)
        return 100.0 * embeddings @ self.class_embeddings.T

    def predict(self, images: Tensor) -> list[str]:
        """The most likely class name of each image."""
        return [self.class_names[index] for index in self(images).argmax(dim=-1).tolist()]


def zero_shot_classifier(model: ImageTextModel, class_names: Sequence[str | Sequence[str]],
                         templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256) -> ZeroShotClassifier:
    """A zero-shot classifier over `class_names` (each a name or a list of synonyms) from prompt `templates`
    (each with one "{}"); the model is used as it is (put it in eval mode first)."""
    from slip.eval.zeroshot import text_classifier

    tokenizer = get_tokenizer(model)
    embeddings = text_classifier(model, class_names, templates, lambda texts, length: tokenizer(texts), batch_size)
    names = [name if isinstance(name, str) else name[0] for name in class_names]
    return ZeroShotClassifier(model, embeddings, names)
