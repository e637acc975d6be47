"""Image-text pairs listed in a CSV or TSV file with a header row (open_clip's layout)."""
from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence

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


class CsvSource(FileSource):
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
