"""Readers of image-text data: map-style sources, the dataset that applies views, and a WebDataset stream.

A *source* is any object with ``__len__()`` and ``load(index) -> (RGB PIL image, [caption, ...])`` that raises
`BadSample` for a sample it cannot deliver. Sources here read CSV/TSV files and the SLIP paper's datasets in
their published layouts (COCO, CC3M, CC12M, RedCaps, YFCC15M); `slip.data.synthetic.SyntheticShapes` is
another. `ImageTextDataset` turns a source into training samples: it picks one caption, applies a transform
(``transform(image, caption) -> dict of tensors``), and replaces bad samples by others so batches keep
their size. `WebDatasetStream` reads WebDataset tar shards (as img2dataset writes them) as a stream.

Every sample dict also carries ``"_skipped"`` ({kind: count} of the bad samples passed over to produce it)
and ``"_skipped_examples"`` (a few one-line descriptions of them); `slip.data.loader.collate` sums them.

Randomness (caption choice, augmentation) is a pure function of (seed, epoch, item), never of the worker
layout, and leaves the caller's global random generators as they were.

Metadata files are trusted: the ``.npy`` (CC3M/CC12M) and ``.pkl`` (YFCC15M) files are unpickled, which can
run code, so only point these readers at metadata you made or got from a source you trust.
"""
from __future__ import annotations

