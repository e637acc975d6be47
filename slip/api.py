"""The Python entry points: a model by name (with weights), its image transforms and tokenizer, zero-shot classifiers.

    import slip
    model, train_transform, eval_transform = slip.create_model_and_transforms("vit_b16", pretrained="last.pt")
    tokenizer = slip.get_tokenizer(model)
    classifier = slip.zero_shot_classifier(model, ["cat", "dog"], ["a photo of a {}."])
    probabilities = classifier(eval_transform(image)[None]).softmax(dim=-1)
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slip.checkpoint import CheckpointError
from slip.models import FAMILY_BUILDERS, ImageTextModel, ModelSpec, build_model, list_models, model_spec
from slip.pretrained import load_pretrained
from slip.prompts import DEFAULT_TEMPLATES
from slip.tokenizer import DEFAULT_CONTEXT_LENGTH, Tokenizer, default_tokenizer

__all__ = ["ContextTokenizer", "ZeroShotClassifier", "create_model", "create_model_and_transforms",
           "get_tokenizer", "model_names", "zero_shot_classifier"]


def model_names() -> list[str]:
    """Every name `create_model` takes: the registered presets (`list_models`) and the keyword builders."""
    return sorted([*list_models(), *FAMILY_BUILDERS])


def _first_size_difference(named: ModelSpec, loaded: ModelSpec) -> str | None:
    """The first architecture size (by builder keyword) where `loaded` is not `named`; None where none is."""
    if type(named.vision) is not type(loaded.vision):
        return f"a {loaded.vision.tower_name} image tower where the named model has a {named.vision.tower_name}"
    named_sizes, loaded_sizes = named.sizes(), loaded.sizes()
    for key in sorted(named_sizes):
        if named_sizes[key] != loaded_sizes[key]:
            return f"{key}={loaded_sizes[key]!r} where the named model has {named_sizes[key]!r}"
    return None


def create_model(name: str | ModelSpec, pretrained: str | os.PathLike | None = None,
                 **overrides: Any) -> ImageTextModel:
    """The model `name` (see `model_names`; or a `ModelSpec`) with `overrides` of its builder's arguments, in
    training mode; or, with `pretrained` (any file or directory `slip.load_pretrained` reads), those weights in
    eval mode, after checking that their architecture is the named one (parts the weights lack, e.g. an SSL head,
    are not built)."""
    if isinstance(name, ModelSpec):
        if overrides:
            raise ValueError(f"create_model: overrides {sorted(overrides)} need a model name, not a spec "
                             "(change the spec instead)")
        spec = name
    else:
        spec = model_spec(name, **overrides)
    if pretrained is None:
        return build_model(spec)
    loaded = load_pretrained(pretrained)
    difference = _first_size_difference(spec, loaded.spec)
    if difference is not None:
        label = name if isinstance(name, str) else "the given spec's"
        raise CheckpointError(f"{pretrained}: not a {label} model: {difference}")
    return loaded


def create_model_and_transforms(name: str, pretrained: str | os.PathLike | None = None,
                                **overrides: Any) -> tuple[ImageTextModel, nn.Module, nn.Module]:
    """`create_model`, plus the image transforms its spec implies (PIL image -> normalised tensor): the training
    view (random resized crop 0.5-1, SLIP's CLIP view) and the evaluation view (resize, centre crop)."""
    from slip.data.transforms import clip_view, eval_view

    model = create_model(name, pretrained, **overrides)
    preprocess = model.spec.preprocess
    size, mean, std = preprocess.image_size, preprocess.mean, preprocess.std
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
        context_length = model_spec(model).text.context_length
    elif model is not None and model.spec is not None:
        context_length = model.spec.text.context_length
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
