"""Checkpoints of the original SLIP code (`{'state_dict': module.*, 'args': Namespace(model=...)}`) in our terms."""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slip.checkpoint import CheckpointError, CheckpointInfo
from slip.interop.common import Converted, count_blocks, prefix_text_keys, text_kwargs
from slip.inputs import IMAGE_TEXT, SSL_VIEWS
from slip.models import ALL_INPUTS, IMAGENET_MEAN, IMAGENET_STD, vit_spec

__all__ = ["from_original_slip", "is_original_slip"]

# The original SLIP code names its models OBJECTIVE_ARCH (e.g. SLIP_VITB16); these tables read that field.
SLIP_OBJECTIVE_INPUTS: Mapping[str, tuple[str, ...]] = {
    "SLIP": ALL_INPUTS,
    "CLIP": IMAGE_TEXT,
    "SIMCLR": SSL_VIEWS,
}
SLIP_OBJECTIVE_NAMES: Mapping[str, str] = {"SLIP": "SLIPLoss", "CLIP": "CLIPLoss", "SIMCLR": "SimCLRLoss"}
SLIP_VISION_HEADS: Mapping[str, int] = {"VITS16": 12, "VITB16": 12, "VITL16": 16}


def is_original_slip(content: Any) -> bool:
    """Whether an unpickled checkpoint has the original SLIP code's layout."""
    return isinstance(content, Mapping) and "state_dict" in content and "args" in content


def from_original_slip(checkpoint: Mapping[str, Any], path: Path) -> Converted:
    """An original SLIP checkpoint in our terms; raises CheckpointError for a model name SLIP does not define."""
    model_name = str(getattr(checkpoint["args"], "model", ""))
    objective, _, vision = model_name.partition("_")
    if objective not in SLIP_OBJECTIVE_INPUTS or vision not in SLIP_VISION_HEADS:
        raise CheckpointError(
            f"{path}: args.model={model_name!r} is not a SLIP model name "
            f"({'/'.join(SLIP_OBJECTIVE_INPUTS)} + _ + {'/'.join(SLIP_VISION_HEADS)})"
        )
    state = {re.sub(r"^module\.", "", k): v.float() for k, v in checkpoint["state_dict"].items()}
    state = {prefix_text_keys(k): v for k, v in state.items()}
    width = state["visual.patch_embed.proj.weight"].shape[0]
    patch = state["visual.patch_embed.proj.weight"].shape[-1]
    grid = round((state["visual.pos_embed"].shape[1] - 1) ** 0.5)
    kwargs: dict[str, Any] = dict(
        patch_size=patch, image_size=patch * grid, vision_width=width,
        vision_heads=SLIP_VISION_HEADS[vision], vision_layers=count_blocks(state, "visual.blocks."),
        inputs=SLIP_OBJECTIVE_INPUTS[objective], image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )
    if "text_projection" in state:
        kwargs.update(text_kwargs(state, "text."), embed_dim=state["text_projection"].shape[1])
    if "image_mlp.layer1.weight" in state:
        kwargs.update(ssl_mlp_dim=state["image_mlp.layer1.weight"].shape[0],
                    ssl_embed_dim=state["image_mlp.layer3.weight"].shape[0])
    try:
        spec = vit_spec(**kwargs)
    except ValueError as error:
        raise CheckpointError(f"{path}: its weights imply no valid model: {error}") from None
    return Converted(spec, state, CheckpointInfo("slip-original", SLIP_OBJECTIVE_NAMES.get(objective)))
