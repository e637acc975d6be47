"""Built-in zero-shot prompt sets (CLIP's, as published by SLIP) and user prompt files."""
from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest

from slip.prompts import (
    DEFAULT_TEMPLATES,
    ClassPrompts,
    builtin_prompt_sets,
    load_prompts,
    parse_prompts,
)

# Class counts of the datasets (published dataset facts; SLIP's keys ucf101_frames/kinetics700_frames are
# offered as ucf101/kinetics700).
EXPECTED_COUNTS = {
    "imagenet": 1000, "cifar10": 10, "cifar100": 100, "stl10": 10, "mnist": 10, "food101": 101, "cars": 196,
    "aircraft": 100, "dtd": 47, "pets": 37, "caltech101": 102, "flowers": 102, "sun397": 397, "birdsnap": 500,
    "eurosat": 10, "resisc45": 45, "gtsrb": 43, "kitti_distance": 4, "country211": 211, "patch_camelyon": 2,
    "ucf101": 101, "kinetics700": 700, "clevr_counts": 8, "hateful_memes": 2, "rendered_sst2": 2,
    "cub200": 200, "voc2007": 20, "fer2013": 7,
}
PUBLISHED_KEYS = {"ucf101": "ucf101_frames", "kinetics700": "kinetics700_frames"}
# Sizes in characters of SLIP's labels.json and templates.json (commit d1de3e7), which we store unchanged.
PUBLISHED_SIZES = {"classnames.json": 103088, "templates.json": 9108}


def asset(name: str) -> str:
    """Text of a file in slip/assets/zeroshot, read directly (not through the code under test)."""
    return importlib.resources.files("slip").joinpath("assets", "zeroshot", name).read_text(encoding="utf-8")


def write_json(path: Path, data: object) -> Path:
    """Write `data` as JSON to `path`."""
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# Built-in sets


def test_builtin_sets_are_the_expected_datasets_sorted():
    assert builtin_prompt_sets() == sorted(EXPECTED_COUNTS)


@pytest.mark.parametrize("key", sorted(EXPECTED_COUNTS))
def test_builtin_set_loads_with_expected_class_count_and_valid_templates(key):
    prompts = load_prompts(key)
    assert isinstance(prompts, ClassPrompts)
    assert len(prompts.classes) == EXPECTED_COUNTS[key]
    assert prompts.templates
    for template in prompts.templates:
        assert template.count("{}") == 1
        assert template.format("QQQ").count("QQQ") == 1


def test_asset_files_keep_the_published_sizes_and_keys():
    for name, size in PUBLISHED_SIZES.items():
        assert len(asset(name)) == size
    classnames, templates = json.loads(asset("classnames.json")), json.loads(asset("templates.json"))
    assert list(classnames) == list(templates)  # every class-names key has templates


@pytest.mark.parametrize("key", sorted(EXPECTED_COUNTS))
def test_builtin_set_equals_the_raw_asset_entries(key):
    raw_key = PUBLISHED_KEYS.get(key, key)
    raw_classes = json.loads(asset("classnames.json"))[raw_key]
    raw_templates = json.loads(asset("templates.json"))[raw_key]
    prompts = load_prompts(key)
    first_names = [entry[0] if isinstance(entry, list) else entry for entry in raw_classes]
    assert list(prompts.classes) == first_names
    assert list(prompts.templates) == raw_templates


def test_builtin_spot_checks_against_clip_lists():
    imagenet = load_prompts("imagenet").classes
    assert (imagenet[0], imagenet[1], imagenet[999]) == ("tench", "goldfish", "toilet paper")
    assert load_prompts("cifar10").classes == (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    )
    assert load_prompts("mnist").templates == ('a photo of the number: "{}".',)
    assert load_prompts("caltech101").classes[30] == "head of a  crocodile"  # published with two spaces


def test_imagenet_keeps_clip_duplicate_names_in_place():
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(load_prompts("imagenet").classes):
        positions.setdefault(name, []).append(index)
    assert {name: where for name, where in positions.items() if len(where) > 1} == {
        "missile": [657, 744], "sunglasses": [836, 837]
    }


def test_frames_keys_are_offered_under_dataset_names_only():
    keys = builtin_prompt_sets()
    assert "ucf101_frames" not in keys and "kinetics700_frames" not in keys
    with pytest.raises(FileNotFoundError, match="ucf101_frames: no such prompt file"):
        load_prompts("ucf101_frames")


def test_fer2013_synonyms_and_class_texts():
    prompts = load_prompts("fer2013")
    assert prompts.classes == ("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised")
    assert prompts.synonyms[3] == ("happy", "smiling")
    texts = prompts.class_texts()
    assert len(texts) == 7
    for names, class_texts in zip(prompts.synonyms, texts):
        expected = []
        for template in prompts.templates:
            for name in names:
                expected.append(template.replace("{}", name))
        assert class_texts == expected


