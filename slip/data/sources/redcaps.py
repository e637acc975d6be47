"""RedCaps: the combined annotations JSON of SLIP's scripts, images per subreddit."""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from slip.data.decode import DEFAULT_MAX_PIXELS
from slip.data.sources.base import FileSource, PackedRecords, load_json, record_field

__all__ = ["RedCapsSource"]


class RedCapsSource(FileSource):
    """RedCaps: annotations combined into one JSON file (SLIP's ``redcaps/combine_captions.py`` output).

    Accepts a top-level list of annotations (what that script writes) or a dict with an ``"annotations"``
    list (an original per-subreddit file). Each annotation has ``"image_id"``, ``"subreddit"`` and
    ``"caption"``; its image is ``{image_root}/{subreddit}/{image_id}.jpg`` (the redcaps-downloader layout).
    """

    def __init__(self, combined_json: str, image_root: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        path = os.fspath(combined_json)
        data = load_json(path)
        annotations = data if isinstance(data, list) else record_field(data, "annotations", path, "the top level")

        def records() -> Iterator[list[Any]]:
            for i, annotation in enumerate(annotations):
                where = f"annotations[{i}]"
                image_id = record_field(annotation, "image_id", path, where)
                subreddit = record_field(annotation, "subreddit", path, where)
                yield [f"{subreddit}/{image_id}.jpg", record_field(annotation, "caption", path, where)]

        super().__init__(PackedRecords(records()), os.fspath(image_root), path, max_pixels)
