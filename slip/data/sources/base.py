"""The `Source` protocol, and what the file-backed sources share: packed records, index checks, JSON fields.

A *source* is any object with ``__len__()`` and ``load(index) -> (RGB PIL image, [caption, ...])`` that raises
`BadSample` for a sample it cannot deliver.
"""
from __future__ import annotations

import array
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from slip.data.decode import BadSample, check_captions, read_image_file

__all__ = ["FileSource", "PackedRecords", "Source", "as_path", "check_index", "load_json", "record_field"]


class Source(Protocol):
    """A map-style collection of image-text records."""

    def __len__(self) -> int:
        """Number of records."""

    def load(self, index: int) -> tuple[Image.Image, list[str]]:
        """The RGB image and its captions (one or more) of record `index`; raises BadSample."""


def _encode(value: object) -> bytes:
    """Bytes stored for a metadata string; surrogates survive, so a bad caption is detected at load time."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return b""  # None or a non-text value: reads back as an empty caption


class PackedRecords:
    """Records of strings (image reference first, then captions) packed into a few numpy arrays.

    Millions of Python strings would be copied page by page into every DataLoader worker as reference counts
    change (copy-on-access after fork); flat arrays are shared for free.
    """

    def __init__(self, records: Iterable[Sequence[object]]) -> None:
        data = bytearray()
        string_ends, record_ends = array.array("q"), array.array("q")
        for record in records:
            for value in record:
                data += _encode(value)
                string_ends.append(len(data))
            record_ends.append(len(string_ends))
        self._data = np.frombuffer(data, dtype=np.uint8)
        self._string_ends = np.frombuffer(string_ends.tobytes(), dtype=np.int64)
        self._record_ends = np.frombuffer(record_ends.tobytes(), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._record_ends)

    def __getitem__(self, index: int) -> list[bytes]:
        first = int(self._record_ends[index - 1]) if index > 0 else 0
        last = int(self._record_ends[index])
        values = []
        for j in range(first, last):
            start = int(self._string_ends[j - 1]) if j > 0 else 0
            values.append(self._data[start : int(self._string_ends[j])].tobytes())
        return values


def as_path(value: bytes) -> str:
    """Inverse of `_encode` for file names (keeps undecodable bytes, so open() sees the original name)."""
    return value.decode("utf-8", "surrogatepass")


def check_index(index: int, length: int, owner: object) -> int:
    """A sequence index of `owner` (negative ones count from the end, as for lists) as a non-negative int."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"{type(owner).__name__} index must be an int, got {type(index).__name__}")
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for {type(owner).__name__} of {length} items")
    return int(index) % length


class FileSource:
    """Shared part of the sources whose records are (image path relative to a root, captions...)."""

    def __init__(self, records: PackedRecords, image_root: str, name: str, max_pixels: int) -> None:
        self._records, self.image_root, self._name, self.max_pixels = records, image_root, name, max_pixels

    def __len__(self) -> int:
        """Number of records."""
        return len(self._records)

    def image_path(self, index: int) -> str:
        """Path of record `index`'s image: root joined with its reference, normalised (no file access)."""
        index = check_index(index, len(self), self)
        return os.path.normpath(os.path.join(self.image_root, as_path(self._records[index][0])))

    def captions(self, index: int) -> list[str]:
        """The captions of record `index`, checked, without reading its image; raises BadSample."""
        index = check_index(index, len(self), self)
        return check_captions(self._records[index][1:], f"{self._name}[{index}]")

    def load(self, index: int) -> tuple[Image.Image, list[str]]:
        """The RGB image and the captions of record `index`; raises BadSample."""
        index = check_index(index, len(self), self)
        captions = self.captions(index)
        image_ref = self._records[index][0]
        if not image_ref:
            raise BadSample("missing", f"{self._name}[{index}]", "no image path")
        return read_image_file(os.path.join(self.image_root, as_path(image_ref)), self.max_pixels), captions


def load_json(path: str) -> Any:
    """Parse the JSON file at `path`, with errors that name it."""
    try:
        with open(path, "rb") as file:
            return json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such annotation file") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None


def record_field(record: Any, key: str, path: str, where: str) -> Any:
    """record[key], or a ValueError naming the file, the record and the key."""
    if not isinstance(record, Mapping) or key not in record:
        raise ValueError(f"{path}: {where} has no {key!r} field")
    return record[key]
