"""Labelled image datasets for evaluation: class-per-folder trees and CSV/TSV files of (image, label) rows.

Items are ``(RGB PIL image, int label)``; ``classes`` lists the class names and ``templates`` the zero-shot
prompt templates when the classes came from a prompt set (else None; ``default_templates`` is true where a plain
class list brought none and ``slip.prompts.DEFAULT_TEMPLATES`` stands in). Both datasets check at construction
that every image file exists (one stat per file). An image that cannot be decoded raises ValueError naming
the file: an evaluation must see every image, so nothing is skipped or replaced.

Paths are kept packed in flat arrays (as in `slip.data.sources.PackedRecords`), so that DataLoader workers share them
instead of copying millions of Python strings.

`groups(key)` gives one group id per image, for a validation split that keeps groups whole (the linear probe's
`val_groups`): ``path:N`` is the N-th component of each image's path as the dataset lists it (0 first, negative from
the end), any other key a column of a CSV list.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, Union

import numpy as np
from PIL import Image

from slip.data.decode import DEFAULT_MAX_PIXELS, BadSample, read_image_file
from slip.data.sources import PackedRecords
from slip.data.sources.base import as_path, check_index
from slip.data.sources.csv import read_csv_columns
from slip.prompts import ClassPrompts, load_prompts, parse_prompts

__all__ = [
    "DEFAULT_IMAGE_EXTENSIONS",
    "GROUP_BY_PATH",
    "ClassesSpec",
    "ImageFolderDataset",
    "LabelledCsvDataset",
    "LabelledImages",
    "check_class_names",
    "check_files_exist",
    "parse_group_key",
    "resolve_classes",
]

DEFAULT_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_LABEL_KINDS = ("auto", "name", "index")
_INTEGER = re.compile(r"[+-]?[0-9]+")
GROUP_BY_PATH = "path:"  # a group key "path:N" names the N-th component of each image's listed path


def parse_group_key(key: str) -> int | str:
    """What a group key names: the int N of ``path:N`` (a component of each image's listed path), else a column."""
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"val_groups must be a CSV column name or 'path:N' (N an integer), got {key!r}")
    if not key.startswith(GROUP_BY_PATH):
        return key
    index = key[len(GROUP_BY_PATH):].strip()
    if not _INTEGER.fullmatch(index):
        raise ValueError(f"val_groups {key!r}: expected 'path:N' with N an integer (0 first, -1 the file name)")
    return int(index)


class LabelledImages:
    """Shared part of the labelled datasets: packed image paths, labels (an int per image; a row of targets per
    image for `slip.data.multilabel`), class names, strict image reading."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        templates: Sequence[str] | None,
        max_pixels: int,
    ) -> None:
        self.classes: list[str] = list(classes)
        self.templates: list[str] | None = None if templates is None else list(templates)
        self.default_templates = False
        self.labels = np.asarray(labels, dtype=np.int64)
        self.labels.setflags(write=False)
        self.max_pixels = max_pixels
        self._paths = PackedRecords((path,) for path in paths)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.labels)

    def image_path(self, index: int) -> str:
        """The file of image `index`."""
        return as_path(self._paths[check_index(index, len(self), self)][0])

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """(RGB image, label) of item `index`; ValueError naming the file if the image cannot be read."""
        index = check_index(index, len(self), self)
        path = as_path(self._paths[index][0])
        try:
            image = read_image_file(path, self.max_pixels)
        except BadSample as error:
            raise ValueError(f"{type(self).__name__}[{index}]: cannot read image {error}") from None
        return image, self.label(index)

    def label(self, index: int) -> Any:
        """The label of image `index` as the item carries it: an int class index."""
        return int(self.labels[index])

    def listed_paths(self) -> list[str]:
        """Each image's path as the dataset lists it: here its full path."""
        return [self.image_path(index) for index in range(len(self))]

    def column(self, name: str) -> list[str]:
        """The field `name` of each image's row; ValueError here, where the dataset has no rows."""
        raise ValueError(f"{type(self).__name__} has no column {name!r}: it lists no columns; group by 'path:N'")

    def groups(self, key: str) -> list[str]:
        """One group id per image: for ``path:N`` the N-th component of `listed_paths` (0 first, negative from the end),
        else the column `key`; ValueError naming the key where the dataset cannot give it."""
        named = parse_group_key(key)
        if isinstance(named, str):
            return self.column(named)
        groups = []
        for index, path in enumerate(self.listed_paths()):
            parts = [part for part in path.replace(os.sep, "/").split("/") if part]
            if not -len(parts) <= named < len(parts):
                raise ValueError(f"{key}: image {index} ({path}) has {len(parts)} path components, no component "
                                 f"{named}")
            groups.append(parts[named])
        return groups


