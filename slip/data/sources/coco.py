"""COCO Captions in its official annotation layout."""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from slip.data.decode import DEFAULT_MAX_PIXELS
from slip.data.sources.base import FileSource, PackedRecords, load_json, record_field

__all__ = ["CocoCaptionsSource"]


class CocoCaptionsSource(FileSource):
    """COCO Captions: one record per image with all its captions (SLIP's ``--dataset coco``).

    Accepts the official annotations file (e.g. ``captions_train2017.json``): ``"annotations"`` is a list of
    ``{"image_id": int, "caption": str, ...}``, ``"images"`` a list of ``{"id": int, "file_name": str, ...}``.
    Images are read from ``{image_root}/{file_name}`` (so ``image_root`` is e.g. ``/data/coco/train2017``).
    Without an ``"images"`` list, file names are ``{image_id:012d}.jpg``, as SLIP assumes. Images without
    captions are left out; records are in order of first appearance in ``"annotations"``.
    """

    def __init__(self, annotations_json: str, image_root: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        path = os.fspath(annotations_json)
        data = load_json(path)
        annotations = record_field(data, "annotations", path, "the top level")
        file_names = None
        if isinstance(data, Mapping) and "images" in data:
            file_names = {
                record_field(image, "id", path, f"images[{i}]"): record_field(image, "file_name", path, f"images[{i}]")
                for i, image in enumerate(data["images"])
            }
        captions: dict[Any, list[Any]] = defaultdict(list)
        for i, annotation in enumerate(annotations):
            image_id = record_field(annotation, "image_id", path, f"annotations[{i}]")
            captions[image_id].append(record_field(annotation, "caption", path, f"annotations[{i}]"))

        def records() -> Iterator[list[Any]]:
            for image_id, texts in captions.items():
                if file_names is None:
                    if not isinstance(image_id, int):
                        detail = "is not an int and there is no images list"
                        raise ValueError(f"{path}: image_id {image_id!r} {detail}")
                    yield [f"{image_id:012d}.jpg", *texts]
                elif image_id in file_names:
                    yield [file_names[image_id], *texts]
                else:
                    raise ValueError(f"{path}: image_id {image_id!r} is not in the images list")

        super().__init__(PackedRecords(records()), os.fspath(image_root), path, max_pixels)
