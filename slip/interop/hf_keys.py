"""The tensor correspondence between our CLIP models and transformers' `CLIPModel` (see `slip.interop.hf`):
one link per tensor of ours, naming the transformers tensor(s) it becomes, and the conversions both ways."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from slip.checkpoint import CheckpointError
from slip.error_text import one_line
from slip.models import ModelSpec, build_model

__all__ = ["from_hf_state", "links", "our_shapes", "to_hf_state"]

Link = tuple[str, list[str], str]


def _qkv(prefix: str, kind: str) -> list[str]:
    return [f"{prefix}.self_attn.{part}_proj.{kind}" for part in ("q", "k", "v")]


# Our parameter names in one Transformer block of each tower, by role.
_TEXT_BLOCK = {"norm1": "ln_1", "qkv_weight": "attn.in_proj_weight", "qkv_bias": "attn.in_proj_bias",
               "out": "attn.out_proj", "norm2": "ln_2", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
_VISION_BLOCK = {"norm1": "norm1", "qkv_weight": "attn.qkv.weight", "qkv_bias": "attn.qkv.bias",
                 "out": "attn.proj", "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
# transformers' names of the same roles (the fused q/k/v projection is split, see _qkv).
_THEIR_BLOCK = {"norm1": "layer_norm1", "out": "self_attn.out_proj", "norm2": "layer_norm2", "fc1": "mlp.fc1",
                "fc2": "mlp.fc2"}


def _weight_and_bias(ours: str, theirs: str) -> list[Link]:
    """The links of one layer's weight and bias, kept as they are."""
    return [(f"{ours}.{kind}", [f"{theirs}.{kind}"], "same") for kind in ("weight", "bias")]


def _block_links(ours: str, theirs: str, names: Mapping[str, str]) -> list[Link]:
    """The links of one Transformer block whose parameters are named `names` on our side."""
    found = [(f"{ours}.{names['qkv_weight']}", _qkv(theirs, "weight"), "split3"),
             (f"{ours}.{names['qkv_bias']}", _qkv(theirs, "bias"), "split3")]
    for role, their_name in _THEIR_BLOCK.items():
        found += _weight_and_bias(f"{ours}.{names[role]}", f"{theirs}.{their_name}")
    return found


def _blocks_links(ours: str, theirs: str, layers: int, names: Mapping[str, str]) -> list[Link]:
    """The links of a tower's `layers` Transformer blocks, our `{ours}.{i}` to their `{theirs}.{i}`."""
    return [link for i in range(layers) for link in _block_links(f"{ours}.{i}", f"{theirs}.{i}", names)]


def links(spec: ModelSpec) -> list[Link]:
    """(our key, transformers keys, how) for every tensor of a ViT `spec`; how: same, split3, vector, matrix or
    transpose."""
    found: list[Link] = [
        ("logit_scale", ["logit_scale"], "same"),
        ("text.token_embedding.weight", ["text_model.embeddings.token_embedding.weight"], "same"),
        ("text.positional_embedding", ["text_model.embeddings.position_embedding.weight"], "same"),
    ]
    found += _blocks_links("text.transformer.resblocks", "text_model.encoder.layers", spec.text.layers, _TEXT_BLOCK)
    found += _weight_and_bias("text.ln_final", "text_model.final_layer_norm")
    found += [
        ("visual.cls_token", ["vision_model.embeddings.class_embedding"], "vector"),
        ("visual.patch_embed.proj.weight", ["vision_model.embeddings.patch_embedding.weight"], "same"),
        ("visual.pos_embed", ["vision_model.embeddings.position_embedding.weight"], "matrix"),
    ]
    found += _weight_and_bias("visual.norm_pre", "vision_model.pre_layrnorm")
    found += _blocks_links("visual.blocks", "vision_model.encoder.layers", spec.vision.layers, _VISION_BLOCK)
    found += _weight_and_bias("visual.norm", "vision_model.post_layernorm")
    found += [
        ("image_projection", ["visual_projection.weight"], "transpose"),
        ("text_projection", ["text_projection.weight"], "transpose"),
    ]
    return found


def _to_theirs(value: torch.Tensor, how: str) -> list[torch.Tensor]:
    if how == "split3":
        return list(value.chunk(3, dim=0))
    if how in ("vector", "matrix"):
        return [value.reshape(value.shape[-1]) if how == "vector" else value.reshape(-1, value.shape[-1])]
    if how == "transpose":
        return [value.t()]
    return [value]


def _to_ours(values: list[torch.Tensor], how: str) -> torch.Tensor:
    if how == "split3":
        return torch.cat(values, dim=0)
    if how in ("vector", "matrix"):
        return values[0].reshape(1, -1, values[0].shape[-1])
    if how == "transpose":
        return values[0].t().contiguous()
    return values[0]


def _their_shapes(our_shape: torch.Size, how: str) -> list[tuple[int, ...]]:
    """The transformers shapes a tensor of ours with `our_shape` becomes."""
    return [tuple(t.shape) for t in _to_theirs(torch.empty(our_shape, device="meta"), how)]


def our_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    """The exact state-dict shapes of the model `build_model(spec)` builds (on the meta device: free)."""
    with torch.device("meta"):
        model = build_model(spec)
    return {key: value.shape for key, value in model.state_dict().items()}


def to_hf_state(state: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Our tensors under transformers' names and shapes."""
    converted = {}
    for ours, theirs, how in links(spec):
        for key, value in zip(theirs, _to_theirs(state[ours].detach().cpu(), how)):
            converted[key] = value.clone(memory_format=torch.contiguous_format)  # safetensors: no sharing
    return converted


def from_hf_state(hf_state: Mapping[str, torch.Tensor], spec: ModelSpec, source: Path,
                  config_path: Path) -> dict[str, torch.Tensor]:
    """Our state dict from the transformers tensors, checking every key and shape against `spec` first."""
    try:
        shapes = our_shapes(spec)
    except ValueError as error:  # a builder's check that the config checks above did not anticipate
        raise CheckpointError(f"{config_path}: {one_line(error)}") from None
    linked = links(spec)
    expected: dict[str, tuple[int, ...]] = {}
    for ours, theirs, how in linked:
        expected.update(zip(theirs, _their_shapes(shapes[ours], how)))
    for key, shape in expected.items():
        if key not in hf_state:
            raise CheckpointError(f"{source}: missing weight {key}, which {config_path.name} implies")
        if tuple(hf_state[key].shape) != shape:
            raise CheckpointError(f"{source}: {key} has shape {list(hf_state[key].shape)}, "
                                  f"{config_path.name} implies {list(shape)}")
    for key in hf_state:
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected weight {key}, which a CLIPModel of "
                                  f"{config_path.name} does not have")
    return {ours: _to_ours([hf_state[key] for key in theirs], how) for ours, theirs, how in linked}

