"""Result items as the sinks take them: one JSON object text per item, checked when the handler pushes it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping

from runner.errors import InvalidItemError

__all__ = ["encode_item"]


def _default(value: object) -> str:
    """Dates and times as ISO 8601; anything else JSON has no form for is refused."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} values have no JSON form")


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=_default)
"""One encoder for every line: `json.dumps` with options builds a new one per call."""


def encode_item(item: object) -> str:
    """One dataset line for `item`, a mapping with string keys and JSON values (dates become ISO strings).

    Raises:
        InvalidItemError: not a mapping, or a value JSON cannot represent (NaN, bytes, sets, tuple keys, a cycle).
    """
    if not isinstance(item, Mapping):
        raise InvalidItemError(f"a dataset item must be a dict, got {type(item).__name__}")
    try:
        line = _ENCODER.encode(item)
        line.encode()  # a lone surrogate (e.g. "\ud800") has no UTF-8 form: refused here, not by the sink's write
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidItemError(f"dataset item cannot be stored as JSON: {exc}") from exc
    return line
