"""Class names and prompt templates for zero-shot classification: the built-in sets and user JSON files.

The built-in sets are CLIP's prompt engineering for 28 downstream datasets, as published in the SLIP
repository and shipped unchanged in ``slip/assets/zeroshot/`` (its README gives provenance and licence);
SLIP's keys ``ucf101_frames`` and ``kinetics700_frames`` are offered as ``ucf101`` and ``kinetics700``.

A user file is a JSON object ``{"classes": [...], "templates": [...]}`` (``templates`` may be left out: it
defaults to ``["a photo of a {}."]``, and `ClassPrompts.default_templates` says so), or just the list of classes.

A class is a name, or a list of synonyms whose first entry is its name: CLIP describes the FER2013 classes
that way (``["happy", "smiling"]``) and averages the prompts of all synonyms. A template holds exactly one
``{}``, where the class name goes, and no other braces.

Class names must be unique in user files. The built-in sets are taken as published: CLIP's ImageNet list
names two pairs of classes alike ("missile", "sunglasses"), and each keeps its position because positions
are the datasets' label indices.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import reprlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from slip.error_text import one_line

__all__ = ["DEFAULT_TEMPLATES", "ClassPrompts", "builtin_prompt_sets", "load_prompts", "parse_prompts"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)
_CLASSNAMES_FILE = "classnames.json"
_TEMPLATES_FILE = "templates.json"
_USER_KEYS = ("classes", "templates")
# SLIP names the two video datasets after the frames it classifies; we use the datasets' names.
_RENAMED_KEYS = MappingProxyType({"ucf101_frames": "ucf101", "kinetics700_frames": "kinetics700"})


@dataclass(frozen=True)
class ClassPrompts:
    """The class names and prompt templates of one zero-shot task.

    `synonyms`, when not empty, holds every name of each class, its class name first; zero-shot then
    averages the prompts of all of them. Empty means each class has just its name. `default_templates` is true
    where the user's list or file brought no templates and `DEFAULT_TEMPLATES` stands in (not compared).
    """

    classes: tuple[str, ...]
    templates: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...] = ()
    default_templates: bool = field(default=False, compare=False)

    def class_texts(self) -> list[list[str]]:
        """Per class, its prompts: every template filled with every name of the class."""
        names = self.synonyms or tuple((name,) for name in self.classes)
        return [[template.format(name) for template in self.templates for name in group] for group in names]


def _brief(value: Any) -> str:
    """A short repr of `value` for error messages (long strings and lists are cut)."""
    shortener = reprlib.Repr()
    shortener.maxstring, shortener.maxother, shortener.maxlist = 80, 80, 4
    return shortener.repr(value)


def _asset_text(filename: str) -> str:
    """The text of a file shipped in slip/assets/zeroshot."""
    return (importlib.resources.files("slip") / "assets" / "zeroshot" / filename).read_text(encoding="utf-8")


def _builtin_table(filename: str) -> dict[str, Any]:
    """A parsed built-in table (key -> entries), under our dataset keys."""
    table = json.loads(_asset_text(filename))
    return {_RENAMED_KEYS.get(key, key): entries for key, entries in table.items()}


def _builtin_tables() -> tuple[dict[str, Any], dict[str, Any]]:
    """The built-in class-names and templates tables."""
    return _builtin_table(_CLASSNAMES_FILE), _builtin_table(_TEMPLATES_FILE)


def builtin_prompt_sets() -> list[str]:
    """Keys of the built-in prompt sets (datasets with both class names and templates), sorted."""
    classnames, templates = _builtin_tables()
    return _shared_keys(classnames, templates)


def _shared_keys(classnames: dict[str, Any], templates: dict[str, Any]) -> list[str]:
    """The sorted keys present in both built-in tables."""
    return sorted(set(classnames) & set(templates))


def _class_groups(entries: Any, where: str, unique: bool) -> tuple[tuple[str, ...], ...]:
    """Validated classes, each as its tuple of names (class name first)."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: 'classes' must be a non-empty list of class names, got {_brief(entries)}")
    groups = []
    for index, entry in enumerate(entries):
        names = entry if isinstance(entry, list) else [entry]
        if not names or not all(isinstance(name, str) and name.strip() for name in names):
            raise ValueError(
                f"{where}: classes[{index}] is {_brief(entry)}; expected a class name (a non-blank string) "
                "or a non-empty list of synonyms"
            )
        groups.append(tuple(names))
    if unique:
        first_seen: dict[str, int] = {}
        for index, names in enumerate(groups):
            for name in names:
                if name in first_seen:
                    raise ValueError(
                        f"{where}: class name {name!r} appears twice, in classes[{first_seen[name]}] and "
                        f"classes[{index}]"
                    )
                first_seen[name] = index
    return tuple(groups)


