"""End-to-end fine-tuning's model: a pretrained image tower with a linear classifier, and its optimiser groups.

The tower is rebuilt from the checkpoint's spec (`VisionSpec.for_finetuning`: stochastic depth as asked, every
patch token kept) and gets the pretrained weights; the head reads the tower's pooled features (the class token
after the final norm for a ViT, as BEiT's `--use_cls` does; the attention pool for a ModifiedResNet) and starts
small, as in BEiT: truncated normal with std 0.02, then weights and bias scaled by `head_init_scale`.
Layer-wise lr decay is timm's own (`timm.optim.param_groups_layer_decay`), over the towers' `group_matcher`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from slip.checkpoint import CheckpointError
from slip.checks import positive_fraction, positive_int
from slip.models import ImageTextModel
from slip.models.spec import ModelSpec

__all__ = ["CLASSIFIER_FORMAT", "ImageClassifier", "classifier_from_model", "layer_decay_groups", "load_classifier"]

CLASSIFIER_FORMAT = "slip-classifier"  # what a fine-tuning checkpoint's "classifier" entry is


def _prefixed(pattern: str, prefix: str) -> str:
    """A group_matcher regex of a submodule, for the same parameters seen from its parent as `prefix`.name."""
    return rf"^{prefix}\.(?:{pattern.removeprefix('^')})"


class ImageClassifier(nn.Module):
    """`tower` (pooled features of size `tower.num_features`) followed by a linear head of `num_classes` outputs.

    `spec` is the model spec the tower was built from (with its fine-tuning settings), kept so that a checkpoint
    can rebuild it.
    """

    def __init__(self, tower: nn.Module, num_classes: int, spec: ModelSpec, head_init_scale: float = 1e-3) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        if not (isinstance(head_init_scale, (int, float)) and not isinstance(head_init_scale, bool)
                and head_init_scale > 0):
            raise ValueError(f"head_init_scale must be a number > 0, got {head_init_scale!r}")
        self.tower, self.spec = tower, spec
        self.head = nn.Linear(tower.num_features, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            self.head.weight.mul_(head_init_scale)

    @property
    def num_classes(self) -> int:
        """The number of classes the head scores."""
        return self.head.out_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised images -> [B, num_classes] logits."""
        return self.head(self.tower(images))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The tower's parameter groups in depth order (timm's convention), seen from here; the head, matched by
        none, falls in the top group."""
        matcher = self.tower.group_matcher(coarse)
        grouped: dict[str, Any] = {}
        for name, rule in matcher.items():
            if isinstance(rule, str):
                grouped[name] = _prefixed(rule, "tower")
            else:
                grouped[name] = [(_prefixed(pattern, "tower"), order) for pattern, order in rule]
        return grouped

    def no_weight_decay(self) -> set[str]:
        """Parameters besides biases and norms that get no weight decay: the tower's (its embeddings)."""
        own = getattr(self.tower, "no_weight_decay", None)
        return {f"tower.{name}" for name in (own() if own is not None else ())}

    def describe(self) -> dict[str, Any]:
        """The checkpoint entry that rebuilds this classifier with `load_classifier`."""
        return {"format": CLASSIFIER_FORMAT, "spec": self.spec.to_dict(), "num_classes": self.num_classes}


def classifier_from_model(model: ImageTextModel, num_classes: int, drop_path_rate: float = 0.0,
                          head_init_scale: float = 1e-3) -> ImageClassifier:
    """A classifier whose tower is a copy of `model`'s image tower (weights included), built for fine-tuning."""
    spec = model.spec
    vision = spec.vision.for_finetuning(drop_path_rate)
    finetuned = dataclasses.replace(spec, vision=vision)
    tower = vision.build_tower(spec.preprocess.image_size, spec.head.embed_dim)
    tower.load_state_dict(model.visual.state_dict())
    return ImageClassifier(tower, num_classes, finetuned, head_init_scale)


def layer_decay_groups(classifier: ImageClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-decay parameter groups of `classifier`: each group's "lr_scale" is layer_decay ** (depth
    from the top), and biases, norms and the tower's embeddings get no weight decay."""
    from timm.optim import param_groups_layer_decay

    positive_fraction("layer_decay", layer_decay)
    return param_groups_layer_decay(classifier, weight_decay=weight_decay,
                                    no_weight_decay_list=sorted(classifier.no_weight_decay()),
                                    layer_decay=layer_decay)


def load_classifier(path: str | os.PathLike) -> ImageClassifier:
    """The fine-tuned classifier that `python -m slip.finetune` saved in checkpoint `path`."""
    from slip.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    entry = checkpoint.get("classifier")
    if not isinstance(entry, dict) or entry.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path}: not a fine-tuned classifier checkpoint (python -m slip.finetune writes "
                              "them); for an image-text model use slip.load_pretrained")
    spec = ModelSpec.from_dict(entry["spec"])
    tower = spec.vision.build_tower(spec.preprocess.image_size, spec.head.embed_dim)
    classifier = ImageClassifier(tower, int(entry["num_classes"]), spec)
    classifier.load_state_dict(checkpoint["model"])
    return classifier.eval()
