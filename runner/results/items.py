"""Result items as the sinks take them: one JSON object text per item, checked when the handler pushes it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping

import orjson

from runner.errors import InvalidItemError

__all__ = ["encode_item"]


def _default(value: object) -> str:
    """Dates and times as ISO 8601; anything else JSON has no form for is refused."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} values have no JSON form")


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=_default, separators=(",", ":"))
"""The standard library's encoder, compact like orjson's output: for what orjson refuses or cannot be trusted with."""
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
"""Dataclasses refused and dates through `_default`, as the standard encoder does them."""


def encode_item(item: object) -> str:
    """One dataset line for `item`, a mapping with string keys and JSON values (dates become ISO strings).

    orjson writes it (a tenth of the standard encoder's time); where orjson refuses a value (integers past 64 bits,
    non-string keys, nesting past its limit, a cycle, a lone surrogate) or may have written NaN or an infinity as
    `null`, the standard encoder decides, with its own error.

    Raises:
        InvalidItemError: not a mapping, or a value JSON cannot represent (NaN, bytes, sets, tuple keys, a cycle).
    """
    if type(item) is not dict and not isinstance(item, Mapping):  # a dict needs no ABC check
        raise InvalidItemError(f"a dataset item must be a dict, got {type(item).__name__}")
    try:
        data = orjson.dumps(item, default=_default, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError is one
        data = None
    if data is not None and b"null" not in data:
        return data.decode()
    try:
        line = _ENCODER.encode(item)
        line.encode()  # a lone surrogate (e.g. "\ud800") has no UTF-8 form: refused here, not by the sink's write
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidItemError(f"dataset item cannot be stored as JSON: {exc}") from exc
    return line
