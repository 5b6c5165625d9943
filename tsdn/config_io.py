"""Strict conversion between nested config dataclasses and plain dicts (YAML/JSON).

Every job config and the model config go through these two functions, so an unknown key or a
value of the wrong type is reported the same way everywhere: with its dotted path.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted key."""


def check(cfg: Any, ok: bool, name: str, expected: str) -> None:
    """The one validation idiom of every config's ``__post_init__``: unless ``ok``, raise :class:`ConfigError`
    ``"<Config>.<name>: expected <expected>, got <value>"`` (the value is ``cfg.<name>``)."""
    if not ok:
        msg = f"{type(cfg).__name__}.{name}: expected {expected}, got {getattr(cfg, name, None)!r}"
        raise ConfigError(msg)


def to_dict(obj: Any) -> Any:
    """Dataclass (possibly nested) -> JSON/YAML-safe dict. Tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, converting nested values by the field annotations.

    Missing keys take the dataclass defaults; unknown keys raise :class:`ConfigError`.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {path!r}" if path else ""
        msg = f"unknown config key(s){where}: {', '.join(unknown)}; expected one of: {', '.join(sorted(names))}"
        raise ConfigError(msg)
    kwargs = {name: _convert(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        msg = f"{path or cls.__name__}: {exc}"
        raise ConfigError(msg) from exc


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``update`` win, nested mappings are merged."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(data: dict[str, Any], dotted_key: str, value: Any) -> None:
    """``set_dotted(d, "model.image_size", 64)`` creates intermediate dicts as needed."""
    node = data
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            msg = f"cannot set {dotted_key!r}: {part!r} is not a section"
            raise ConfigError(msg)
        node = child
    node[leaf] = value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        msg = f"{path}: {value!r} does not match {tp}: {'; '.join(errors)}"
        raise ConfigError(msg)
    if origin is typing.Literal:
        if value not in args:
            msg = f"{path}: {value!r} is not one of {list(args)}"
            raise ConfigError(msg)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            msg = f"{path}: expected a mapping, got {value!r}"
            raise ConfigError(msg)
        return from_dict(tp, value, path)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            msg = f"{path}: expected a list, got {value!r}"
            raise ConfigError(msg)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                msg = f"{path}: expected {len(args)} items, got {len(value)}"
                raise ConfigError(msg)
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            msg = f"{path}: expected a mapping, got {value!r}"
            raise ConfigError(msg)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        msg = f"{path}: expected true/false, got {value!r}"
        raise ConfigError(msg)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        msg = f"{path}: expected an integer, got {value!r}"
        raise ConfigError(msg)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "7e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        msg = f"{path}: expected a number, got {value!r}"
        raise ConfigError(msg)
    if tp is str:
        if isinstance(value, str):
            return value
        msg = f"{path}: expected a string, got {value!r}"
        raise ConfigError(msg)
    return value


def json_member(files: Mapping[str, bytes], name: str, owner: str) -> dict[str, Any]:
    """The JSON document ``files[name]`` of a saved artefact (a checkpoint, an export).

    Raises ``ValueError`` naming ``owner`` and ``name`` when the member is missing or is not JSON.
    """
    if name not in files:
        msg = f"{owner}: {name} missing (got {', '.join(sorted(files)) or 'nothing'})"
        raise ValueError(msg)
    try:
        return json.loads(files[name])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{owner} {name}: not JSON ({exc})"
        raise ValueError(msg) from exc
