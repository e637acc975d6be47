"""Multi-label image datasets for evaluation (PASCAL VOC 2007 classification): an image holds a set of classes.

Items are ``(RGB PIL image, int64 tensor [C])`` with 1 for each class present, 0 for each absent, and -1 for a
class the image shows only as "difficult" objects (VOC's convention: left out of that class's score). As in
`slip.data.labelled`, every image file is checked at construction, and an image that cannot be decoded raises
ValueError naming it.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree

import numpy as np
import torch

from slip.data.decode import DEFAULT_MAX_PIXELS
from slip.data.labelled import ClassesSpec, LabelledImages, check_files_exist, resolve_classes
from slip.data.sources.csv import read_csv_columns

__all__ = ["MultiLabelCsvDataset", "VocClassificationDataset"]

PRESENT, ABSENT, DIFFICULT = 1, 0, -1


class _MultiLabelImages(LabelledImages):
    """`LabelledImages` whose labels are a [N, C] target matrix; an item carries its row as a tensor."""

    multi_label = True  # what evaluation tasks check before scoring

    @property
    def targets(self) -> np.ndarray:
        """The [N, C] targets: 1 present, 0 absent, -1 ignored."""
        return self.labels

    def label(self, index: int) -> torch.Tensor:
        """The targets [C] of image `index`."""
        return torch.from_numpy(self.labels[index].copy())


class MultiLabelCsvDataset(_MultiLabelImages):
    """Images listed in a CSV/TSV file whose `labels_column` holds class names joined by `delimiter` (e.g.
    ``dog;person``); image paths are relative to the file. `classes`: as for `LabelledCsvDataset`."""

    def __init__(self, path: str | os.PathLike[str], classes: ClassesSpec, image_column: str = "filepath",
                 labels_column: str = "labels", sep: str | None = None, delimiter: str = ";",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        path = os.fspath(path)
        prompts = resolve_classes(classes, path)
        index = {name: position for position, name in enumerate(prompts.classes)}
        rows = list(read_csv_columns(path, (image_column, labels_column), sep))
        targets = np.zeros((len(rows), len(index)), dtype=np.int64)
        for row, (line, (_, names)) in enumerate(rows):
            for name in filter(None, (part.strip() for part in names.split(delimiter))):
                if name not in index:
                    raise ValueError(f"{path}: line {line}: unknown class {name!r}, not one of the {len(index)} "
                                     "class names")
                targets[row, index[name]] = PRESENT
        directory = os.path.dirname(os.path.abspath(path))
        paths = [os.path.join(directory, image) for _, (image, _) in rows]
        check_files_exist(paths, path, [line for line, _ in rows])
        super().__init__(paths, targets, prompts.classes, prompts.templates, max_pixels)


class VocClassificationDataset(_MultiLabelImages):
    """PASCAL VOC's layout: ``root/ImageSets/Main/<split>.txt`` lists image ids, ``root/Annotations/<id>.xml``
    names each object's class (and whether it is difficult), ``root/JPEGImages/<id>.jpg`` is the image.

    An image's targets are its classes with at least one non-difficult object (1), classes it shows only as
    difficult objects (-1: ignored for that class, as VOC's classification scoring does), the rest 0.
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "test", classes: ClassesSpec = "voc2007",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        root = os.fspath(root)
        listing = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
        prompts = resolve_classes(classes, listing)
        index = {name: position for position, name in enumerate(prompts.classes)}
        try:
            with open(listing, encoding="utf-8") as file:
                ids = [line.split()[0] for line in file if line.strip()]
        except FileNotFoundError:
            raise FileNotFoundError(f"{listing}: no such image list (expected VOC's ImageSets/Main layout)") from None
        targets = np.zeros((len(ids), len(index)), dtype=np.int64)
        for row, image_id in enumerate(ids):
            annotation = os.path.join(root, "Annotations", f"{image_id}.xml")
            for name, difficult in _voc_objects(annotation):
                if name not in index:
                    raise ValueError(f"{annotation}: unknown class {name!r}, not one of the {len(index)} class names")
                column = index[name]
                if not difficult:
                    targets[row, column] = PRESENT
                elif targets[row, column] == ABSENT:
                    targets[row, column] = DIFFICULT
        paths = [os.path.join(root, "JPEGImages", f"{image_id}.jpg") for image_id in ids]
        check_files_exist(paths, listing)
        super().__init__(paths, targets, prompts.classes, prompts.templates, max_pixels)


def _voc_objects(annotation: str) -> list[tuple[str, bool]]:
    """(class name, difficult) of every object in a VOC annotation file."""
    try:
        tree = ElementTree.parse(annotation)
    except FileNotFoundError:
        raise FileNotFoundError(f"{annotation}: no such annotation file") from None
    except ElementTree.ParseError as error:
        raise ValueError(f"{annotation}: not valid XML ({error})") from None
    objects = []
    for element in tree.getroot().iter("object"):
        name = (element.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"{annotation}: an object without a <name>")
        objects.append((name, (element.findtext("difficult") or "0").strip() == "1"))
    return objects
