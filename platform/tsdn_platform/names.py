"""The one validator of every id that becomes a store path segment: datasets, products, versions, runs, jobs.

Ingest (``--products`` and discovered folders), training, the registry and scoring all call
:func:`validate_name`, so a name one job accepts is never refused by the next.
"""

from __future__ import annotations

import re

__all__ = ["NAME_PATTERN", "validate_name"]

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