def check_files_exist(paths: Sequence[str], where: str, lines: Sequence[int] | None = None) -> None:
    """Raise FileNotFoundError naming the first missing file and how many are missing (one stat each)."""
    missing = [index for index, path in enumerate(paths) if not os.path.isfile(path)]
    if missing:
        first = missing[0]
        line = f" (line {lines[first]})" if lines is not None else ""
        raise FileNotFoundError(
            f"{where}: {len(missing)} of {len(paths)} image files do not exist, first: {paths[first]}{line}"
        )


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Lower-case extensions with a leading dot."""
    if isinstance(extensions, str):
        extensions = (extensions,)
    normalised = tuple(ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions)
    if not normalised or any(ext == "." for ext in normalised):
        raise ValueError(f"extensions must be non-empty file name endings, got {extensions!r}")
    return normalised


class ImageFolderDataset(LabelledImages):
    """Images in one sub-directory per class: ``root/<class name>/**/<image>``.

    `classes` are the sub-directory names, sorted (so labels are stable across machines); images are the
    files with one of `extensions` (case-insensitive) anywhere below a class directory, sorted by path
    within each class. Names starting with a dot (e.g. ``.ipynb_checkpoints``) are ignored. A class
    directory without images keeps its label. `templates` is None. `listed_paths` are relative to `root`
    (``<class>/.../<file>``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        extensions: Iterable[str] = DEFAULT_IMAGE_EXTENSIONS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        root = os.fspath(root)
        extensions = _normalise_extensions(extensions)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such directory")
        classes = sorted(
            entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
        )
        if not classes:
            raise ValueError(f"{root}: no class folders (sub-directories) found")
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            found = sorted(_images_below(os.path.join(root, name), extensions))
            paths += found
            labels += [label] * len(found)
        if not paths:
            raise ValueError(f"{root}: no images found (extensions {', '.join(extensions)})")
        check_files_exist(paths, root)
        self.root = root
        super().__init__(paths, labels, classes, None, max_pixels)

    def listed_paths(self) -> list[str]:
        """Each image's path relative to `root`: ``<class>/.../<file>``."""
        return [os.path.relpath(self.image_path(index), self.root) for index in range(len(self))]


def _images_below(directory: str, extensions: tuple[str, ...]) -> Iterable[str]:
    """Paths of the non-hidden files below `directory` (symlinks followed) whose names end in `extensions`."""
    visited = set()
    for current, subdirs, files in os.walk(directory, followlinks=True):
        visited.add(os.path.realpath(current))
        # A linked directory seen before (a symlink cycle) would otherwise be walked again and again.
        subdirs[:] = [
            name for name in subdirs
            if not name.startswith(".") and os.path.realpath(os.path.join(current, name)) not in visited
        ]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(extensions):
                yield os.path.join(current, name)


ClassesSpec = Union[str, os.PathLike, Sequence[str], ClassPrompts]
"""LabelledCsvDataset's `classes`: a prompt-set key or JSON file, a list of class names, or a ClassPrompts."""


def resolve_classes(classes: ClassesSpec, path: str) -> ClassPrompts:
    """The prompt set behind the `classes` argument of LabelledCsvDataset."""
    if isinstance(classes, ClassPrompts):
        return classes
    if isinstance(classes, (str, os.PathLike)):
        return load_prompts(classes)
    if isinstance(classes, Sequence):
        return parse_prompts(list(classes), f"{path}: classes argument")
    raise ValueError(
        f"{path}: classes must be a list of class names, a JSON file or a built-in prompt set key, got "
        f"{type(classes).__name__}"
    )


class _LabelParser:
    """Maps CSV label fields to class indices: class names, or integer indices into the classes."""

    def __init__(self, classes: Sequence[str], kind: str, path: str) -> None:
        if kind not in _LABEL_KINDS:
            raise ValueError(f"{path}: label_kind must be one of {', '.join(_LABEL_KINDS)}, got {kind!r}")
        self.classes, self.kind, self.path = classes, kind, path
        self.positions: dict[str, list[int]] = {}
        for index, name in enumerate(classes):
            self.positions.setdefault(name, []).append(index)

    def __call__(self, field: str, line: int) -> int:
        """The class index of `field` on line `line` of the file."""
        label = field.strip()
        where = f"{self.path}: line {line}"
        by_name = self.positions.get(label) if self.kind != "index" else None
        by_index = int(label) if self.kind != "name" and _INTEGER.fullmatch(label) else None
        if by_name is not None:
            if len(by_name) > 1:
                raise ValueError(
                    f"{where}: label {label!r} is ambiguous, classes {by_name[0]} and {by_name[1]} share "
                    "that name; use the class index"
                )
            if by_index is not None and by_index != by_name[0]:
                raise ValueError(
                    f"{where}: label {label!r} is both the name of class {by_name[0]} and the index of class "
                    f"{by_index}; pass label_kind='name' or 'index'"
                )
            return by_name[0]
        if by_index is not None:
            if not 0 <= by_index < len(self.classes):
                raise ValueError(
                    f"{where}: label index {by_index} out of range for {len(self.classes)} classes"
                )
            return by_index
        if self.kind == "index":
            raise ValueError(f"{where}: label {label!r} is not an integer class index")
        raise ValueError(f"{where}: unknown label {label!r}, not one of the {len(self.classes)} class names")


class LabelledCsvDataset(LabelledImages):
    """Images and labels listed in a CSV or TSV file with a header row.

    Image paths are relative to `image_root`, by default the file's directory (absolute paths work too);
    `listed_paths` are the image fields as written. `classes` is a list of class names, the path of a JSON file
    (a list of names, or ``{"classes": [...], "templates": [...]}``), a built-in prompt set key (see
    `slip.prompts.load_prompts`) or a `ClassPrompts`; `templates` comes from that prompt set (the default
    template for a plain list, and `default_templates` is then true).

    A label is a class name or an integer index into `classes`. With ``label_kind="auto"`` a label that
    reads both ways must mean the same class; set "name" or "index" for files where it does not (e.g.
    clevr_counts, whose class names are numbers). The separator is `sep`, else inferred from the extension
    (.csv: comma, .tsv: tab).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        classes: ClassesSpec,
        image_column: str = "filepath",
        label_column: str = "label",
        sep: str | None = None,
        label_kind: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_root: str | os.PathLike[str] | None = None,
    ) -> None:
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path)) if image_root is None else os.path.abspath(image_root)
        if image_root is not None and not os.path.isdir(directory):
            raise FileNotFoundError(f"image_root {directory}: no such directory")
        prompts = resolve_classes(classes, path)
        parse_label = _LabelParser(prompts.classes, label_kind, path)
        rows = _csv_rows(path, sep, image_column, label_column)
        labels = [parse_label(label, line) for line, _, label in rows]
        paths = [os.path.join(directory, image) for _, image, _ in rows]
        check_files_exist(paths, path, [line for line, _, _ in rows])
        self.path, self.sep, self.image_column = path, sep, image_column
        super().__init__(paths, labels, prompts.classes, prompts.templates, max_pixels)
        self.default_templates = prompts.default_templates

    def listed_paths(self) -> list[str]:
        """Each image's field of the file, as written (relative to the image root, or absolute)."""
        return self.column(self.image_column)

    def column(self, name: str) -> list[str]:
        """The field `name` of each image's row, read again from the file; ValueError naming the file and line of
        the first empty one, or the file where it has no such column."""
        fields = []
        for line, (field,) in read_csv_columns(self.path, (name,), self.sep):
            if not field:
                raise ValueError(f"{self.path}: line {line}: empty or missing {name!r} field")
            fields.append(field)
        if len(fields) != len(self):
            raise ValueError(f"{self.path}: {len(fields)} rows now, {len(self)} when the dataset was read")
        return fields


def _csv_rows(path: str, sep: str | None, image_column: str, label_column: str) -> list[tuple[int, str, str]]:
    """(line number, image field, label field) of each row of a CSV/TSV file with a header row."""
    rows: list[tuple[int, str, str]] = []
    for line, (image, label) in read_csv_columns(path, (image_column, label_column), sep):
        for name, value in ((image_column, image), (label_column, label)):
            if not value:
                raise ValueError(f"{path}: line {line}: empty or missing {name!r} field")
        rows.append((line, image, label))
    if not rows:
        raise ValueError(f"{path}: no rows after the header")
    return rows


def _normalised_name(name: str) -> str:
    """A class name compared loosely: case-folded, '_' as space, runs of spaces as one."""
    return " ".join(name.replace("_", " ").casefold().split())


def check_class_names(dataset_classes: Sequence[str], prompt_classes: Sequence[str], where: str) -> None:
    """Raise ValueError if a dataset's classes cannot be the prompt set's classes, in the same order.

    The counts must be equal. Names are compared where both sides use them: a dataset class name that
    also occurs among the prompt names (ignoring case, and '_' versus ' ') must be at the same index, so
    a different class order is caught. Names found on one side only cannot be matched and are accepted:
    folder names that are WordNet ids (ImageNet's n01440764) or numeric codes, and the descriptive names
    CLIP gives to classes whose dataset labels are terse (Caltech101's "Faces_easy" is "centered face").
    """
    prompt_positions: dict[str, list[int]] = {}
    for index, name in enumerate(prompt_classes):
        prompt_positions.setdefault(_normalised_name(name), []).append(index)
    dataset_names = [_normalised_name(name) for name in dataset_classes]
    if len(dataset_classes) != len(prompt_classes):
        message = (
            f"{where}: the dataset has {len(dataset_classes)} classes, the prompt set {len(prompt_classes)}"
        )
        if any(name in prompt_positions for name in dataset_names):
            dataset_set = set(dataset_names)
            pairs = zip(dataset_classes, dataset_names)
            extra = next((name for name, key in pairs if key not in prompt_positions), None)
            lacking = next((c for c in prompt_classes if _normalised_name(c) not in dataset_set), None)
            if extra is not None:
                message += f"; first dataset class not in the prompt set: {extra!r}"
            if lacking is not None:
                message += f"; first prompt class not in the dataset: {lacking!r}"
        raise ValueError(message)
    for index, name in enumerate(dataset_names):
        positions = prompt_positions.get(name)
        if positions is not None and index not in positions:
            raise ValueError(
                f"{where}: class {index} is {dataset_classes[index]!r} in the dataset but "
                f"{prompt_classes[index]!r} in the prompt set, which has {dataset_classes[index]!r} at index "
                f"{positions[0]}; the class orders differ"
            )
