"""Config checking: every `_target_` node is validated against its builder's signature before any work."""
from __future__ import annotations

import collections.abc
import functools
import inspect
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["CONF_DIR", "ConfigError", "build", "check_node", "first_difference"]


class ConfigError(ValueError):
    """A config key with a wrong name, type or value; the message starts with the key."""


# The shipped configs (conf/ beside the package), as an absolute path: Hydra finds it from any working directory.
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

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


def _dotted(key: str, name: Any) -> str:
    """`name` under node `key` as a user writes it ("" is the top level of the config)."""
    return f"{key}.{name}" if key else str(name)


def check_node(node: DictConfig, key: str) -> None:
    """Raise ConfigError if `node`'s keys or value types do not fit the signature of its `_target_` (`key`: where
    the node is, "" for a whole config)."""
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        name = missing[0] if key and missing[0].startswith(f"{key}.") else _dotted(key, missing[0])
        raise ConfigError(f"{name}: required but not set (set it on the command line: {name}=...)")
    target_name = node.get("_target_")
    try:
        target = get_method(target_name) if isinstance(target_name, str) else None
    except Exception:  # hydra raises several kinds for a bad path
        target = None
    if target is None:
        raise ConfigError(f"{_dotted(key, '_target_')}: cannot import {target_name!r}")
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
            raise ConfigError(f"{_dotted(key, name)}: unknown key for {target_name} (allowed: {allowed})")
        value = values[name]
        annotation = hints.get(name, signature.parameters[name].annotation)
        built_by_its_own_target = isinstance(value, dict) and "_target_" in value  # checked by _check_nested
        if not (isinstance(annotation, str) or built_by_its_own_target or _accepts(value, annotation)):
            raise ConfigError(f"{_dotted(key, name)}: expected {_type_name(annotation)}, got {value!r}")
        _check_nested(node[name], _dotted(key, name))


def _check_nested(value: Any, key: str) -> None:
    """Check every `_target_` node inside `value` (e.g. a composed objective's terms), each named by its key."""
    if isinstance(value, DictConfig):
        if "_target_" in value:
            check_node(value, key)
            return
        for name in value:
            _check_nested(value[name], _dotted(key, name))
    elif isinstance(value, ListConfig):
        for index, item in enumerate(value):
            _check_nested(item, f"{key}[{index}]")


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
    if key and message.startswith(f"{key}."):
        return message
    for name in node:
        if re.search(rf"\b{re.escape(str(name))}\b", message):
            return f"{_dotted(key, name)}: {message}"
    return f"{key}: {message}" if key else message


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
