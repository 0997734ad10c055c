"""What both stores (embedded, PostgreSQL) share about a stored request: its JSON form, checks, quarantine.

A request is stored as its JSON object (lock state kept in columns, never in the JSON); a row that no longer parses
is damage to the store, quarantined as a failed request that keeps its text (`quarantined`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from runner.errors import InvalidInputError, QueueUnavailableError
from runner.models import Request, RequestDraft, with_failed_mark
from runner.queue.protocol import MAX_CLIENT_KEY
from runner.uniquekey import request_id_for

_MAX_LOCK_SECS = 10 * 365 * 24 * 3600
"""Longest lock accepted: far beyond any real lease, and it keeps expiries inside SQLite's 64-bit integers."""


_LOCK_FIELDS: set[str] = {"lockExpiresAt", "lockByClient"}
"""Lock state clients echo back in request bodies (contract §9a); the store keeps it in columns only."""


_NAME = re.compile(r"[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]{0,61}[a-zA-Z0-9]")
"""A valid queue name, matched with `fullmatch` (`$` would also accept a trailing newline)."""


def validate_queue_name(name: str) -> str:
    """Return `name` if it is a valid queue name (DNS-safe, 1-63 chars), else raise `InvalidInputError`."""
    if not _NAME.fullmatch(name):
        raise InvalidInputError(
            f"invalid queue name {name!r}: use 1-63 letters, digits or '-', not starting or ending with '-'",
            endpoint="open queue",
        )
    return name


