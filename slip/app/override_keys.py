"""Command-line overrides checked before Hydra reads them: an unknown key or group option stops with one line
naming it and the closest valid one."""
from __future__ import annotations

import collections.abc
import difflib
import itertools
import math
import os
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override
from omegaconf import DictConfig, OmegaConf

from slip.app.config import ConfigError

__all__ = ["check_override_keys"]

# The only command-line flag `check_override_keys` reads past; with any other flag Hydra alone reads the line.
MULTIRUN_FLAGS = ("-m", "--multirun")
_ABSENT = object()


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
