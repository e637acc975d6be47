"""Config checking: every `_target_` node is validated against its builder's signature before any work."""
from __future__ import annotations

import collections.abc
import difflib
import functools
import inspect
import itertools
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config key with a wrong name, type or value; the message starts with the key."""


# Keys that users may still write under an old name: old dotted key -> (new dotted key, what it is).
RENAMED_KEYS: collections.abc.Mapping[str, tuple[str, str]] = types.MappingProxyType({
    "augment.ssl_scale": ("augment.ssl_crop_scale",
                          "the SSL views' crop-area range; loss.ssl_scale is the SSL loss weight"),
})
# Builders that moved module: old `_target_` -> new, for configs saved in checkpoints of earlier versions.
MOVED_TARGETS: collections.abc.Mapping[str, str] = types.MappingProxyType({
    **{f"slip.data.datasets.{name}": f"slip.data.sources.{name}" for name in
       ("CsvSource", "CocoCaptionsSource", "ConceptualCaptionsSource", "RedCapsSource", "YFCC15MSource")},
    "slip.data.datasets.WebDatasetStream": "slip.data.webdataset.WebDatasetStream",
})
DATA_SETTINGS_TARGET = "slip.data.DataSettings"
# The only command-line flag `check_override_keys` reads past; with any other flag Hydra alone reads the line.
MULTIRUN_FLAGS = ("-m", "--multirun")
_ABSENT = object()


def _renamed_key_error(old: str) -> ConfigError:
    new, meaning = RENAMED_KEYS[old]
    return ConfigError(f"{old}: renamed to {new} ({meaning})")


def check_renamed_keys(cfg: DictConfig) -> None:
    """Raise a one-line ConfigError naming the new key where `cfg` still sets a renamed one."""
    for old in RENAMED_KEYS:
        if OmegaConf.select(cfg, old, default=_ABSENT) is not _ABSENT:
            raise _renamed_key_error(old)


def check_renamed_overrides(overrides: collections.abc.Sequence[str]) -> None:
    """The same for command-line overrides (``key=value``, ``+key=value``, ``~key``), before Hydra reads them."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in RENAMED_KEYS:
            raise _renamed_key_error(key)


def check_override_keys(config_dir: str | os.PathLike, config_name: str,
                        args: collections.abc.Sequence[str]) -> None:
    """Raise a one-line ConfigError for a command-line override that sets or deletes a key the composed config
    lacks, or picks a group option that does not exist, naming the closest valid one; for each combination of
    swept group options. Adds (`+key=`), Hydra's own settings and lines Hydra cannot parse are left to Hydra."""
    if any(arg.startswith("-") and arg not in MULTIRUN_FLAGS for arg in args):
        return  # --config-dir, --cfg, --help, ...: another config or no run; Hydra reads those lines
    try:
        overrides = OverridesParser.create().parse_overrides([arg for arg in args if arg not in MULTIRUN_FLAGS])
    except Exception:  # a syntax error: Hydra's own message points at it
        return
    overrides = [o for o in overrides if not o.is_hydra_override() and o.package is None]
    added = [o.key_or_group for o in overrides if o.is_add() or o.is_force_add()]
    with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        is_group = [loader.repository.group_exists(o.key_or_group) for o in overrides]
        choices = [_group_choices(loader, o) for o, group in zip(overrides, is_group) if group]
        keys = [o.key_or_group for o, group in zip(overrides, is_group) if not group and not o.is_add()
                and not o.is_force_add() and "/" not in o.key_or_group
                and not any(o.key_or_group == a or o.key_or_group.startswith(f"{a}.") for a in added)]
        if not keys:
            return
        unknown: dict[str, list[tuple[str, str]]] = {key: [] for key in keys}  # key -> (selection, hint) per miss
        for combination in itertools.product(*choices):
            try:
                cfg = compose(config_name, overrides=list(combination))
            except Exception:  # what fails here fails in Hydra too, with its own message
                return
            selection = " ".join(choice for choice, options in zip(combination, choices) if len(options) > 1)
            for key in keys:
                hint = _unknown_key_hint(cfg, key)
                if hint is not None:
                    unknown[key].append((selection, hint))
    for key, misses in unknown.items():
        if misses:
            selection, hint = misses[0]
            only_some = len(misses) < math.prod(len(options) for options in choices)  # the key is in other runs
            raise ConfigError(f"{key}: unknown key{f' with {selection}' if only_some else ''} ({hint})")