def _check_templates(entries: Any, where: str) -> tuple[str, ...]:
    """Validated templates: non-empty list of strings, each with exactly one "{}" and no other brace."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: 'templates' must be a non-empty list of strings, got {_brief(entries)}")
    for index, template in enumerate(entries):
        if not isinstance(template, str):
            raise ValueError(f"{where}: templates[{index}] is {_brief(template)}, not a string")
        rest = template.replace("{}", "")
        if template.count("{}") != 1 or "{" in rest or "}" in rest:
            raise ValueError(
                f"{where}: templates[{index}] {template!r} must contain exactly one '{{}}' (where the class "
                "name goes) and no other braces"
            )
    return tuple(entries)


def _build(classes: Any, templates: Any, where: str, unique: bool, default: bool = False) -> ClassPrompts:
    """A validated ClassPrompts; errors name `where`. `default`: the templates are `DEFAULT_TEMPLATES`, standing in
    for none given."""
    groups = _class_groups(classes, where, unique)
    return ClassPrompts(
        classes=tuple(names[0] for names in groups),
        templates=_check_templates(templates, where),
        synonyms=groups if any(len(names) > 1 for names in groups) else (),
        default_templates=default,
    )


def parse_prompts(data: Any, where: str) -> ClassPrompts:
    """ClassPrompts from parsed user JSON: {"classes": [...], "templates": [...]} or a list of classes."""
    if isinstance(data, list):
        return _build(data, list(DEFAULT_TEMPLATES), where, unique=True, default=True)
    if not isinstance(data, dict):
        raise ValueError(
            f"{where}: expected a JSON object with 'classes' (and optionally 'templates') or a list of class "
            f"names, got {type(data).__name__}"
        )
    unknown = [key for key in data if key not in _USER_KEYS]
    if unknown:
        expected = "expected 'classes' and optionally 'templates'"
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; {expected}")
    if "classes" not in data:
        raise ValueError(f"{where}: no 'classes' key")
    return _build(data["classes"], data.get("templates", list(DEFAULT_TEMPLATES)), where, unique=True,
                  default="templates" not in data)


def load_prompts(spec: str | os.PathLike[str]) -> ClassPrompts:
    """The prompt set `spec`: a built-in key (see builtin_prompt_sets) or the path of a user JSON file.

    A built-in key wins over a file of the same name; write ``./imagenet`` to read such a file.
    """
    spec = os.fspath(spec)
    classnames, templates = _builtin_tables()
    keys = _shared_keys(classnames, templates)
    if spec in keys:
        # Validated like a user file, except that duplicate names are kept (see the module docstring).
        return _build(classnames[spec], templates[spec], f"built-in prompt set {spec!r}", unique=False)
    try:
        with open(spec, "rb") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{spec}: no such prompt file, and not a built-in prompt set ({', '.join(keys)})"
        ) from None
    except IsADirectoryError:
        raise ValueError(f"{spec}: is a directory, expected a JSON prompt file") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{spec}: not valid JSON: {one_line(error)}") from None
    return parse_prompts(data, spec)

