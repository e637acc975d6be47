"""Image-text pairs listed in a CSV or TSV file with a header row (open_clip's layout)."""
from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator, Sequence

import numpy as np

from slip.data.decode import DEFAULT_MAX_PIXELS
from slip.data.sources.base import FileSource, PackedRecords

__all__ = ["CsvSource", "read_csv_columns"]


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


def _image_key(root: str, reference: str) -> bytes:
    """A 128-bit digest of the file `reference` names (relative to `root`): equal for paths equal once normalised,
    16 bytes a row where a file of millions of rows would otherwise hold as many Python strings."""
    path = os.path.normpath(os.path.join(root, reference)) if reference else ""
    return hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _rows_by_image(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers ordered by image, then by row; where each image's rows end), images in order of first row."""
    _, first_rows, image_of_row = np.unique(keys, return_index=True, return_inverse=True)
    by_first_row = np.empty(len(first_rows), dtype=np.int64)
    by_first_row[np.argsort(first_rows, kind="stable")] = np.arange(len(first_rows))
    image_of_row = by_first_row[image_of_row.reshape(-1)]
    ends = np.cumsum(np.bincount(image_of_row, minlength=len(first_rows)))
    return np.argsort(image_of_row, kind="stable"), ends


def _grouped_records(rows: PackedRecords, order: np.ndarray, ends: np.ndarray) -> Iterator[list[bytes]]:
    """One record per image: the image reference of its first row, then the captions of all its rows."""
    start = 0
    for end in ends.tolist():
        members = [rows[row] for row in order[start:end].tolist()]
        yield [members[0][0], *(caption for _, caption in members)]
        start = end


class CsvSource(FileSource):
    """Images and captions listed in a CSV or TSV file with a header row (open_clip's layout).

    Image paths are relative to the directory of the CSV file (absolute paths work too). Captions that are
    not valid UTF-8 are reported per record at load time ("bad_caption_encoding"), not for the whole file.
    Captions of any length are read, and truncated to the context length by the tokenizer.

    With `group_by_image` each distinct image (rows whose paths name the same file) is one record holding the
    captions of all its rows, in order of first appearance, so an epoch visits each image once; without it each
    row is a record. None (the default) groups when some image path repeats. `num_images`, `num_captions`
    and `grouped_by_image` say what was read.
    """

    def __init__(
        self,
        path: str,
        image_column: str = "filepath",
        caption_column: str = "title",
        sep: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        group_by_image: bool | None = None,
    ) -> None:
        if group_by_image is not None and not isinstance(group_by_image, bool):
            raise ValueError(f"group_by_image must be true, false or null (group when an image path repeats), "
                             f"got {group_by_image!r}")
        path = os.fspath(path)
        root = os.path.dirname(os.path.abspath(path))
        keys = bytearray()

        def rows() -> Iterator[list[str]]:
            for _, fields in read_csv_columns(path, (image_column, caption_column), sep):
                keys.extend(_image_key(root, fields[0]))
                yield fields

        records = PackedRecords(rows())
        order, ends = _rows_by_image(np.frombuffer(keys, dtype="S16"))
        self.num_images, self.num_captions = len(ends), len(records)
        self.grouped_by_image = len(ends) < len(records) if group_by_image is None else group_by_image
        if self.grouped_by_image:
            records = PackedRecords(_grouped_records(records, order, ends))
        super().__init__(records, root, path, max_pixels)

    def summary(self) -> str:
        """What was read, for the run header: e.g. "1,000 images, 3,000 captions (grouped by image)"."""
        how = "grouped by image" if self.grouped_by_image else "one record per row"
        return f"{self.num_images:,} images, {self.num_captions:,} captions ({how})"