def _group_options(loader: Any, group: str) -> list[str]:
    """The options of config group `group`, those in its subgroups as `sub/option`."""
    options = list(loader.get_group_options(group))
    for sub in loader.get_group_options(group, results_filter=ObjectType.GROUP):
        options += [f"{sub}/{option}" for option in _group_options(loader, f"{group}/{sub}")]
    return options


def _group_choices(loader: Any, override: Override) -> list[str]:
    """`override` as one override per option it selects (a sweep gives several), each option checked to exist."""
    value = override.value()
    if override.is_delete() or value is None or isinstance(value, (list, dict)) or override.is_interval_sweep():
        return [override.input_line]
    group = override.key_or_group
    options = _group_options(loader, group)
    if isinstance(value, Glob):
        picked = value.filter(options)
    elif override.is_sweep_override():
        picked = list(override.sweep_string_iterator())
    else:
        picked = [override.get_value_element_as_str()]
    prefix = "++" if override.is_force_add() else "+" if override.is_add() else ""
    for option in picked:
        if option not in options:
            close = difflib.get_close_matches(option, options, n=1)
            hint = f"did you mean {group}={close[0]}?" if close else f"options: {', '.join(options)}"
            raise ConfigError(f"{group}={option}: unknown option ({hint})")
    return [f"{prefix}{group}={option}" for option in picked]


def _child(node: Any, name: str) -> Any:
    """The child config node `name` of `node`, or None where Hydra would not refuse a new key there."""
    if not isinstance(node, DictConfig) or node._is_none() or not OmegaConf.is_struct(node):
        return None
    return node._get_node(name) if name in node.keys() else _ABSENT


def _unknown_key_hint(cfg: DictConfig, key: str) -> str | None:
    """None where struct `cfg` has `key` (or would take it); else where to look: the closest existing key, or the
    keys of the deepest node that exists."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        child = _child(node, part)
        if child is None:
            return None
        if child is _ABSENT:
            siblings = [str(name) for name in node.keys()]
            for close in difflib.get_close_matches(part, siblings, n=3):
                candidate = ".".join([*parts[:depth], close, *parts[depth + 1:]])
                if _has_key(cfg, candidate):
                    return f"did you mean {candidate}?"
            return f"{'.'.join(parts[:depth]) or 'the top level'} has: {', '.join(siblings)}"
        node = child
    return None


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether `cfg` has the dotted `key` (a missing value counts as present)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def upgrade_saved_config(saved: DictConfig) -> DictConfig:
    """A config saved by an earlier version in today's layout: renamed keys and moved builders under their new
    names, and the `data` node checked by its builder; used to compare a checkpoint's config with today's."""
    upgraded = OmegaConf.create(OmegaConf.to_container(saved, resolve=False))
    for old, (new, _) in RENAMED_KEYS.items():
        value = OmegaConf.select(upgraded, old, default=_ABSENT)
        if value is not _ABSENT:
            OmegaConf.update(upgraded, new, value, force_add=True)
            parent, _, leaf = old.rpartition(".")
            upgraded_parent = OmegaConf.select(upgraded, parent) if parent else upgraded
            del upgraded_parent[leaf]
    data = upgraded.get("data")
    if isinstance(data, DictConfig) and "_target_" not in data and ("source" in data or "stream" in data):
        data["_target_"] = DATA_SETTINGS_TARGET
    _move_targets(upgraded)
    return upgraded


def fill_added_defaults(saved: Any, current: Any) -> None:
    """Give `saved` (in place) the keys that `current`'s builder nodes have and it lacks, where `current` sets them
    to the builder's default: a key added in a later version, left at its default, changes nothing."""
    if not (isinstance(saved, DictConfig) and isinstance(current, DictConfig)):
        return
    target = current.get("_target_")
    defaults: dict[str, Any] = {}
    if isinstance(target, str) and saved.get("_target_") == target:
        try:
            defaults = {name: parameter.default for name, parameter in inspect.signature(get_method(target)).parameters
                        .items() if parameter.default is not inspect.Parameter.empty}
        except Exception:  # an unimportable target: nothing to fill
            defaults = {}
    for name in current:
        if name not in saved:
            if name in defaults and OmegaConf.select(current, str(name)) == defaults[name]:
                saved[name] = current[name]
        else:
            fill_added_defaults(saved[name], current[name])


