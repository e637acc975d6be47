"""The names of a batch's inputs, shared by the models, the objectives, the view recipes and the training task.

Besides the fixed inputs (`ALL_INPUTS`) a batch may hold more global crops, `aug3` ... `augN` (`global_views`: with
`aug1`, `aug2` the N global views of a multi-crop objective such as DINO, seen by the student and the teacher), and
any number of local crops, `local1` ... `localM` (`local_views`): smaller SSL views that a student sees and a teacher
does not. Whether a name is one is `is_global_view`'s and `is_local_view`'s to say, here and nowhere else.
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ALL_INPUTS", "GLOBAL_VIEW_PREFIX", "IMAGE_TEXT", "IMAGE_VIEWS", "LOCAL_VIEW_PREFIX", "SSL_VIEWS",
           "global_views", "is_global_view", "is_image_view", "is_input", "is_local_view", "local_views",
           "ordered_inputs"]

IMAGE_TEXT = ("image", "text")
"""The image-text pair: the CLIP view and its caption's tokens."""
SSL_VIEWS = ("aug1", "aug2")
"""The two augmented views that the SSL head embeds (the first two global crops of multi-crop objectives)."""
IMAGE_VIEWS = ("image", *SSL_VIEWS)
"""Every fixed input that is an image: the CLIP view and the SSL views (more global and local views are images too)."""
ALL_INPUTS = (*IMAGE_TEXT, *SSL_VIEWS)
"""Every fixed input a batch may hold, in the order objectives list them (more global views, then local views,
come after them)."""
GLOBAL_VIEW_PREFIX = "aug"
"""Global view k (from 1) is named f"{GLOBAL_VIEW_PREFIX}{k}": the SSL views are global views 1 and 2."""
LOCAL_VIEW_PREFIX = "local"
"""Local view k (from 1) is named f"{LOCAL_VIEW_PREFIX}{k}"."""


def _numbered(kind: str, prefix: str, count: int) -> tuple[str, ...]:
    """(f"{prefix}1", ..., f"{prefix}{count}"), `count` checked."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"the number of {kind} views must be an integer >= 0, got {count!r}")
    return tuple(f"{prefix}{index}" for index in range(1, count + 1))


def global_views(count: int) -> tuple[str, ...]:
    """The names of `count` global crops: ("aug1", ..., f"aug{count}"); `global_views(2) == SSL_VIEWS`."""
    return _numbered("global", GLOBAL_VIEW_PREFIX, count)


def local_views(count: int) -> tuple[str, ...]:
    """The names of `count` local crops: ("local1", ..., f"local{count}")."""
    return _numbered("local", LOCAL_VIEW_PREFIX, count)


def _index(name: object, prefix: str) -> int | None:
    """k of a name f"{prefix}{k}" (k >= 1, no leading zero), else None."""
    if not isinstance(name, str) or not name.startswith(prefix):
        return None
    digits = name[len(prefix):]
    if not (digits.isascii() and digits.isdigit()) or digits.startswith("0"):
        return None
    return int(digits)


def is_global_view(name: object) -> bool:
    """Whether `name` names a global crop: "aug1", "aug2", "aug3", ... (not "aug", "aug0" or "aug01")."""
    return _index(name, GLOBAL_VIEW_PREFIX) is not None


def is_local_view(name: object) -> bool:
    """Whether `name` names a local crop: "local1", "local2", ... (not "local", "local0" or "local01")."""
    return _index(name, LOCAL_VIEW_PREFIX) is not None


def is_image_view(name: object) -> bool:
    """Whether `name` is an image input: one of `IMAGE_VIEWS`, a global view or a local view."""
    return name in IMAGE_VIEWS or is_global_view(name) or is_local_view(name)


def is_input(name: object) -> bool:
    """Whether `name` is an input a batch may hold: one of `ALL_INPUTS`, a global view or a local view."""
    return name in ALL_INPUTS or is_global_view(name) or is_local_view(name)


def _order(name: str) -> tuple[int, int]:
    """Sort key of an input: the image-text pair, global views by number, local views by number, anything else."""
    if name in IMAGE_TEXT:
        return IMAGE_TEXT.index(name), 0
    for rank, prefix in enumerate((GLOBAL_VIEW_PREFIX, LOCAL_VIEW_PREFIX), start=len(IMAGE_TEXT)):
        index = _index(name, prefix)
        if index is not None:
            return rank, index
    return len(IMAGE_TEXT) + 2, 0


def ordered_inputs(names: Iterable[str]) -> tuple[str, ...]:
    """`names` (inputs, see `is_input`) without repeats, in the canonical order: `ALL_INPUTS`', then further global
    views and then local views, each by number."""
    return tuple(sorted(dict.fromkeys(names), key=_order))
