"""OpenAI CLIP's layout (its released `.pt` files, and open_clip's OpenAI-style models) to ours and back.

ViTs map onto our timm ViT in `openai_layout` (LayerNorm before the blocks, QuickGELU, no patch bias); the
ModifiedResNet and the text tower already share CLIP's parameter names (the text tower under "text.").
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from slip.checkpoint import CheckpointError, CheckpointInfo
from slip.error_text import first_line
from slip.interop.common import (Converted, ExportError, count_blocks, prefix_text_keys, text_kwargs,
                                 unprefix_text_keys)
from slip.inputs import IMAGE_TEXT
from slip.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTextModel, ViTSpec, resnet_spec, vit_spec

__all__ = ["OPENAI_METADATA_KEYS", "from_openai", "is_openai_state", "openai_vit_key_to_ours", "read_torchscript_tensors",
           "to_openai"]

OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# OpenAI's ViT parameter names and ours: (theirs, ours, where the text sits in a key), applied in order.
_VIT_NAMES = (
    ("visual.conv1.", "visual.patch_embed.proj.", "start"),
    ("visual.class_embedding", "visual.cls_token", "whole"),
    ("visual.positional_embedding", "visual.pos_embed", "whole"),
    ("visual.ln_pre.", "visual.norm_pre.", "start"),
    ("visual.ln_post.", "visual.norm.", "start"),
    ("visual.proj", "image_projection", "whole"),
    ("visual.transformer.resblocks.", "visual.blocks.", "start"),
    (".ln_1.", ".norm1.", "inside"),
    (".ln_2.", ".norm2.", "inside"),
    (".attn.in_proj_weight", ".attn.qkv.weight", "end"),
    (".attn.in_proj_bias", ".attn.qkv.bias", "end"),
    (".attn.out_proj.", ".attn.proj.", "inside"),
    (".mlp.c_fc.", ".mlp.fc1.", "inside"),
    (".mlp.c_proj.", ".mlp.fc2.", "inside"),
)
_ANCHORS = {"start": ("^", ""), "whole": ("^", "$"), "end": ("", "$"), "inside": ("", "")}


def openai_vit_key_to_ours(key: str) -> str:
    """An OpenAI-layout ViT parameter name as our timm ViT names it (other keys unchanged)."""
    return _renamed(key, to_ours=True)


def _renamed(key: str, to_ours: bool) -> str:
    """`key` with every name of `_VIT_NAMES` replaced: OpenAI's by ours (`to_ours`) or ours by OpenAI's."""
    for theirs, ours, where in _VIT_NAMES:
        before, after = (theirs, ours) if to_ours else (ours, theirs)
        head, tail = _ANCHORS[where]
        key = re.sub(head + re.escape(before) + tail, after, key)
    return key


def is_openai_state(content: Any) -> bool:
    """Whether `content` is an OpenAI-CLIP-layout state dict (ViT or ModifiedResNet)."""
    return isinstance(content, Mapping) and "text_projection" in content and (
        "visual.layer1.0.conv1.weight" in content or "visual.proj" in content)


def from_openai(state: Mapping[str, torch.Tensor], info: CheckpointInfo | None = None) -> Converted:
    """An OpenAI CLIP state dict (ViT or ModifiedResNet) in our terms (text heads: width / 64, CLIP's rule)."""
    state = {k: v.float() for k, v in state.items() if k not in OPENAI_METADATA_KEYS}
    common: dict[str, Any] = dict(text_kwargs(state), embed_dim=state["text_projection"].shape[1],
                                inputs=IMAGE_TEXT, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    if "visual.proj" in state:
        width = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        spec = vit_spec(**common, openai_layout=True, patch_size=patch, image_size=patch * grid,
                        vision_width=width, vision_heads=width // 64,
                        vision_layers=count_blocks(state, "visual.transformer.resblocks."))
        converted = {}
        for key, value in state.items():
            new_key = prefix_text_keys(_renamed(key, to_ours=True) if key.startswith("visual.") else key)
            if new_key in ("visual.cls_token", "visual.pos_embed"):
                value = value.reshape(1, -1, width)
            converted[new_key] = value
    else:
        width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        spec = resnet_spec(**common, image_size=grid * 32, vision_width=width, vision_heads=width * 32 // 64,
                           vision_layers=tuple(count_blocks(state, f"visual.layer{i}.") for i in range(1, 5)))
        converted = {prefix_text_keys(key): value for key, value in state.items()}
    return Converted(spec, converted, info or CheckpointInfo("openai-clip", "CLIPLoss"))


def to_openai(model: ImageTextModel) -> dict[str, torch.Tensor]:
    """The image-text part of `model` as an OpenAI CLIP state dict (what open_clip's OpenAI-style models load).

    Needs a text tower, and a ViT in `openai_layout` or a ModifiedResNet; the SSL head has no place there and is
    left out (the caller says so). Raises ExportError naming the missing piece otherwise.
    """
    vision = model.spec.vision
    if model.text is None:
        raise ExportError("the model has no text tower (an SSL-only objective): CLIP layouts need one")
    if isinstance(vision, ViTSpec) and not vision.openai_layout:
        raise ExportError("a SLIP-layout timm ViT (no LayerNorm before the blocks, patch bias, GELU) has no "
                          "OpenAI CLIP layout; export it with its timm tower instead")
    state = {key: value.detach().clone() for key, value in model.state_dict().items()
             if not key.startswith("image_mlp.")}
    if isinstance(vision, ViTSpec):
        width = vision.width
        converted = {}
        for key, value in state.items():
            new_key = _renamed(key, to_ours=False) if key.startswith(("visual.", "image_projection")) else key
            if new_key == "visual.class_embedding":
                value = value.reshape(width)
            elif new_key == "visual.positional_embedding":
                value = value.reshape(-1, width)
            converted[unprefix_text_keys(new_key)] = value
        return converted
    return {unprefix_text_keys(key): value for key, value in state.items()}


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive (OpenAI's released files); its code is never called."""
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise CheckpointError(f"{path}: unreadable TorchScript archive ({first_line(error)})") from None
    return {name: tensor.detach().clone() for name, tensor in scripted.state_dict().items()}
