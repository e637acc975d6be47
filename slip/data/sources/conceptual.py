"""Conceptual Captions (CC3M, CC12M) in SLIP's layout: a trusted ``.npy`` of dicts and an image folder."""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from slip.data.decode import DEFAULT_MAX_PIXELS
from slip.data.sources.base import FileSource, PackedRecords, record_field

__all__ = ["ConceptualCaptionsSource"]


class ConceptualCaptionsSource(FileSource):
    """CC3M or CC12M in SLIP's layout: a ``.npy`` object array of dicts, one per downloaded image.

    CC3M entries are ``{"image_id": <file name, str or int>, "captions": [str, ...]}``; CC12M entries are
    ``{"image_name": "0.jpg", "image_id": 0, "captions": [str, ...]}``. The image is read from
    ``{image_root}/{image_name}`` when an entry has ``"image_name"``, else from ``{image_root}/{image_id}``.
    ``"captions"`` may also be a single string. The file is loaded with ``np.load(allow_pickle=True)``, which
    can run code: use only metadata you trust.
    """

    def __init__(self, metadata_npy: str, image_root: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        path = os.fspath(metadata_npy)
        try:
            entries = np.load(path, allow_pickle=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such metadata file") from None
        except (ValueError, OSError, pickle.UnpicklingError) as error:
            raise ValueError(f"{path}: not a readable .npy file: {error}") from None
        if not isinstance(entries, np.ndarray) or entries.ndim != 1:
            raise ValueError(f"{path}: expected a 1-d array of dicts, got {type(entries).__name__}")

        def records() -> Iterator[list[Any]]:
            for i, entry in enumerate(entries):
                where = f"entry {i}"
                if isinstance(entry, Mapping) and "image_name" in entry:
                    name = entry["image_name"]
                else:
                    name = record_field(entry, "image_id", path, where)
                texts = record_field(entry, "captions", path, where)
                if isinstance(texts, (str, bytes)) or texts is None:
                    texts = [texts]
                elif not isinstance(texts, Iterable):
                    raise ValueError(f"{path}: {where} has captions of type {type(texts).__name__}")
                yield [str(name), *texts]

        super().__init__(PackedRecords(records()), os.fspath(image_root), path, max_pixels)
