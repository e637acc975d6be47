"""Configs of earlier versions in today's layout: renamed keys (refused with the new name where a user writes
them, translated where a checkpoint saved them), builders that moved module, and keys added since."""
from __future__ import annotations

import collections.abc
from collections.abc import Iterator
import inspect
import types
from pathlib import Path
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

from slip.app.config import CONF_DIR, ConfigError

__all__ = ["ADDED_SECTIONS", "MOVED_TARGETS", "RENAMED_KEYS", "check_renamed_keys", "check_renamed_overrides",
           "fill_added_defaults", "upgrade_saved_config"]

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
    # The app's checked nodes, when the app moved out of the library into slip.app.
    "slip.data.DataSettings": "slip.app.train_data.DataSettings",
    "slip.engine.TrainerSettings": "slip.app.trainer_settings.TrainerSettings",
    "slip.app.engine.TrainerSettings": "slip.app.trainer_settings.TrainerSettings",
    "slip.optim.adamw": "slip.app.optim.adamw",
    "slip.optim.warmup_cosine": "slip.app.optim.warmup_cosine",
})
DATA_SETTINGS_TARGET = "slip.app.train_data.DataSettings"
# Keys added to a builder whose default changed what it builds: a config saved before them gets the value that
# reproduces what it trained on (so a resume under today's default stops, naming the key).
EARLIER_BEHAVIOUR: collections.abc.Mapping[str, collections.abc.Mapping[str, Any]] = types.MappingProxyType({
    "slip.data.sources.CsvSource": {"group_by_image": False},  # one record per CSV row
})
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
    _fill_earlier_behaviour(upgraded)
    return upgraded


def _fill_earlier_behaviour(config: DictConfig) -> None:
    for node in _nodes(config):
        for key, value in EARLIER_BEHAVIOUR.get(node.get("_target_"), {}).items():
            if key not in node:
                node[key] = value


# Top-level sections added in a later version, by the shipped file that is their default: a run saved without one
# trained as that default does (no objective before the momentum teacher asked for one).
ADDED_SECTIONS: collections.abc.Mapping[str, str] = types.MappingProxyType({"teacher": "teacher/ema.yaml"})


def fill_added_defaults(saved: DictConfig, current: DictConfig) -> None:
    """Give the config `saved` (in place) the sections of ADDED_SECTIONS it lacks, where `current` has the shipped
    default, and the keys that `current`'s builder nodes have and it lacks, where `current` sets them to the
    builder's default: a section or key added in a later version, left at its default, changes nothing."""
    for section, default_file in ADDED_SECTIONS.items():
        if section not in saved and section in current and OmegaConf.to_container(current[section], resolve=True) \
                == OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / default_file)):
            saved[section] = current[section]
    _fill_added_keys(saved, current)


def _fill_added_keys(saved: Any, current: Any) -> None:
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
            _fill_added_keys(saved[name], current[name])


def _nodes(node: Any) -> Iterator[DictConfig]:
    """Every mapping node of a config tree, each before the nodes inside it (which may change as it is visited)."""
    if isinstance(node, DictConfig):
        yield node
        for name in node:
            yield from _nodes(node[name])
    elif isinstance(node, ListConfig):
        for item in node:
            yield from _nodes(item)


def _move_targets(config: DictConfig) -> None:
    for node in _nodes(config):
        if node.get("_target_") in MOVED_TARGETS:
            node["_target_"] = MOVED_TARGETS[node["_target_"]]