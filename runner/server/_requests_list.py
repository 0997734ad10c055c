"""GET requests (list requests) of one queue: the query parameters and the cursor, over the store's `list_requests`
(the store's own connection and clock)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from runner.errors import InvalidInputError
from runner.queue.admin import MAX_LIST_LIMIT, QueueAdmin
from runner.server import _wire as wire

__all__ = ["MAX_LIST_LIMIT", "ListQuery", "list_requests", "parse_query"]

DEFAULT_LIST_LIMIT = 1000
"""Page size without `limit`: undocumented on the platform; the official clients' own page size."""
_FILTERS = frozenset({"locked", "pending"})


@dataclass(frozen=True, slots=True)
class ListQuery:
    """One list-requests call: requests with ids after `after` (exclusive), at most `limit`, in id order.

    `locked` / `pending` select requests with a live lock / unhandled requests without one; neither (no filter)
    selects every request, handled ones included.
    """

    limit: int
    after: str | None = None
    locked: bool = False
    pending: bool = False


def _invalid(message: str) -> InvalidInputError:
    return InvalidInputError(f"Invalid input: {message}", status=400)


def encode_cursor(request_id: str) -> str:
    """The opaque cursor that continues after `request_id`: base64url JSON `{"requestId": ...}`, as the platform's."""
    raw = json.dumps({"requestId": request_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The request id a cursor continues after.

    Raises:
        InvalidInputError: the cursor is not one this server (or the platform's format) makes.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        raise _invalid(f"cursor {cursor!r} is not a cursor this API returned (nextCursor)") from None
    request_id = value.get("requestId") if isinstance(value, dict) else None
    if not isinstance(request_id, str) or not request_id:
        raise _invalid(f"cursor {cursor!r} is not a cursor this API returned (nextCursor)")
    return request_id


def parse_query(request: Request) -> tuple[ListQuery, dict[str, Any]]:
    """The list query of a GET requests call, and the fields the answer echoes (`cursor`, `exclusiveStartId`).

    Raises:
        InvalidInputError: a bad `limit`, `cursor` or `filter`, or `exclusiveStartId` with `cursor` or `filter`.
    """
    wire.client_key(request)
    limit = wire.limit(request, default=DEFAULT_LIST_LIMIT, maximum=MAX_LIST_LIMIT, zero_is_default=True)
    params = request.query_params
    cursor, start_id, filter_param = params.get("cursor"), params.get("exclusiveStartId"), params.get("filter")
    if start_id is not None and (cursor is not None or filter_param is not None):
        raise _invalid("exclusiveStartId (deprecated) cannot be combined with cursor or filter")
    filters = wire.text_list(request, "filter")
    unknown = sorted(set(filters) - _FILTERS)
    if unknown or (filter_param is not None and not filters):
        raise _invalid(f"filter must be a comma-joined list of 'locked' and 'pending', got {filter_param!r}")
    echo: dict[str, Any] = {}
    after = None
    if cursor is not None:
        after = decode_cursor(cursor)
        echo["cursor"] = cursor
    elif start_id is not None:
        after = start_id or None
        echo["exclusiveStartId"] = start_id
    return ListQuery(limit=limit, after=after, locked="locked" in filters, pending="pending" in filters), echo


async def list_requests(store: QueueAdmin, query: ListQuery) -> dict[str, Any]:
    """The answer's `data` for `query` over `store`: `items`, `limit`, and `nextCursor` when the page is full.

    A full page gets a `nextCursor` even when nothing follows (the next page is then empty and has none).
    """
    page = await store.list_requests(after=query.after, limit=query.limit, locked=query.locked, pending=query.pending)
    data: dict[str, Any] = {"items": page.items, "limit": query.limit}
    if page.next_after is not None:
        data["nextCursor"] = encode_cursor(page.next_after)
    return data