def _move_targets(node: Any) -> None:
    if isinstance(node, DictConfig):
        for name in node:
            if name == "_target_" and node[name] in MOVED_TARGETS:
                node[name] = MOVED_TARGETS[node[name]]
            else:
                _move_targets(node[name])
    elif isinstance(node, ListConfig):
        for item in node:
            _move_targets(item)


def _accepts(value: Any, annotation: Any) -> bool:
    """Whether a plain config value fits a (simple) type annotation; unknown annotations accept anything."""
    if annotation in (inspect.Parameter.empty, Any) or isinstance(annotation, typing.TypeVar):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return isinstance(value, (dict, DictConfig))
    if inspect.isclass(annotation) and origin is None and not issubclass(annotation, os.PathLike):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_node(node: DictConfig, key: str) -> None:
    """Raise ConfigError if `node`'s keys or value types do not fit the signature of its `_target_`."""
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        name = missing[0] if missing[0].startswith(f"{key}.") else f"{key}.{missing[0]}"
        raise ConfigError(f"{name}: required but not set (set it on the command line: {name}=...)")
    target_name = node.get("_target_")
    try:
        target = get_method(target_name) if isinstance(target_name, str) else None
    except Exception:  # hydra raises several kinds for a bad path
        target = None
    if target is None:
        raise ConfigError(f"{key}._target_: cannot import {target_name!r}")
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable forward references: skip type checks, keep name checks
        hints = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    for name in node:
        if str(name).startswith("_") and str(name).endswith("_"):
            continue
        if name not in signature.parameters:
            if takes_any:
                continue
            allowed = ", ".join(p for p in signature.parameters if p not in ("self", "args", "kwargs"))
            raise ConfigError(f"{key}.{name}: unknown key for {target_name} (allowed: {allowed})")
        value = values[name]
        annotation = hints.get(name, signature.parameters[name].annotation)
        if not isinstance(annotation, str) and not _accepts(value, annotation):
            raise ConfigError(f"{key}.{name}: expected {_type_name(annotation)}, got {value!r}")


def build(node: DictConfig, key: str, **extra: Any) -> Any:
    """Check then instantiate `node`; errors raised by the builder come back as one line naming `key`.

    For `_partial_` nodes the returned callable reports errors of the later call the same way.
    """
    check_node(node, key)
    built = _reporting_errors(instantiate, node, key)(node, **extra)
    if isinstance(built, functools.partial):
        return _reporting_errors(built, node, key)
    return built


def _reporting_errors(function: Any, node: DictConfig, key: str) -> Any:
    """Wrap `function` so that its exceptions become a one-line ConfigError naming `key`."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ConfigError:
            raise
        except Exception as error:  # hydra wraps builder errors; report the innermost message on one line
            cause: BaseException = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            raise ConfigError(_name_the_key(message, key, node)) from error

    return call


def _name_the_key(message: str, key: str, node: DictConfig) -> str:
    """Prefix a builder's error with the config key it is about: `key.param: ...` where it names a param."""
    if message.startswith(f"{key}."):
        return message
    for name in node:
        if re.search(rf"\b{re.escape(str(name))}\b", message):
            return f"{key}.{name}: {message}"
    return f"{key}: {message}"


def first_difference(old: Any, new: Any, key: str) -> str | None:
    """The dotted key of the first value that differs between two config trees, or None if equal."""
    old = OmegaConf.to_container(old, resolve=True) if isinstance(old, (DictConfig, ListConfig)) else old
    new = OmegaConf.to_container(new, resolve=True) if isinstance(new, (DictConfig, ListConfig)) else new
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(name), new.get(name), f"{key}.{name}")
            if found is not None:
                return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{key}[{index}]")
            if found is not None:
                return found
        return None
    return None if old == new else key
