"""Small typed readers for untrusted JSON: a listing field of the wrong type reads as
unknown (``None`` / empty), never as an exception from deep inside a parser."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Malformed(Exception):
    """The body is not the listing shape this provider documents."""


def positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if value > 0 else None


def as_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def as_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def price(value: Any) -> float | None:
    """A non-negative price; OpenRouter sends strings, ``"-1"`` for "varies"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and value >= 0 and value == value:  # not NaN
        return float(value)
    return None


def as_dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def as_strs(value: Any) -> list[str] | None:
    """A list of strings, or None when the field is absent / not a list."""
    if not isinstance(value, list):
        return None
    return [v for v in value if isinstance(v, str)]


def items_of(page: Any, key: str, *, optional: bool = False) -> list[Mapping[str, Any]]:
    """``page[key]`` as a list of objects; anything else is a malformed listing."""
    if not isinstance(page, Mapping):
        raise Malformed
    if key not in page and optional:
        return []
    items = page.get(key)
    if not isinstance(items, list):
        raise Malformed
    return [item for item in items if isinstance(item, Mapping) and as_str(item.get("id" if key == "data" else "name"))]


def contains(values: list[str] | None, wanted: str) -> bool | None:
    return None if values is None else wanted in values
