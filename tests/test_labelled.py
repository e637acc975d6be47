"""Labelled evaluation datasets (image folders, CSV/TSV files) and the class-name check, on tiny images."""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slip.data.labelled import ImageFolderDataset, LabelledCsvDataset, check_class_names
from slip.prompts import DEFAULT_TEMPLATES, load_prompts


def write_image(path: Path, color: tuple[int, int, int], mode: str = "RGB") -> Path:
    """A small solid-colour image at `path` (format from the extension), parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = Image.registered_extensions()[path.suffix.lower()]
    Image.new("RGB", (6, 4), color).convert(mode).save(path, format=image_format, lossless=True)
    return path


def color_of(image: Image.Image) -> tuple[int, int, int]:
    """The colour of the top-left pixel."""
    return image.getpixel((0, 0))


def write_csv(path: Path, rows: list[list[str]], sep: str = ",") -> Path:
    """A CSV/TSV file of `rows` (the first is the header)."""
    path.write_text("\n".join(sep.join(row) for row in rows) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# ImageFolderDataset


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, tuple[int, int, int]]]]:
    """root/<class>/... with distinct colours; returns root and {relative path: (class, colour)}."""
    root = tmp_path / "root"
    images = {
        "dog/x.png": ("dog", (200, 0, 0)),
        "cat/sub/c.png": ("cat", (0, 200, 0)),
        "cat/B.PNG": ("cat", (0, 0, 200)),
        "cat/a.bmp": ("cat", (90, 90, 0)),
        "ant_eater/z.webp": ("ant_eater", (0, 90, 90)),
    }
    for relative, (_, color) in images.items():  # written in an order unrelated to the expected one
        write_image(root / relative, color)
    (root / "cat" / "notes.txt").write_text("not an image")
    write_image(root / ".hidden" / "h.png", (1, 2, 3))
    write_image(root / "cat" / ".ipynb_checkpoints" / "h.png", (1, 2, 3))
    write_image(root / "dog" / ".h.png", (1, 2, 3))
    (root / "empty_class").mkdir()
    (root / "README.png").write_bytes(b"a file at the top level is not a class")
    return root, images


def test_image_folder_classes_labels_and_order(folder):
    root, images = folder
    dataset = ImageFolderDataset(root)
    assert dataset.classes == ["ant_eater", "cat", "dog", "empty_class"]
    assert dataset.templates is None
    # Reference: per class (sorted), the files sorted by their path.
    expected = []
    for label, name in enumerate(dataset.classes):
        mine = [(str(root / rel), label, color) for rel, (cls, color) in images.items() if cls == name]
        expected += sorted(mine)
    assert len(dataset) == len(expected) == 5
    for index, (path, label, color) in enumerate(expected):
        image, got_label = dataset[index]
        assert dataset.image_path(index) == path
        assert got_label == label and isinstance(got_label, int)
        assert image.mode == "RGB" and color_of(image) == color
    assert dataset.labels.tolist() == [label for _, label, _ in expected]
    assert not dataset.labels.flags.writeable


def test_image_folder_is_deterministic_and_picklable(folder):
    root, _ = folder
    first, second = ImageFolderDataset(str(root)), ImageFolderDataset(root)
    paths = [first.image_path(i) for i in range(len(first))]
    assert paths == [second.image_path(i) for i in range(len(second))]
    restored = pickle.loads(pickle.dumps(first))
    assert [restored.image_path(i) for i in range(len(restored))] == paths
    assert color_of(restored[-1][0]) == color_of(first[len(first) - 1][0])


def test_image_folder_extensions_filter(folder):
    root, _ = folder
    dataset = ImageFolderDataset(root, extensions=("png",))
    names = sorted(os.path.basename(dataset.image_path(i)) for i in range(len(dataset)))
    assert names == ["B.PNG", "c.png", "x.png"]
    assert dataset.classes == ["ant_eater", "cat", "dog", "empty_class"]
    with pytest.raises(ValueError, match="extensions"):
        ImageFolderDataset(root, extensions=())


def test_image_folder_converts_to_rgb(tmp_path):
    write_image(tmp_path / "gray" / "g.png", (100, 100, 100), mode="L")
    write_image(tmp_path / "rgba" / "r.png", (10, 20, 30), mode="RGBA")
    dataset = ImageFolderDataset(tmp_path)
    for index in range(len(dataset)):
        assert dataset[index][0].mode == "RGB"
    assert color_of(dataset[0][0]) == (100, 100, 100)


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"^{missing}: no such directory$"):
        ImageFolderDataset(missing)
    flat = tmp_path / "flat"
    write_image(flat / "a.png", (1, 1, 1))
    with pytest.raises(ValueError, match=f"^{flat}: no class folders"):
        ImageFolderDataset(flat)
    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=f"^{no_images}: no images found"):
        ImageFolderDataset(no_images)


def test_image_folder_reports_broken_links_at_construction(tmp_path):
    write_image(tmp_path / "cat" / "a.png", (1, 1, 1))
    os.symlink(tmp_path / "gone.png", tmp_path / "cat" / "b.png")
    os.symlink(tmp_path / "gone2.png", tmp_path / "cat" / "c.png")
    with pytest.raises(FileNotFoundError) as error:
        ImageFolderDataset(tmp_path)
    first = tmp_path / "cat" / "b.png"
    assert str(error.value) == f"{tmp_path}: 2 of 3 image files do not exist, first: {first}"


def test_corrupt_image_raises_at_getitem_naming_the_file(tmp_path):
    write_image(tmp_path / "cat" / "a.png", (1, 1, 1))
    corrupt = tmp_path / "cat" / "b.png"
    corrupt.write_bytes(b"not a png at all")
    dataset = ImageFolderDataset(tmp_path)
    assert color_of(dataset[0][0]) == (1, 1, 1)
    with pytest.raises(ValueError) as error:
        dataset[1]
    assert str(corrupt) in str(error.value) and "corrupt" in str(error.value) and "\n" not in str(error.value)


def test_indexing(folder):
    root, _ = folder
    dataset = ImageFolderDataset(root)
    assert dataset.image_path(-1) == dataset.image_path(len(dataset) - 1)
    assert dataset[np.int64(0)][1] == dataset.labels[0]
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(dataset)]
    with pytest.raises(TypeError):
        dataset["0"]


# ---------------------------------------------------------------------------------------------------------
# LabelledCsvDataset


@pytest.fixture
def csv_images(tmp_path: Path) -> Path:
    """tmp_path/data with three images: img/0.png red, img/1.png green, img/2.png blue."""
    data = tmp_path / "data"
    for index, color in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250)]):
        write_image(data / "img" / f"{index}.png", color)
    return data


def test_csv_names_and_indices_relative_to_the_file(csv_images, tmp_path, monkeypatch):
    path = write_csv(csv_images / "test.csv", [
        ["label", "filepath", "extra"],
        ["dog", "img/0.png", "x"],
        ["0", "img/1.png", "y"],
        [" bird ", "img/2.png", "z"],
    ])
    monkeypatch.chdir(tmp_path)  # paths are relative to the CSV, not to the working directory
    dataset = LabelledCsvDataset(str(path), classes=["cat", "dog", "bird"])
    assert dataset.classes == ["cat", "dog", "bird"]
    assert dataset.templates == list(DEFAULT_TEMPLATES)
    assert len(dataset) == 3
    assert [dataset[i][1] for i in range(3)] == [1, 0, 2]
    assert [color_of(dataset[i][0]) for i in range(3)] == [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    assert dataset.image_path(0) == str(csv_images / "img" / "0.png")


def test_tsv_custom_columns_absolute_paths_and_explicit_sep(csv_images):
    absolute = str(csv_images / "img" / "2.png")
    tsv = write_csv(csv_images / "test.tsv", [["image", "class"], [absolute, "1"]], sep="\t")
    dataset = LabelledCsvDataset(tsv, ["a", "b"], image_column="image", label_column="class")
    assert dataset.image_path(0) == absolute and dataset[0][1] == 1
    semicolon = write_csv(csv_images / "list.txt", [["filepath", "label"], ["img/0.png", "b"]], sep=";")
    assert LabelledCsvDataset(semicolon, ["a", "b"], sep=";")[0][1] == 1
    with pytest.raises(ValueError, match=r"list\.txt: cannot infer the separator"):
        LabelledCsvDataset(semicolon, ["a", "b"])


def test_csv_classes_from_json_files_and_builtin_sets(csv_images, tmp_path):
    path = write_csv(csv_images / "t.csv", [["filepath", "label"], ["img/0.png", "dog"], ["img/1.png", "1"]])
    as_list = tmp_path / "classes.json"
    as_list.write_text(json.dumps(["cat", "dog"]))
    as_object = tmp_path / "prompts.json"
    as_object.write_text(json.dumps({"classes": ["cat", "dog"], "templates": ["a {} pic."]}))
    from_list = LabelledCsvDataset(path, str(as_list))
    from_object = LabelledCsvDataset(path, as_object)
    assert from_list.classes == from_object.classes == ["cat", "dog"]
    assert from_list.labels.tolist() == from_object.labels.tolist() == [1, 1]
    assert from_list.templates == list(DEFAULT_TEMPLATES) and from_object.templates == ["a {} pic."]
    builtin = LabelledCsvDataset(path, "cifar10")
    cifar10 = load_prompts("cifar10")
    assert builtin.classes == list(cifar10.classes) and builtin.templates == list(cifar10.templates)
    assert builtin.labels.tolist() == [cifar10.classes.index("dog"), 1]
    given = LabelledCsvDataset(path, cifar10)
    assert given.classes == builtin.classes and given.labels.tolist() == builtin.labels.tolist()


def test_labels_that_read_as_name_and_index(csv_images):
    path = write_csv(csv_images / "t.csv", [["filepath", "label"], ["img/0.png", "3"]])
    # clevr_counts names its classes "10", "3", "4", ...: "3" is class 1 by name and class 3 by index.
    clevr = load_prompts("clevr_counts").classes
    with pytest.raises(ValueError) as error:
        LabelledCsvDataset(path, "clevr_counts")
    assert str(error.value) == (
        f"{path}: line 2: label '3' is both the name of class {clevr.index('3')} and the index of class 3; "
        "pass label_kind='name' or 'index'"
    )
    assert LabelledCsvDataset(path, "clevr_counts", label_kind="name")[0][1] == clevr.index("3")
    assert LabelledCsvDataset(path, "clevr_counts", label_kind="index")[0][1] == 3
    # For MNIST both readings agree.
    assert LabelledCsvDataset(path, "mnist")[0][1] == 3
    named = write_csv(csv_images / "n.csv", [["filepath", "label"], ["img/0.png", "cat"]])
    with pytest.raises(ValueError, match=r"line 2: label 'cat' is not an integer class index"):
        LabelledCsvDataset(named, ["cat"], label_kind="index")
    with pytest.raises(ValueError, match="label_kind must be one of"):
        LabelledCsvDataset(named, ["cat"], label_kind="names")


def test_duplicate_builtin_names_need_an_index(csv_images):
    path = write_csv(csv_images / "t.csv", [
        ["filepath", "label"], ["img/0.png", "657"], ["img/1.png", "missile"]
    ])
    with pytest.raises(ValueError, match=r"line 3: label 'missile' is ambiguous, classes 657 and 744"):
        LabelledCsvDataset(path, "imagenet")
    indexed = write_csv(csv_images / "i.csv", [
        ["filepath", "label"], ["img/0.png", "744"], ["img/1.png", "tench"]
    ])
    assert LabelledCsvDataset(indexed, "imagenet").labels.tolist() == [744, 0]


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([["filepath", "label"], ["img/0.png", "cat"], ["img/1.png", "cow"]],
         "line 3: unknown label 'cow', not one of the 2 class names"),
        ([["filepath", "label"], ["img/0.png", "2"]], "line 2: label index 2 out of range for 2 classes"),
        ([["filepath", "label"], ["img/0.png", "-1"]], "line 2: label index -1 out of range for 2 classes"),
        ([["filepath", "label"], ["img/0.png", ""]], "line 2: empty or missing 'label' field"),
        ([["path", "label"], ["img/0.png", "cat"]],
         "no column 'filepath'; available columns: 'path', 'label'"),
        ([["filepath", "klass"], ["img/0.png", "cat"]], "no column 'label'"),
        ([["filepath", "label"]], "no rows after the header"),
        ([["filepath", "label"], ["img/0.png", "cat"], ["img/1.png"]],
         "line 3: empty or missing 'label' field"),
        ([["filepath", "label"], ["", "cat"]], "line 2: empty or missing 'filepath' field"),
    ],
)
def test_csv_errors_name_the_file_and_line(csv_images, rows, expected):
    path = write_csv(csv_images / "bad.csv", rows)
    with pytest.raises(ValueError) as error:
        LabelledCsvDataset(path, ["cat", "dog"])
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_csv_empty_and_missing_files(csv_images):
    empty = csv_images / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv: empty file"):
        LabelledCsvDataset(empty, ["cat"])
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: no such CSV file"):
        LabelledCsvDataset(csv_images / "nope.csv", ["cat"])


def test_csv_missing_images_reported_at_construction(csv_images):
    path = write_csv(csv_images / "t.csv", [
        ["filepath", "label"], ["img/0.png", "cat"], ["img/gone.png", "cat"], ["img/1.png", "cat"],
        ["img/gone2.png", "cat"],
    ])
    with pytest.raises(FileNotFoundError) as error:
        LabelledCsvDataset(path, ["cat"])
    assert str(error.value) == (
        f"{path}: 2 of 4 image files do not exist, first: {csv_images / 'img' / 'gone.png'} (line 3)"
    )


def test_csv_corrupt_image_raises_at_getitem(csv_images):
    (csv_images / "img" / "bad.png").write_bytes(b"\x89PNG truncated")
    path = write_csv(csv_images / "t.csv", [
        ["filepath", "label"], ["img/0.png", "cat"], ["img/bad.png", "cat"]
    ])
    dataset = LabelledCsvDataset(path, ["cat"])
    assert dataset[0][1] == 0
    with pytest.raises(ValueError, match=re.escape(str(csv_images / "img" / "bad.png"))):
        dataset[1]


def test_csv_bad_classes_argument(csv_images, tmp_path):
    path = write_csv(csv_images / "t.csv", [["filepath", "label"], ["img/0.png", "cat"]])
    with pytest.raises(ValueError, match="classes must be a list of class names"):
        LabelledCsvDataset(path, 5)
    with pytest.raises(ValueError, match=r"classes argument: class name 'cat' appears twice"):
        LabelledCsvDataset(path, ["cat", "cat"])
    with pytest.raises(FileNotFoundError, match=r"nope\.json: no such prompt file"):
        LabelledCsvDataset(path, str(tmp_path / "nope.json"))


def test_csv_image_root_resolves_relative_paths_and_a_missing_one_is_named(csv_images, tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    absolute = str(csv_images / "img" / "2.png")
    path = write_csv(lists / "t.csv", [["filepath", "label"], ["0.png", "cat"], [absolute, "dog"]])
    with pytest.raises(FileNotFoundError, match=re.escape(str(lists / "0.png"))):
        LabelledCsvDataset(path, ["cat", "dog"])  # by default relative to the CSV's folder
    monkeypatch.chdir(csv_images)
    dataset = LabelledCsvDataset(path, ["cat", "dog"], image_root="img")  # a relative root: from the working dir
    assert [dataset.image_path(i) for i in range(2)] == [str(csv_images / "img" / "0.png"), absolute]
    assert color_of(dataset[0][0]) == (250, 0, 0)
    with pytest.raises(FileNotFoundError) as error:
        LabelledCsvDataset(path, ["cat", "dog"], image_root=tmp_path / "nowhere")
    assert str(error.value) == f"image_root {tmp_path / 'nowhere'}: no such directory"


def test_a_plain_class_list_is_marked_as_bringing_no_templates(csv_images, tmp_path):
    path = write_csv(csv_images / "t.csv", [["filepath", "label"], ["img/0.png", "cat"]])
    (tmp_path / "list.json").write_text(json.dumps(["cat", "dog"]))
    (tmp_path / "names.json").write_text(json.dumps({"classes": ["cat", "dog"]}))
    (tmp_path / "given.json").write_text(json.dumps({"classes": ["cat", "dog"], "templates": ["a photo of a {}."]}))
    defaulted = {classes: LabelledCsvDataset(path, classes).default_templates
                 for classes in (str(tmp_path / "list.json"), str(tmp_path / "names.json"),
                                 str(tmp_path / "given.json"), "cifar10")}
    assert LabelledCsvDataset(path, ["cat", "dog"]).default_templates
    assert list(defaulted.values()) == [True, True, False, False]
    assert LabelledCsvDataset(path, str(tmp_path / "given.json")).templates == list(DEFAULT_TEMPLATES)


def test_groups_from_a_csv_column_or_a_path_component(csv_images):
    for index in range(3):
        os.makedirs(csv_images / "obj" / f"o{index % 2}", exist_ok=True)
        os.link(csv_images / "img" / f"{index}.png", csv_images / "obj" / f"o{index % 2}" / f"{index}.png")
    path = write_csv(csv_images / "t.csv", [
        ["filepath", "label", "object"],
        ["obj/o0/0.png", "cat", "a"], ["obj/o1/1.png", "cat", "b"], ["obj/o0/2.png", "dog", "a"],
    ])
    dataset = LabelledCsvDataset(path, ["cat", "dog"])
    assert dataset.groups("object") == ["a", "b", "a"]
    assert dataset.groups("path:1") == dataset.groups("path:-2") == ["o0", "o1", "o0"]
    assert dataset.groups("path:-1") == ["0.png", "1.png", "2.png"]
    with pytest.raises(ValueError, match=r"t\.csv: no column 'domain'; available columns: 'filepath', 'label', 'objec"):
        dataset.groups("domain")
    with pytest.raises(ValueError, match=r"^path:3: image 0 \(obj/o0/0\.png\) has 3 path components, no component 3$"):
        dataset.groups("path:3")
    with pytest.raises(ValueError, match=r"^val_groups 'path:x': expected 'path:N' with N an integer"):
        dataset.groups("path:x")
    blank = write_csv(csv_images / "b.csv", [["filepath", "label", "object"], ["img/0.png", "cat", ""]])
    with pytest.raises(ValueError, match=r"b\.csv: line 2: empty or missing 'object' field"):
        LabelledCsvDataset(blank, ["cat"]).groups("object")


def test_image_folder_groups_by_the_path_below_its_root(folder):
    root, _ = folder
    dataset = ImageFolderDataset(root)
    assert dataset.groups("path:0") == [dataset.classes[label] for label in dataset.labels]
    assert dataset.groups("path:-1") == [os.path.basename(dataset.image_path(i)) for i in range(len(dataset))]
    with pytest.raises(ValueError, match=r"^ImageFolderDataset has no column 'object'"):
        dataset.groups("object")


# ---------------------------------------------------------------------------------------------------------
# check_class_names


def test_matching_names_pass_loosely():
    check_class_names(["apple_pie", "Baby_Back_Ribs"], ["apple pie", "baby back ribs"], "food")
    check_class_names(["cat", "dog"], ["cat", "dog"], "pets")


def test_builtin_names_as_folder_names_and_shuffled():
    food = list(load_prompts("food101").classes)
    folders = sorted(name.replace(" ", "_") for name in food)
    check_class_names(folders, food, "food101")
    swapped = folders[:]
    swapped[3], swapped[7] = swapped[7], swapped[3]
    expected = f"food101: class 3 is '{swapped[3]}' in the dataset but '{food[3]}'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_class_names(swapped, food, "food101")


def test_count_mismatch_names_the_counts_and_first_unmatched_classes():
    with pytest.raises(ValueError) as error:
        check_class_names(["cat", "dog", "horse"], ["cat", "dog"], "catalog.pets")
    assert str(error.value) == (
        "catalog.pets: the dataset has 3 classes, the prompt set 2; first dataset class not in the prompt "
        "set: 'horse'"
    )
    with pytest.raises(ValueError) as error:
        check_class_names(["cat"], ["cat", "dog"], "x")
    assert str(error.value).endswith("first prompt class not in the dataset: 'dog'")
    with pytest.raises(ValueError, match=r"^imagenet: the dataset has 2 classes, the prompt set 3$"):
        check_class_names(["n01440764", "n01443537"], ["tench", "goldfish", "shark"], "imagenet")


def test_different_order_is_an_error_naming_the_first_misplaced_class():
    with pytest.raises(ValueError) as error:
        check_class_names(["dog", "cat"], ["cat", "dog"], "where")
    assert str(error.value) == (
        "where: class 0 is 'dog' in the dataset but 'cat' in the prompt set, which has 'dog' at index 1; "
        "the class orders differ"
    )


def test_ids_and_renamed_classes_are_checked_by_count_only():
    check_class_names(["n01440764", "n01443537"], ["tench", "goldfish"], "imagenet")
    check_class_names(["00000", "00001"], ["stop", "yield"], "gtsrb")
    caltech_folders = ["BACKGROUND_Google", "Faces", "Faces_easy", "accordion"]
    caltech_prompts = ["background", "off-center face", "centered face", "accordion"]
    check_class_names(caltech_folders, caltech_prompts, "caltech101")
    with pytest.raises(ValueError, match="class 0 is 'accordion'"):
        check_class_names(caltech_folders[::-1], caltech_prompts, "caltech101")


def test_duplicate_prompt_names_accept_either_position():
    imagenet = list(load_prompts("imagenet").classes)
    folders = [f"n{i:08d}" for i in range(1000)]
    folders[657], folders[744] = "missile", "missile"
    check_class_names(folders, imagenet, "imagenet")


def test_image_folder_follows_links_but_not_cycles(tmp_path):
    write_image(tmp_path / "store" / "a.png", (5, 5, 5))
    root = tmp_path / "root"
    (root / "cat").mkdir(parents=True)
    os.symlink(tmp_path / "store", root / "cat" / "linked")
    os.symlink(root / "cat", root / "cat" / "linked" / "loop")
    dataset = ImageFolderDataset(root)
    assert [dataset.image_path(i) for i in range(len(dataset))] == [str(root / "cat" / "linked" / "a.png")]