def _to_datetime(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


def _check_client_key(client_key: str, endpoint: str) -> None:
    if not 1 <= len(client_key) <= MAX_CLIENT_KEY:
        raise InvalidInputError(
            f"clientKey must be 1-{MAX_CLIENT_KEY} characters, got {len(client_key)}", endpoint=endpoint
        )


def _check_lock_secs(lock_secs: float, endpoint: str) -> None:
    # Written so that NaN fails too: every comparison with NaN is false.
    if not 0 < lock_secs <= _MAX_LOCK_SECS:
        raise InvalidInputError(f"lockSecs must be > 0 and <= {_MAX_LOCK_SECS}, got {lock_secs}", endpoint=endpoint)


def _dump(request: Request | RequestDraft, endpoint: str) -> str:
    """Serialize a request (or a plain draft, see `_prepare`) for the `data` column, without echoed lock fields."""
    try:
        return request.model_dump_json(by_alias=True, exclude_none=True, exclude=_LOCK_FIELDS)
    except ValueError as exc:  # pydantic's serialization error is one
        raise InvalidInputError(
            f"request {request.unique_key!r} cannot be stored as JSON: {exc}", endpoint=endpoint
        ) from exc


_UNREADABLE = (ValueError, RecursionError)
"""What parsing a damaged row raises: pydantic's ValidationError, a JSON or UTF-8 decoding error (ValueErrors), or a
RecursionError from `json.loads` on nesting far deeper than anything the store writes."""


def _parse(data: str | bytes) -> Request:
    """Parse a stored `data` column.

    The JSON parser refuses nesting past depth 200, yet the serializer writes up to about 255: such a row is parsed
    again with `json.loads` and validated as a dict, a cost paid only on that path.

    Raises:
        ValueError, RecursionError: the row is not a valid request (see `_UNREADABLE`).
    """
    try:
        return _validate_json(data)  # `Request.model_validate_json` without its Python frame
    except ValidationError as exc:
        if not _too_deep(exc):
            raise
    return Request.model_validate(json.loads(data))


_validate_json: Callable[[str | bytes], Request] = Request.__pydantic_validator__.validate_json


def _too_deep(exc: ValidationError) -> bool:
    errors = exc.errors(include_url=False, include_input=False)
    return len(errors) == 1 and errors[0]["type"] == "json_invalid" and "recursion limit" in errors[0]["msg"]


def _reason(exc: BaseException) -> str:
    """Why a stored row is unreadable, in one line."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        loc = ".".join(map(str, errors[0]["loc"]))
        first = f"{loc}: {errors[0]['msg']}" if loc else errors[0]["msg"]
        return first if len(errors) == 1 else f"{first} (and {len(errors) - 1} more errors)"
    return f"{type(exc).__name__}: {exc}"[:500]


def _load(request_id: str, data: str | bytes, endpoint: str) -> Request:
    """Parse a stored `data` column; a row that does not parse is damage to the file, not a caller's mistake.

    Raises:
        QueueUnavailableError: the row is unreadable (`lock_head` quarantines such rows; see `_quarantined`).
    """
    try:
        return _parse(data)
    except _UNREADABLE as exc:
        raise QueueUnavailableError(
            f"stored request {request_id} is unreadable: {_reason(exc)}", endpoint=endpoint
        ) from exc


def _text(data: str | bytes) -> str:
    return data.decode("utf-8", "backslashreplace") if isinstance(data, bytes) else data


def _clean(value: str) -> str:
    """`value` without lone surrogates (`json.loads` lets them through; they have no UTF-8 form)."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _string_field(text: str, key: str) -> str | None:
    """The string value of `"key": "..."` found in a JSON text that may not parse as a whole, or None."""
    match = re.search(rf'"{key}"\s*:\s*("(?:[^"\\]|\\.)*")', text)
    if match is None:
        return None
    try:
        value = json.loads(match.group(1))
    except ValueError:
        return None
    return _clean(value) if isinstance(value, str) else None


def _salvage(text: str) -> dict[str, Any]:
    """What can be read of an unreadable row: `uniqueKey`, `url`, `retryCount`, `errorMessages` (best effort)."""
    try:
        body = json.loads(text)
    except _UNREADABLE:
        body = None
    if not isinstance(body, dict):
        body = {key: value for key in ("uniqueKey", "url") if (value := _string_field(text, key)) is not None}
    unique_key, url, retries, messages = (body.get(k) for k in ("uniqueKey", "url", "retryCount", "errorMessages"))
    return {
        "uniqueKey": _clean(unique_key) if isinstance(unique_key, str) else "",
        "url": _clean(url) if isinstance(url, str) else "",
        "retryCount": retries if type(retries) is int and retries >= 0 else 0,
        "errorMessages": [_clean(m) for m in messages if isinstance(m, str)] if isinstance(messages, list) else [],
    }


def _salvage_label(text: str) -> str | None:
    """`userData.label` of an unreadable row's text, when it parses that far (best effort, like `_salvage`)."""
    try:
        body = json.loads(text)
    except _UNREADABLE:
        return None
    user_data = body.get("userData") if isinstance(body, dict) else None
    label = user_data.get("label") if isinstance(user_data, dict) else None
    return _clean(label) if isinstance(label, str) else None


def _quarantined(request_id: str, data: str | bytes, reason: str, now: int) -> str:
    """The `data` that replaces an unreadable row: a readable request ended as failed, keeping the original text.

    Its `uniqueKey`, `url` and `userData.label` are what could be read of the row ("" when nothing could), it
    carries the failed marker (`runner.models`), and `unreadableData` holds the row's text (not UTF-8 bytes as
    `\\xNN`).
    """
    text = _text(data)
    fields = _salvage(text)
    label = _salvage_label(text)
    message = f"quarantined: stored request unreadable: {reason}"
    request = Request.model_validate(
        {
            **fields,
            "id": request_id,
            "handledAt": _to_datetime(now),
            "userData": with_failed_mark({} if label is None else {"label": label}),
            "errorMessages": [*fields["errorMessages"], message],
            "unreadableData": text,
        }
    )
    return _dump(request, "lock_head")


def _from_draft(draft: RequestDraft, endpoint: str) -> Request:
    """Validate a draft as the stored request it becomes, so nothing unreadable enters the queue."""
    request_id = request_id_for(draft.unique_key)
    body = draft.to_api()
    supplied = body.pop("id", None)
    if supplied is not None and supplied != request_id:
        raise InvalidInputError(
            f"Request ID {supplied!r} does not correspond to uniqueKey {draft.unique_key!r}",
            endpoint=endpoint,
            error_type="request-id-invalid",
        )
    try:
        return Request.model_validate({**body, "id": request_id})
    except ValidationError as exc:
        raise InvalidInputError(f"invalid request {draft.unique_key!r}: {exc}", endpoint=endpoint) from exc


_DRAFT_DEFAULTS = Request(id="", unique_key="", url="").model_dump_json(
    by_alias=True, include={"retry_count", "error_messages"}
)[1:-1]
"""The defaults of the request fields a draft lacks and the head shows (`"retryCount":0,"errorMessages":[]`)."""


def _prepare(draft: RequestDraft, endpoint: str) -> tuple[str, str, bool, bool, str]:
    """`(id, uniqueKey, handled, failed, data)` of a draft to store, validated as the request it becomes."""
    if draft.model_extra:
        # Extra fields (`handledAt`, `id`, ...) must be checked against the request's: a full validation.
        request = _from_draft(draft, endpoint)
        handled = request.handled_at is not None
        return request.id, request.unique_key, handled, request.is_failed, _dump(request, endpoint)
    # A plain draft's fields were validated when it was built and are the request's own; the request's other
    # fields take their defaults. Five new links a page come this way: a full validation cost them 5 us each.
    request_id = request_id_for(draft.unique_key)
    body = _plain_json(draft) or _dump(draft, endpoint)
    return request_id, draft.unique_key, False, False, f'{{"id":"{request_id}",{_DRAFT_DEFAULTS},{body[1:]}'


def _plain_json(draft: RequestDraft) -> str | None:
    """`_dump` of the usual link, written by orjson (a fifth of pydantic's time): no headers, payload or noRetry, and
    only strings in `userData` (a label), which both write alike; None for any other draft, or what orjson refuses
    (a lone surrogate): those go through `_dump`."""
    user_data = draft.user_data
    if draft.headers is not None or draft.payload is not None or draft.no_retry is not None:
        return None
    if user_data and not all(type(value) is str for value in user_data.values()):
        return None
    try:
        text = orjson.dumps(
            {"uniqueKey": draft.unique_key, "url": draft.url, "method": draft.method, "userData": user_data}
        )
    except orjson.JSONEncodeError:
        return None
    return text.decode()


def _listed(request_id: str, data: bytes) -> dict[str, Any]:
    """A stored request as `list_requests` shows it: its JSON object; what can be read of an unreadable one."""
    try:
        item = json.loads(data)
    except _UNREADABLE:
        item = None
    if not isinstance(item, dict):
        text = _text(data)
        return {"id": request_id, **_salvage(text), "unreadableData": text}
    item["id"] = request_id
    return item
