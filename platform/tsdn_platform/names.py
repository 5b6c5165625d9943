"""The one validator of every id that becomes a store path segment: datasets, products, versions, runs, jobs.

Ingest (``--products`` and discovered folders), training, the registry and scoring all call
:func:`validate_name`, so a name one job accepts is never refused by the next; every ``products`` setting
(the ``--products`` flags, ``IngestConfig``, ``TrainConfig``, ``PipelineConfig``) is read by :func:`parse_products`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tsdn.config_io import ConfigError

__all__ = ["ALL", "NAME_PATTERN", "parse_products", "validate_name"]

ALL = "all"  # the spelling of "every product line" in a products setting

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_name(name: str, what: str = "product") -> str:
    """``name`` if it is 1-64 characters of ``[A-Za-z0-9_.-]``, starts alphanumeric and holds no ``..``.

    Raises:
        ValueError: naming ``what`` and the offending value.
    """
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        msg = f"{what} id {name!r}: expected 1-64 characters [A-Za-z0-9_.-], starting alphanumeric, no '..'"
        raise ValueError(msg)
    return name


def parse_products(value: str | Sequence[str] | None) -> list[str] | None:
    """A ``products`` setting -> the product lines it names, or None for every product line.

    A string is comma-separated (``"brick, grass"``); a list names them one by one. None, ``"all"`` and
    ``["all"]`` mean every product line. A setting that names none (``""``, ``","``, an empty list) is refused: it
    meant every line before, so ``--products ,`` trained them all. Each name is checked by :func:`validate_name`.

    Raises:
        ConfigError: naming the invalid product id.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(item, str) for item in items):
        msg = f"products: expected product ids or {ALL!r}, got {value!r}"
        raise ConfigError(msg)
    names = [item.strip() for item in items if item.strip()]
    if not names:
        msg = f"products: {value!r} names no product line; give them comma-separated, or {ALL!r} for every one"
        raise ConfigError(msg)
    if names == [ALL]:
        return None
    try:
        return [validate_name(name) for name in names]
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