def test_class_texts_without_synonyms_is_templates_times_classes():
    prompts = load_prompts("stl10")
    assert prompts.synonyms == ()
    expected = [[template.replace("{}", name) for template in prompts.templates] for name in prompts.classes]
    assert prompts.class_texts() == expected
    assert ClassPrompts(("a", "b"), ("x {} y",)).class_texts() == [["x a y"], ["x b y"]]


# ---------------------------------------------------------------------------------------------------------
# User files


def test_user_file_with_classes_and_templates(tmp_path):
    data = {"classes": ["cat", ["dog", "puppy"]], "templates": ["a {}.", "{}!"]}
    path = write_json(tmp_path / "p.json", data)
    prompts = load_prompts(str(path))
    assert prompts == ClassPrompts(("cat", "dog"), ("a {}.", "{}!"), (("cat",), ("dog", "puppy")))
    assert prompts.class_texts() == [["a cat.", "cat!"], ["a dog.", "a puppy.", "dog!", "puppy!"]]


def test_user_file_templates_default_and_list_form(tmp_path):
    object_form = load_prompts(write_json(tmp_path / "a.json", {"classes": ["cat", "dog"]}))
    list_form = load_prompts(write_json(tmp_path / "b.json", ["cat", "dog"]))
    assert object_form == list_form == ClassPrompts(("cat", "dog"), ("a photo of a {}.",))
    assert DEFAULT_TEMPLATES == ("a photo of a {}.",)


def test_builtin_key_wins_over_a_file_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "mnist", {"classes": ["x"]})
    assert len(load_prompts("mnist").classes) == 10
    assert load_prompts("./mnist").classes == ("x",)


@pytest.mark.parametrize(
    "data, fragments",
    [
        (5, ["expected a JSON object", "int"]),
        ({"classes": ["a"], "template": ["{}"]}, ["unknown key 'template'"]),
        ({"templates": ["{}"]}, ["no 'classes' key"]),
        ({"classes": []}, ["'classes' must be a non-empty list"]),
        ({"classes": "cat"}, ["'classes' must be a non-empty list", "'cat'"]),
        ({"classes": ["cat", 5]}, ["classes[1] is 5"]),
        ({"classes": ["cat", "  "]}, ["classes[1] is '  '"]),
        ({"classes": ["cat", []]}, ["classes[1] is []"]),
        ({"classes": ["cat", ["dog", 3]]}, ["classes[1] is ['dog', 3]"]),
        ({"classes": ["cat", "dog", "cat"]}, ["class name 'cat' appears twice", "classes[0]", "classes[2]"]),
        ({"classes": ["cat", ["dog", "cat"]]}, ["'cat' appears twice", "classes[0]", "classes[1]"]),
        ({"classes": ["cat"], "templates": []}, ["'templates' must be a non-empty list"]),
        ({"classes": ["cat"], "templates": "a {}"}, ["'templates' must be a non-empty list"]),
        ({"classes": ["cat"], "templates": ["a {}", 7]}, ["templates[1] is 7, not a string"]),
        ({"classes": ["cat"], "templates": ["a photo"]}, ["templates[0] 'a photo'", "exactly one '{}'"]),
        ({"classes": ["cat"], "templates": ["{} and {}"]}, ["templates[0] '{} and {}'", "exactly one '{}'"]),
        ({"classes": ["cat"], "templates": ["{0} {}"]}, ["templates[0] '{0} {}'", "no other braces"]),
        ({"classes": ["cat"], "templates": ["{} }"]}, ["templates[0] '{} }'"]),
    ],
)
def test_user_file_errors_name_the_file_and_entry(tmp_path, data, fragments):
    path = write_json(tmp_path / "prompts.json", data)
    with pytest.raises(ValueError) as error:
        load_prompts(str(path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_missing_file_names_it_and_lists_builtin_keys(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError) as error:
        load_prompts(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: no such prompt file")
    assert "imagenet" in message and "\n" not in message


def test_invalid_json_and_directory_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"classes": [', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_prompts(str(broken))
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes(b'{"classes": ["caf\xe9"]}')
    with pytest.raises(ValueError, match=r"latin1\.json: not valid JSON"):
        load_prompts(str(not_utf8))
    with pytest.raises(ValueError, match="is a directory"):
        load_prompts(str(tmp_path))


def test_long_bad_entries_are_shortened_in_messages():
    with pytest.raises(ValueError) as error:
        parse_prompts({"classes": ["ok", list(range(1000))]}, "where")
    assert len(str(error.value)) < 300
