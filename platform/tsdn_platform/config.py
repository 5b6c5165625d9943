"""Job configs: YAML file + CLI overrides -> one validated dataclass per job.

Precedence, lowest first: dataclass defaults, the YAML file (``--config``), explicit CLI flags, then
``--set key=value`` overrides (dotted keys; values parsed as YAML, so ``--set model.image_size=64``
gives an int and ``--set products=[a,b]`` a list).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tsdn.config_io import ConfigError, check, from_dict, merge, set_dotted, to_dict

__all__ = ["ConfigError", "check_required", "config_to_yaml", "load_config", "parse_overrides", "preset_path"]

T = TypeVar("T")

# The presets ship as package data of ``jobs`` (pyproject.toml), so they resolve in a wheel install too.
PRESETS_DIR = Path(importlib.util.find_spec("jobs").origin).parent / "configs"


def preset_path(name_or_path: str) -> Path:
    """``"demo"`` -> ``jobs/configs/demo.yaml``; an existing path is returned as is."""
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    msg = f"config {name_or_path!r}: no such file, and not a preset (presets: {', '.join(presets)})"
    raise ConfigError(msg)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` with YAML-typed values."""
    data: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            msg = f"--set {item!r}: expected key=value"
            raise ConfigError(msg)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            msg = f"--set {item!r}: value is not valid YAML ({exc})"
            raise ConfigError(msg) from exc
        set_dotted(data, key.strip(), value)
    return data


def check_required(cfg: Any, names: Sequence[str], expected: str = "a value") -> None:
    """:func:`tsdn.config_io.check` that each of ``names`` is set, naming the command-line flag that sets it
    (``source``, a job's first argument, has none)."""
    for name in names:
        flag = "the first argument" if name == "source" else f"--{name.replace('_', '-')}"
        check(cfg, bool(getattr(cfg, name)), name, f"{expected} (required: {flag})")


def load_config(
    cls: type[T],
    config: str | None = None,
    overrides: Sequence[str] = (),
    explicit: Mapping[str, Any] | None = None,
) -> T:
    """Resolve a job config: defaults <- YAML ``config`` <- ``explicit`` (non-None CLI flags) <- ``--set``."""
    data: dict[str, Any] = {}
    if config:
        path = preset_path(config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            msg = f"{path}: not valid YAML ({exc})"
            raise ConfigError(msg) from exc
        if not isinstance(loaded, Mapping):
            msg = f"{path}: expected a mapping at the top level"
            raise ConfigError(msg)
        data = dict(loaded)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        foreign = sorted(set(data) - fields)
        if foreign:  # e.g. `tsdn score --config tiny`: a training preset
            msg = (
                f"--config {config}: unknown config key(s) for {cls.__name__} in {path}: {', '.join(foreign)} (a "
                f"config for another job?); {cls.__name__}'s keys: {', '.join(sorted(fields))}"
            )
            raise ConfigError(msg)
    flags: dict[str, Any] = {}
    for key, value in (explicit or {}).items():
        if value is not None:
            set_dotted(flags, key, value)
    data = merge(merge(data, flags), parse_overrides(overrides))
    return from_dict(cls, data)


def config_to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, written next to what a job produced."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
