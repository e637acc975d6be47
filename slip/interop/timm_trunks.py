"""timm trunks: which registered timm name builds exactly our SLIP-layout ViT, compared by structure.

open_clip builds a timm image tower by registered name only (it passes no size arguments to timm), so exporting
and reading open_clip directories both need the name whose trunk is our tower.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Structure", "first_difference", "structure", "timm_name_for", "timm_trunk"]


Structure = tuple[list[tuple], list[tuple]]


def structure(module: nn.Module) -> Structure:
    """Everything that decides what a module computes: each submodule's class and plain settings (init-only and
    bookkeeping attributes left out), and the names and shapes of its tensors."""
    skip = {"training", "grad_checkpointing", "fix_init", "weight_init_mode"}
    plain = (int, float, str, bool, tuple, type(None))
    modules = []
    for name, sub in module.named_modules():
        settings = tuple(sorted((key, value) for key, value in vars(sub).items()
                                if not key.startswith("_") and key not in skip and isinstance(value, plain)))
        modules.append((name or "<trunk>", type(sub).__name__, settings))
    tensors = [(name, tuple(t.shape)) for name, t in module.state_dict().items()]
    return modules, tensors


def first_difference(ours: Structure, theirs: Structure) -> str:
    """The first place where two structures differ, in words."""
    for mine, other in zip(ours[0], theirs[0]):
        if mine == other:
            continue
        if mine[:2] == other[:2]:
            wanted, found = dict(mine[2]), dict(other[2])
            keys = [k for k in sorted(set(wanted) | set(found)) if wanted.get(k) != found.get(k)]
            theirs_text = ", ".join(f"{k}={found.get(k)!r}" for k in keys)
            ours_text = ", ".join(f"{k}={wanted.get(k)!r}" for k in keys)
            return f"{mine[0]} ({theirs_text} where ours has {ours_text})"
        return f"{other[0]} is a {other[1]} where ours has {mine[0]}, a {mine[1]}"
    for mine, other in zip(ours[1], theirs[1]):
        if mine != other:
            return f"tensor {other[0]} {other[1]} where ours is {mine[0]} {mine[1]}"
    return f"{len(theirs[0])} modules and {len(theirs[1])} tensors where ours has {len(ours[0])} and {len(ours[1])}"


def timm_trunk(name: str, pool: str | None, drop_path_rate: float) -> nn.Module:
    """The trunk open_clip's TimmModel builds for `name` (on the meta device: structure only, no memory).

    It is built with timm's `dynamic_img_size` on, as our towers are: that only resamples the positional
    embedding for other image sizes, so at the trunk's own size it computes what open_clip's trunk computes.
    """
    import timm

    kwargs: dict = {"dynamic_img_size": True}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    with torch.device("meta"):
        trunk = timm.create_model(name, pretrained=False, **kwargs)
        trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
    return trunk


def timm_name_for(visual: nn.Module, image_size: int, patch_size: int,
                  drop_path_rate: float = 0.0) -> tuple[str | None, str]:
    """The registered timm name whose model (token pooling, no classifier) is exactly `visual`, or None and why.

    Candidates are the timm ViTs named `vit_*patch<P>_*<S>*`, tried shortest name first.
    """
    import timm

    ours = structure(visual)
    closest = ""
    names = timm.list_models(f"vit_*patch{patch_size}_*{image_size}*", module="vision_transformer")
    for name in sorted(names, key=lambda n: (len(n), n)):
        try:
            theirs = structure(timm_trunk(name, "token", drop_path_rate))
        except Exception:  # noqa: BLE001 - a candidate timm cannot build this way is simply not a match
            continue
        if theirs == ours:
            return name, ""
        if theirs[1] == ours[1] and not closest:  # the same weights, computed differently
            closest = f"; {name} has the same weight shapes but differs at {first_difference(ours, theirs)}"
    return None, closest
