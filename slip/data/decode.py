"""Image decoding and sample checks: what a usable sample is, and the kinds of bad ones.

`decode_image` and `read_image_file` turn bytes or files into 8-bit RGB images, refusing decompression bombs and
truncated files; `check_caption` accepts only non-blank UTF-8 text. Each failure is a `BadSample` of a named kind
("missing", "corrupt", "decompression_bomb", "empty_caption", ...), which readers skip and count through a
`SkipLog`; `DataError` ends a run whose data is too broken to go on.
"""
from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_BAD_IN_A_ROW",
    "MAX_SKIPPED_EXAMPLES",
    "BadSample",
    "DataError",
    "SkipLog",
    "check_caption",
    "check_captions",
    "decode_image",
    "read_image_file",
    "to_rgb",
]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS; larger images are decompression bombs
MAX_SKIPPED_EXAMPLES = 5
MAX_BAD_IN_A_ROW = 256  # readers give up after more bad samples than this in a row (trainer.max_bad_in_a_row)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


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


def check_captions(raws: Iterable[str | bytes | None], where: str) -> list[str]:
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


class SkipLog:
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