import array
import contextlib
import csv
import glob
import hashlib
import io
import json
import os
import pickle
import posixpath
import random
import re
import tarfile
import warnings
import zipfile
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from slip.distributed import WorldInfo

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_SKIPPED_EXAMPLES",
    "BadSample",
    "CocoCaptionsSource",
    "ConceptualCaptionsSource",
    "CsvSource",
    "ImageTextDataset",
    "RedCapsSource",
    "Source",
    "Transform",
    "WebDatasetStream",
    "YFCC15MSource",
    "brace_expand",
    "check_caption",
    "decode_image",
    "derive_seed",
    "expand_urls",
    "read_image_file",
    "to_rgb",
]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS; larger images are decompression bombs
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # WebDataset image members, in order of preference
MAX_SKIPPED_EXAMPLES = 5
_MAX_MEMBER_BYTES = 256 << 20  # tar members above this are not read into memory
_TAR_EXTENSIONS = frozenset({*IMAGE_EXTENSIONS, "txt", "json"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

Transform = Callable[[Image.Image, str], Mapping[str, Tensor]]
"""Maps (RGB image, caption) to named tensors, e.g. {"image": [3,H,W], "text": [L], "aug1": ...}."""


class Source(Protocol):
    """A map-style collection of image-text records."""

    def __len__(self) -> int:
        """Number of records."""

    def load(self, index: int) -> tuple[Image.Image, list[str]]:
        """The RGB image and its captions (one or more) of record `index`; raises BadSample."""


class DataError(RuntimeError):
    """The data is too broken to go on (e.g. a long run of bad samples); the message names examples."""


class BadSample(Exception):
    """A sample that cannot be used: `kind` says why (e.g. "corrupt"), `where` the file/member/record."""

    def __init__(self, kind: str, where: str, detail: str = "") -> None:
        self.kind, self.where, self.detail = kind, where, " ".join(str(detail).split())
        super().__init__(f"{kind}: {where}" + (f" ({self.detail})" if self.detail else ""))

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        """Pickle with the constructor's arguments (the default would pass only the message)."""
        return (type(self), (self.kind, self.where, self.detail))


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a stable function of `parts` (ints and strings), across processes and runs."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------------------
# Images and captions


def read_image_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode the image file at `path` into RGB; raises BadSample (missing, unreadable, ...)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise BadSample("missing", path) from None
    except OSError as error:
        raise BadSample("unreadable", path, error.strerror or type(error).__name__) from None
    return decode_image(data, path, max_pixels)


def decode_image(data: bytes, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB image, rejecting images of more than `max_pixels` pixels.

    The pixel limit is checked from the header, before any pixel is decoded; Pillow's own (global) hard
    limit of twice ``Image.MAX_IMAGE_PIXELS`` still applies on top of it. Truncated files are rejected.
    """
    if not data:
        raise BadSample("empty_file", where, "zero bytes")
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; Pillow's warning for its global limit would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                size = f"{image.width}x{image.height} pixels > max_pixels={max_pixels}"
                raise BadSample("decompression_bomb", where, size)
            image.load()
    except BadSample:
        raise
    except Image.DecompressionBombError as error:
        raise BadSample("decompression_bomb", where, str(error)) from None
    except UnidentifiedImageError:
        raise BadSample("corrupt", where, "not an image format Pillow can read") from None
    # Decoders fed untrusted bytes raise OSError, SyntaxError, ValueError, struct.error...: all mean corrupt.
    except Exception as error:  # noqa: BLE001
        raise BadSample("corrupt", where, f"{type(error).__name__}: {error}") from None
    return to_rgb(image, where)


def to_rgb(image: Image.Image, where: str = "<image>") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels are composited onto white (palette transparency included); 16-bit modes keep their
    8 most significant bits (values are assumed to span 0..65535); float mode "F" is clipped to 0..255; CMYK
    uses Pillow's plain conversion (no colour profile). A mode Pillow cannot convert raises
    BadSample("unsupported_mode").
    """
    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if mode in _SIXTEEN_BIT_MODES:
            pixels = np.asarray(image).astype(np.int64)
            return Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
        if mode == "F":
            pixels = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
            return Image.fromarray(pixels, "L").convert("RGB")
        if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise BadSample("unsupported_mode", where, f"mode {mode}: {error}") from None


def check_caption(raw: str | bytes | None, where: str) -> str:
    """Return `raw` as text, or raise BadSample for non-UTF-8 ("bad_caption_encoding") or blank captions."""
    if raw is None:
        raise BadSample("empty_caption", where, "no caption")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadSample("bad_caption_encoding", where, f"invalid UTF-8 at byte {error.start}") from None
    elif isinstance(raw, str):
        text = raw
        try:  # lone surrogates: undecodable bytes from the CSV reader, or escapes in JSON
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            detail = f"not valid Unicode at character {error.start}"
            raise BadSample("bad_caption_encoding", where, detail) from None
    else:
        raise BadSample("bad_record", where, f"caption is a {type(raw).__name__}, not text")
    if not text.strip():
        raise BadSample("empty_caption", where, "blank caption")
    return text


def _check_captions(raws: Iterable[str | bytes | None], where: str) -> list[str]:
    """The valid captions among `raws`; raise the first caption's BadSample when none is valid."""
    captions: list[str] = []
    first_error: BadSample | None = None
    for raw in raws:
        try:
            captions.append(check_caption(raw, where))
        except BadSample as error:
            first_error = first_error or error
    if not captions:
        raise first_error or BadSample("empty_caption", where, "no captions")
    return captions


# ---------------------------------------------------------------------------------------------------------
# Compact record storage


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


# ---------------------------------------------------------------------------------------------------------
# Map-style sources


class _FileSource:
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
        return _check_captions(self._records[index][1:], f"{self._name}[{index}]")

    def load(self, index: int) -> tuple[Image.Image, list[str]]:
        """The RGB image and the captions of record `index`; raises BadSample."""
        index = check_index(index, len(self), self)
        captions = self.captions(index)
        image_ref = self._records[index][0]
        if not image_ref:
            raise BadSample("missing", f"{self._name}[{index}]", "no image path")
        return read_image_file(os.path.join(self.image_root, as_path(image_ref)), self.max_pixels), captions


def _infer_separator(path: str, sep: str | None) -> str:
    """The field separator: `sep` if given, else from the extension (.tsv: tab, .csv: comma)."""
    if sep is not None:
        if len(sep) != 1:
            raise ValueError(f"{path}: sep must be one character, got {sep!r}")
        return sep
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".tsv", ".csv"):
        raise ValueError(f"{path}: cannot infer the separator from extension {extension!r}; pass sep")
    return "\t" if extension == ".tsv" else ","


def _column(header: list[str], name: str, path: str) -> int:
    """Position of column `name` in `header`, or a ValueError listing the available columns."""
    if name not in header:
        raise ValueError(f"{path}: no column {name!r}; available columns: {', '.join(map(repr, header))}")
    return header.index(name)


_LARGEST_CSV_FIELD = 2**31 - 1  # the largest limit a C long holds on every platform


def read_csv_columns(path: str, columns: Sequence[str], sep: str | None = None) -> Iterator[tuple[int, list[str]]]:
    """(line number, the fields of `columns`) of every non-empty row of a CSV/TSV file with a header row.

    Short rows are padded with empty fields. Fields of any length are read (Python's csv module stops at
    131,072 characters by default). The separator comes from `sep` or the extension; errors name the file
    (and the line, for malformed CSV).
    """
    delimiter = _infer_separator(path, sep)
    default_limit = csv.field_size_limit(_LARGEST_CSV_FIELD)  # a process-wide setting: restored below
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as file:
            reader = csv.reader(file, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file, expected a header row")
            positions = [_column(header, name, path) for name in columns]
            width = max(positions) + 1
            for row in reader:
                if row:
                    row += [""] * (width - len(row))
                    yield reader.line_num, [row[at] for at in positions]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such CSV file") from None
    except csv.Error as error:
        raise ValueError(f"{path}: line {reader.line_num}: {error}") from None
    finally:
        csv.field_size_limit(default_limit)


class CsvSource(_FileSource):
    """Images and captions listed in a CSV or TSV file with a header row (open_clip's layout).

    Image paths are relative to the directory of the CSV file (absolute paths work too). Captions that are
    not valid UTF-8 are reported per record at load time ("bad_caption_encoding"), not for the whole file.
    Captions of any length are read, and truncated to the context length by the tokenizer.
    """

    def __init__(
        self,
        path: str,
        image_column: str = "filepath",
        caption_column: str = "title",
        sep: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        path = os.fspath(path)
        rows = read_csv_columns(path, (image_column, caption_column), sep)
        super().__init__(PackedRecords(fields for _, fields in rows), os.path.dirname(os.path.abspath(path)), path,
                         max_pixels)


def _load_json(path: str) -> Any:
    """Parse the JSON file at `path`, with errors that name it."""
    try:
        with open(path, "rb") as file:
            return json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such annotation file") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None


def _field(record: Any, key: str, path: str, where: str) -> Any:
    """record[key], or a ValueError naming the file, the record and the key."""
    if not isinstance(record, Mapping) or key not in record:
        raise ValueError(f"{path}: {where} has no {key!r} field")
    return record[key]


class CocoCaptionsSource(_FileSource):
    """COCO Captions: one record per image with all its captions (SLIP's ``--dataset coco``).

    Accepts the official annotations file (e.g. ``captions_train2017.json``): ``"annotations"`` is a list of
    ``{"image_id": int, "caption": str, ...}``, ``"images"`` a list of ``{"id": int, "file_name": str, ...}``.
    Images are read from ``{image_root}/{file_name}`` (so ``image_root`` is e.g. ``/data/coco/train2017``).
    Without an ``"images"`` list, file names are ``{image_id:012d}.jpg``, as SLIP assumes. Images without
    captions are left out; records are in order of first appearance in ``"annotations"``.
    """

    def __init__(self, annotations_json: str, image_root: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        path = os.fspath(annotations_json)
        data = _load_json(path)
        annotations = _field(data, "annotations", path, "the top level")
        file_names = None
        if isinstance(data, Mapping) and "images" in data:
            file_names = {
                _field(image, "id", path, f"images[{i}]"): _field(image, "file_name", path, f"images[{i}]")
                for i, image in enumerate(data["images"])
            }
        captions: dict[Any, list[Any]] = defaultdict(list)
        for i, annotation in enumerate(annotations):
            image_id = _field(annotation, "image_id", path, f"annotations[{i}]")
            captions[image_id].append(_field(annotation, "caption", path, f"annotations[{i}]"))

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


class ConceptualCaptionsSource(_FileSource):
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
                    name = _field(entry, "image_id", path, where)
                texts = _field(entry, "captions", path, where)
                if isinstance(texts, (str, bytes)) or texts is None:
                    texts = [texts]
                elif not isinstance(texts, Iterable):
                    raise ValueError(f"{path}: {where} has captions of type {type(texts).__name__}")
                yield [str(name), *texts]

        super().__init__(PackedRecords(records()), os.fspath(image_root), path, max_pixels)


class RedCapsSource(_FileSource):
    """RedCaps: annotations combined into one JSON file (SLIP's ``redcaps/combine_captions.py`` output).

    Accepts a top-level list of annotations (what that script writes) or a dict with an ``"annotations"``
    list (an original per-subreddit file). Each annotation has ``"image_id"``, ``"subreddit"`` and
    ``"caption"``; its image is ``{image_root}/{subreddit}/{image_id}.jpg`` (the redcaps-downloader layout).
    """

    def __init__(self, combined_json: str, image_root: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        path = os.fspath(combined_json)
        data = _load_json(path)
        annotations = data if isinstance(data, list) else _field(data, "annotations", path, "the top level")

        def records() -> Iterator[list[Any]]:
            for i, annotation in enumerate(annotations):
                where = f"annotations[{i}]"
                image_id = _field(annotation, "image_id", path, where)
                subreddit = _field(annotation, "subreddit", path, where)
                yield [f"{subreddit}/{image_id}.jpg", _field(annotation, "caption", path, where)]

        super().__init__(PackedRecords(records()), os.fspath(image_root), path, max_pixels)


class _ZipReader:
    """Reads members of zip archives, keeping the most recently used archives open in this process only.

    Zip handles must not cross a fork (parent and child would share the file offset), so the cache is
    reset whenever the process id changes, and left out when pickled.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._pid: int | None = None
        self._open: OrderedDict[str, zipfile.ZipFile] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "_pid": None, "_open": OrderedDict()}

    def _archive(self, path: str) -> zipfile.ZipFile:
        if self._pid != os.getpid():
            for inherited in self._open.values():
                inherited.close()  # closes only this process's copy of the descriptor
            self._pid, self._open = os.getpid(), OrderedDict()
        archive = self._open.get(path)
        if archive is not None:
            self._open.move_to_end(path)
            return archive
        try:
            archive = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise BadSample("missing", path) from None
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise BadSample("corrupt", path, f"{type(error).__name__}: {error}") from None
        self._open[path] = archive
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        return archive

    def read(self, path: str, member: str) -> bytes:
        """The bytes of `member` in the archive at `path`; raises BadSample."""
        archive = self._archive(path)
        try:
            return archive.read(member)
        except KeyError:
            raise BadSample("missing", f"{path}:{member}") from None
        # A damaged archive can fail in zlib, zipfile or the OS; each means this member is unusable.
        except Exception as error:  # noqa: BLE001
            raise BadSample("corrupt", f"{path}:{member}", f"{type(error).__name__}: {error}") from None


class YFCC15MSource:
    """YFCC15M in SLIP's layout: the ``yfcc15m.pkl`` made by SLIP's ``make_dataset.py`` and zipped images.

    The pickle holds a list of ``(image_id: int, title: str, description: str)``. Image ``12345678`` is member
    ``678.jpg`` of ``{zip_root}/12/345.zip`` (the id zero-padded to 8 digits, split 2 + 3 + rest), where
    ``zip_root`` is the ``images/`` directory of SLIP's ``yfcc100m/`` tree; override `locate` for another
    naming. Captions are the non-blank ones of title and description; one is drawn per step. The pickle can
    run code when loaded: use only metadata you trust.
    """

    def __init__(self, metadata_pickle: str, zip_root: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        path = os.fspath(metadata_pickle)
        try:
            with open(path, "rb") as file:
                samples = pickle.load(file)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such metadata file") from None
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as error:
            raise ValueError(f"{path}: not a readable pickle: {error}") from None

        def records() -> Iterator[tuple[Any, ...]]:
            for i, sample in enumerate(samples):
                triple = isinstance(sample, Sequence) and len(sample) == 3
                if not (triple and isinstance(sample[0], (int, np.integer))):
                    raise ValueError(f"{path}: record {i} is not an (image_id: int, title, description)")
                yield str(sample[0]), sample[1], sample[2]

        self._records, self._name = PackedRecords(records()), path
        self.zip_root, self.max_pixels = os.fspath(zip_root), max_pixels
        self._zips = _ZipReader()

    @staticmethod
    def locate(image_id: int) -> tuple[str, str]:
        """(zip path relative to `zip_root`, member) of an image: 12345678 -> ("12/345.zip", "678.jpg")."""
        if not 0 <= image_id < 10**8:
            raise BadSample("bad_record", f"image_id {image_id}", "SLIP's layout needs 0 <= image_id < 10**8")
        digits = f"{image_id:08d}"
        return f"{digits[:2]}/{digits[2:5]}.zip", f"{digits[5:]}.jpg"

    def __len__(self) -> int:
        """Number of records."""
        return len(self._records)

    def load(self, index: int) -> tuple[Image.Image, list[str]]:
        """The image and non-blank ones of (title, description) of record `index`; raises BadSample."""
        index = check_index(index, len(self), self)
        image_id, title, description = self._records[index]
        captions = _check_captions((title, description), f"{self._name}[{index}]")
        archive, member = self.locate(int(image_id))
        archive = os.path.join(self.zip_root, archive)
        image = decode_image(self._zips.read(archive, member), f"{archive}:{member}", self.max_pixels)
        return image, captions


# ---------------------------------------------------------------------------------------------------------
# Applying views


class _SkipLog:
    """Bad samples met since the last good one, and a guard against endless runs of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []
        self.in_a_row = 0

    def add(self, error: BadSample) -> None:
        """Record one bad sample; raise DataError after more than `limit` in a row."""
        self.counts[error.kind] += 1
        if len(self.examples) < MAX_SKIPPED_EXAMPLES:
            self.examples.append(str(error))
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise DataError(
                f"{self.in_a_row} bad samples in a row, giving up (counts {dict(self.counts)}; last: {error})"
            )

    def take(self) -> dict[str, Any]:
        """The "_skipped"/"_skipped_examples" entries for the next good sample; resets the log."""
        entries = {"_skipped": dict(self.counts), "_skipped_examples": self.examples}
        self.counts, self.examples, self.in_a_row = Counter(), [], 0
        return entries


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, `random` and numpy's global generator; restore all three afterwards.

    Only the CPU generator is touched: torch.manual_seed would also reseed (and so disturb) CUDA generators.
    """
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _apply(transform: Transform, image: Image.Image, captions: Sequence[str], seed: int) -> dict[str, Any]:
    """Pick one caption and apply `transform`, all randomness drawn from `seed`."""
    rng = random.Random(seed)
    caption = captions[rng.randrange(len(captions))]
    with _seeded_global_rngs(rng.getrandbits(63)):
        sample = transform(image, caption)
    if not isinstance(sample, Mapping):
        raise TypeError(f"the transform must return a mapping of tensors, got {type(sample).__name__}")
    return dict(sample)


class ImageTextDataset(torch.utils.data.Dataset):
    """Training samples from a source: one caption drawn per call, `transform` applied, bad samples replaced.

    When record `index` is bad, records ``index + k * stride`` (mod length, k = 1, 2, ...) are tried in turn,
    at most `max_retries` times, so every call returns a sample and batches keep their size. Caption choice
    and augmentation depend only on (seed, epoch, index); set the epoch with `set_epoch` before iterating.
    """

    _STRIDE = 1_000_003  # prime: replacements spread over the dataset instead of hitting a bad neighbourhood

    def __init__(self, source: Source, transform: Transform, seed: int = 0, max_retries: int = 16) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if len(source) == 0:
            raise ValueError(f"the source {type(source).__name__} has no records")
        self.source, self.transform, self.seed, self.max_retries = source, transform, seed, max_retries
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the random draws of `epoch` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of records of the source."""
        return len(self.source)

    def candidate(self, index: int, attempt: int) -> int:
        """The record tried for `index` at `attempt` (0: itself, then its deterministic replacements)."""
        length = len(self.source)
        return (index + attempt * (self._STRIDE % length or 1)) % length

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Transform output of record `index` (or of its replacement) plus "_skipped"/"_skipped_examples"."""
        index = check_index(index, len(self), self)
        log = _SkipLog(self.max_retries)
        for attempt in range(self.max_retries + 1):
            try:
                image, captions = self.source.load(self.candidate(index, attempt))
            except BadSample as error:
                log.add(error)
                continue
            seed = derive_seed(self.seed, self.epoch, index, attempt)
            return {**_apply(self.transform, image, captions, seed), **log.take()}
        raise AssertionError("unreachable: _SkipLog raises after max_retries + 1 bad samples")


# ---------------------------------------------------------------------------------------------------------
# WebDataset shards


def brace_expand(pattern: str) -> list[str]:
    """Expand shell-style braces: ``a{1,2}`` -> a1, a2; ``s-{000..003}`` -> s-000 .. s-003 (zero-padded).

    Ranges may descend and take a step (``{10..0..5}``); braces nest. ``{}`` and ``{x}`` stay literal.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in {pattern!r}")
        return [pattern]
    if "}" in pattern[:start]:
        raise ValueError(f"unbalanced '}}' in {pattern!r}")
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced '{{' in {pattern!r}")
    head, body, tails = pattern[:start], pattern[start + 1 : end], brace_expand(pattern[end + 1 :])
    alternatives = _brace_range(body, pattern)
    if alternatives is None:
        parts = _split_top_level(body)
        if len(parts) < 2:  # no comma: literal braces, as in bash
            return [head + "{" + middle + "}" + tail for middle in brace_expand(body) for tail in tails]
        alternatives = [expanded for part in parts for expanded in brace_expand(part)]
    return [head + middle + tail for middle in alternatives for tail in tails]


def _brace_range(body: str, pattern: str) -> list[str] | None:
    """The items of a numeric range body like ``000..009`` or ``1..9..2``; None if `body` is no range."""
    match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
    if match is None:
        return None
    first, last = int(match[1]), int(match[2])
    step = abs(int(match[3] or 1))
    if step == 0:
        raise ValueError(f"zero step in brace range {{{body}}} of {pattern!r}")
    padded = any(len(text.lstrip("-")) > 1 and text.lstrip("-").startswith("0") for text in match.group(1, 2))
    width = max(len(match[1]), len(match[2])) if padded else 0
    values = range(first, last + 1, step) if first <= last else range(first, last - 1, -step)
    return [f"{value:0{width}d}" for value in values]


def _split_top_level(body: str) -> list[str]:
    """Split a brace body at the commas that are not inside nested braces."""
    parts, depth, current = [], 0, []
    for char in body:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current.append(char)
    parts.append("".join(current))
    return parts


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Local shard paths from a path, a brace pattern, a glob, or a list of those; all must exist."""
    patterns = [urls] if isinstance(urls, str) else [str(url) for url in urls]
    paths: list[str] = []
    for pattern in patterns:
        for expanded in brace_expand(os.path.expanduser(pattern)):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise ValueError(f"no shard matches {expanded!r}")
                paths.extend(matches)
            else:
                paths.append(expanded)
    if not paths:
        raise ValueError(f"no shards in {urls!r}")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(paths)} shards do not exist, first: {missing[0]}")
    return paths


def _read_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {extension: bytes}) groups of consecutive members sharing a key from the tar at `url`.

    The key is the member path up to the first dot of its file name (WebDataset's convention); only image,
    .txt and .json members are read. Raises BadSample("broken_shard") when the tar turns out damaged, after
    the groups before the damage have been yielded.
    """
    key, group = None, {}
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, name = posixpath.split(member.name)
                stem, _, extension = name.partition(".")
                member_key = posixpath.join(directory, stem)
                if member_key != key:
                    if group:
                        yield key, group
                    key, group = member_key, {}
                extension = extension.lower()
                if extension not in _TAR_EXTENSIONS:
                    continue
                if member.size > _MAX_MEMBER_BYTES:
                    group["_too_large"] = f"{extension}: {member.size} bytes".encode()
                    continue
                group[extension] = tar.extractfile(member).read()
    except FileNotFoundError:
        raise BadSample("missing", url) from None
    # Damaged or non-tar files fail in tarfile, zlib, bz2, lzma or the OS: each means a broken shard.
    except Exception as error:  # noqa: BLE001
        raise BadSample("broken_shard", url, f"{type(error).__name__}: {error}") from None
    if group:
        yield key, group


def _decode_group(group: Mapping[str, bytes], where: str, max_pixels: int) -> tuple[Image.Image, list[str]]:
    """The RGB image and caption of one WebDataset sample; raises BadSample."""
    if "_too_large" in group:
        raise BadSample("too_large", where, group["_too_large"].decode())
    if "txt" in group:
        caption = check_caption(group["txt"], f"{where}.txt")
    elif "json" in group:
        try:
            metadata = json.loads(group["json"])
        except UnicodeDecodeError as error:
            detail = f"invalid UTF-8 at byte {error.start}"
            raise BadSample("bad_caption_encoding", f"{where}.json", detail) from None
        except ValueError as error:
            raise BadSample("corrupt", f"{where}.json", str(error)) from None
        if not isinstance(metadata, Mapping) or "caption" not in metadata:
            raise BadSample("missing", f"{where}.json", "no 'caption' field")
        caption = check_caption(metadata["caption"], f"{where}.json")
    else:
        raise BadSample("missing", where, "no .txt or .json caption member")
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in group), None)
    if extension is None:
        raise BadSample("missing", where, f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
    return decode_image(group[extension], f"{where}.{extension}", max_pixels), [caption]


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream approximately, through a buffer of `size` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


class WebDatasetStream(torch.utils.data.IterableDataset):
    """Samples from WebDataset tar shards as img2dataset writes them.

    Members are grouped by key (path up to the first dot of the file name); the image is the .jpg, .jpeg,
    .png or .webp member, the caption the .txt member or else the "caption" field of the .json member.

    `urls`: a path, a brace pattern (``shards/{00000..00099}.tar``), a glob, or a list of those.

    Shards are split over (rank, DataLoader worker) slots, rank-major. With ``resample=False`` each epoch
    visits every shard exactly once across all slots (shard order shuffled per epoch), and a slot without a
    shard is an error. With ``resample=True`` every slot draws shards with replacement from all of them,
    seeded by (seed, epoch, rank, worker), endlessly unless `samples_per_epoch` is set.

    `samples_per_epoch` (all ranks together) makes every slot yield exactly its equal share, rounded down to
    whole batches, so every rank sees the same number of batches (DDP needs that); a slot that runs out of
    shards first starts over on its own shards. It also gives the stream a length, and allows resuming
    mid-epoch (`configure(start_batch=...)`), which skips raw samples without decoding them: exact unless
    the skipped part held bad samples. Without it, ranks may see different numbers of batches: set it for
    distributed training. Broken shards and bad samples are skipped and counted; more than
    `max_bad_in_a_row` in a row raise an error instead of spinning forever.
    `slip.data.loader.build_train_loader` calls `set_epoch` and `configure`.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Transform,
        seed: int = 0,
        resample: bool = False,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 0,
        max_bad_in_a_row: int = 256,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        if samples_per_epoch is not None and samples_per_epoch <= 0:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.urls = expand_urls(urls)
        self.transform, self.seed, self.resample = transform, seed, resample
        self.samples_per_epoch, self.shuffle_buffer = samples_per_epoch, shuffle_buffer
        self.max_bad_in_a_row, self.max_pixels = max_bad_in_a_row, max_pixels
        self.epoch = 0
        self.world, self.num_workers, self.batch_size, self.start_batch = WorldInfo(), 0, 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the shard order and random draws of `epoch` from now on."""
        self.epoch = epoch

    def configure(
        self, world: WorldInfo, num_workers: int = 0, batch_size: int = 1, start_batch: int = 0
    ) -> None:
        """Say how the stream is read: by which rank, with how many DataLoader workers, in which batch size,
        and how many batches of this epoch were already consumed (resuming needs `samples_per_epoch`)."""
        workers = max(1, num_workers)
        if not self.resample and len(self.urls) < world.world_size * workers:
            raise ValueError(self._too_few_shards(world.world_size, workers))
        if self.samples_per_epoch is None:
            if start_batch:
                raise ValueError("resuming a stream mid-epoch (start_batch > 0) needs samples_per_epoch")
        else:
            quota = self._quota(world.world_size, workers, batch_size)
            if quota == 0:
                raise ValueError(
                    f"samples_per_epoch={self.samples_per_epoch} is less than one batch per reader: "
                    f"{world.world_size} ranks x {workers} workers x batch_size {batch_size}"
                )
            if start_batch > workers * quota // batch_size:
                batches = workers * quota // batch_size
                raise ValueError(f"start_batch={start_batch} is past the {batches} batches of an epoch")
        self.world, self.num_workers = world, num_workers
        self.batch_size, self.start_batch = batch_size, start_batch

    def _quota(self, world_size: int, num_workers: int, batch_size: int) -> int:
        """Samples each reader yields per epoch: its share of samples_per_epoch, in whole batches."""
        share = self.samples_per_epoch // (world_size * num_workers)
        return share // batch_size * batch_size

    def __len__(self) -> int:
        """Samples this rank still yields this epoch (needs samples_per_epoch)."""
        if self.samples_per_epoch is None:
            raise TypeError("a WebDatasetStream without samples_per_epoch has no length")
        workers = max(1, self.num_workers)
        quota = self._quota(self.world.world_size, workers, self.batch_size)
        return max(0, workers * quota - self.start_batch * self.batch_size)

    def _too_few_shards(self, world_size: int, num_workers: int) -> str:
        """The error message for fewer shards than (rank, worker) readers."""
        return (
            f"{len(self.urls)} shards cannot feed {world_size * num_workers} readers ({world_size} ranks x "
            f"{num_workers} workers); use fewer workers, more shards, or resample=True"
        )

    def _shards(self, slot: int, slots: int, worker: int) -> Iterator[int]:
        """Indices into `urls` that slot `slot` of `slots` reads, in order."""
        if self.resample:
            rng = random.Random(derive_seed(self.seed, self.epoch, self.world.rank, worker))
            while True:
                yield rng.randrange(len(self.urls))
        order = list(range(len(self.urls)))
        random.Random(derive_seed(self.seed, self.epoch)).shuffle(order)
        mine = order[slot::slots]
        if not mine:
            raise ValueError(self._too_few_shards(self.world.world_size, slots // self.world.world_size))
        while True:
            yield from mine
            if self.samples_per_epoch is None:
                return

    def _groups(
        self, slot: int, slots: int, worker: int, log: _SkipLog
    ) -> Iterator[tuple[tuple[Any, ...], str, dict[str, bytes]]]:
        """(seed parts, where, member group) of every sample of this slot's shards; logs broken shards."""
        visits: Counter[int] = Counter()
        for shard in self._shards(slot, slots, worker):
            url, visit = self.urls[shard], visits[shard]
            visits[shard] += 1
            empty = True
            try:
                for key, group in _read_shard(url):
                    empty = False
                    yield (self.seed, self.epoch, shard, visit, key), f"{url}:{key}", group
            except BadSample as error:
                log.add(error)
            else:
                if empty:  # counted so that a stream of empty shards ends in an error, not an endless loop
                    log.add(BadSample("empty_shard", url))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Transformed samples of this rank and worker, each with "_skipped"/"_skipped_examples"."""
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.samples_per_epoch is not None and num_workers != max(1, self.num_workers):
            raise RuntimeError(
                f"stream configured for {max(1, self.num_workers)} workers but runs in {num_workers}: "
                "call configure() with the DataLoader's num_workers"
            )
        # A resumed DataLoader asks worker 0 first, but batch `start_batch` came from worker start_batch % n:
        # workers take over the roles (shards, seeds) of the workers that would be next in line.
        role = (worker + self.start_batch) % num_workers
        slot, slots = self.world.rank * num_workers + role, self.world.world_size * num_workers
        if self.samples_per_epoch is None:
            quota = None
        else:
            quota = self._quota(self.world.world_size, num_workers, self.batch_size)
        # Role r delivered batches r, r + num_workers, ... of the epoch: skip those already consumed.
        to_skip = max(0, -(-(self.start_batch - role) // num_workers)) * self.batch_size
        log = _SkipLog(self.max_bad_in_a_row)
        groups = self._groups(slot, slots, role, log)
        if self.shuffle_buffer:
            rng = random.Random(derive_seed(self.seed, self.epoch, self.world.rank, role, "buffer"))
            groups = _shuffled(groups, self.shuffle_buffer, rng)
        produced = 0
        if quota == 0:
            return
        for seed_parts, where, group in groups:
            if to_skip:
                to_skip -= 1
            else:
                try:
                    image, captions = _decode_group(group, where, self.max_pixels)
                except BadSample as error:
                    log.add(error)
                    continue
                yield {**_apply(self.transform, image, captions, derive_seed(*seed_parts)), **log.take()}
            produced += 1
            if produced == quota:
                return
