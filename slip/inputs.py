"""The names of a batch's inputs, shared by the models, the objectives, the view recipes and the training task.

Besides the fixed inputs (`ALL_INPUTS`) a batch may hold any number of local crops, `local1` ... `localM`
(`local_views`): smaller SSL views that a student sees and a teacher does not (DINO's multi-crop). Whether a
name is one is `is_local_view`'s to say, here and nowhere else.
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ALL_INPUTS", "IMAGE_TEXT", "IMAGE_VIEWS", "LOCAL_VIEW_PREFIX", "SSL_VIEWS", "is_image_view", "is_input",
           "is_local_view", "local_views", "ordered_inputs"]

IMAGE_TEXT = ("image", "text")
"""The image-text pair: the CLIP view and its caption's tokens."""
SSL_VIEWS = ("aug1", "aug2")
"""The two augmented views that the SSL head embeds (the global crops of multi-crop objectives)."""
IMAGE_VIEWS = ("image", *SSL_VIEWS)
"""Every fixed input that is an image: the CLIP view and the SSL views (local views are images too)."""
ALL_INPUTS = (*IMAGE_TEXT, *SSL_VIEWS)
"""Every fixed input a batch may hold, in the order objectives list them (local views come after them)."""
LOCAL_VIEW_PREFIX = "local"
"""Local view k (from 1) is named f"{LOCAL_VIEW_PREFIX}{k}"."""


def local_views(count: int) -> tuple[str, ...]:
    """The names of `count` local crops: ("local1", ..., f"local{count}")."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"the number of local views must be an integer >= 0, got {count!r}")
    return tuple(f"{LOCAL_VIEW_PREFIX}{index}" for index in range(1, count + 1))


def _local_index(name: object) -> int | None:
    """k of a local view's name f"local{k}" (k >= 1, no leading zero), else None."""
    if not isinstance(name, str) or not name.startswith(LOCAL_VIEW_PREFIX):
        return None
    digits = name[len(LOCAL_VIEW_PREFIX):]
    if not (digits.isascii() and digits.isdigit()) or digits.startswith("0"):
        return None
    return int(digits)


def is_local_view(name: object) -> bool:
    """Whether `name` names a local crop: "local1", "local2", ... (not "local", "local0" or "local01")."""
    return _local_index(name) is not None


def is_image_view(name: object) -> bool:
    """Whether `name` is an image input: one of `IMAGE_VIEWS` or a local view."""
    return name in IMAGE_VIEWS or is_local_view(name)


def is_input(name: object) -> bool:
    """Whether `name` is an input a batch may hold: one of `ALL_INPUTS` or a local view."""
    return name in ALL_INPUTS or is_local_view(name)


def ordered_inputs(names: Iterable[str]) -> tuple[str, ...]:
    """`names` (inputs, see `is_input`) without repeats, in the canonical order: `ALL_INPUTS`', then local views
    by number."""
    rank = {name: index for index, name in enumerate(ALL_INPUTS)}
    unique = dict.fromkeys(names)
    return tuple(sorted(unique, key=lambda name: (rank.get(name, len(rank)), _local_index(name) or 0)))
