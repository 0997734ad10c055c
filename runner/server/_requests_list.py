"""GET requests (list requests) of one queue: the query parameters, the cursor and the read of the queue file.

`SqliteQueue` has no call that lists requests (handled ones included), so the read runs on a connection of its
own to the queue's file, in a worker thread: WAL mode lets it read a committed snapshot while the store writes,
and it never writes. It depends on the store's table `requests` (`id`, `order_no`, `lock_expires`, `data`); a
`SqliteQueue.list_requests` would remove that coupling (see the report of this change).
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.requests import Request

from runner.errors import InvalidInputError, QueueUnavailableError
from runner.server import _wire as wire

__all__ = ["MAX_LIST_LIMIT", "ListQuery", "list_requests", "parse_query"]

MAX_LIST_LIMIT = 10_000
"""Most requests one page lists (the platform's documented maximum)."""
DEFAULT_LIST_LIMIT = 1000
"""Page size without `limit`: undocumented on the platform; the official clients' own page size."""
_FILTERS = frozenset({"locked", "pending"})
_BUSY_TIMEOUT = 5.0


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


def _sql(query: ListQuery) -> tuple[str, list[Any]]:
    """The SELECT for `query`: by the id index, `after` exclusive, filters as SQL conditions on the row's state."""
    conditions: list[str] = []
    args: list[Any] = []
    if query.after is not None:
        conditions.append("id > ?")
        args.append(query.after)
    # A live lock is one whose expiry is after now; an expired one no longer locks the request.
    now = time.time_ns() // 1000
    states = []
    if query.locked:
        states.append("(order_no IS NOT NULL AND lock_expires > ?)")
        args.append(now)
    if query.pending:
        states.append("(order_no IS NOT NULL AND (lock_expires IS NULL OR lock_expires <= ?))")
        args.append(now)
    if states:
        conditions.append(f"({' OR '.join(states)})")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    args.append(query.limit)
    return f"SELECT id, CAST(data AS BLOB) FROM requests{where} ORDER BY id LIMIT ?", args  # noqa: S608 - fixed parts


def _item(request_id: str, data: bytes) -> dict[str, Any]:
    """A stored request as the list shows it; a row that does not parse (damage) shows what is readable of it."""
    try:
        item = json.loads(data)
    except ValueError:
        item = None
    if not isinstance(item, dict):
        return {"id": request_id, "uniqueKey": "", "url": "", "unreadableData": data.decode("utf-8", "replace")}
    item["id"] = request_id
    return item


def _read(path: Path, query: ListQuery) -> list[dict[str, Any]]:
    sql, args = _sql(query)
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT)
        try:
            rows = db.execute(sql, args).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise QueueUnavailableError(f"cannot list the requests of {path}: {exc}", endpoint="list_requests") from exc
    return [_item(request_id, data) for request_id, data in rows]


async def list_requests(path: Path, query: ListQuery) -> dict[str, Any]:
    """The answer's `data` for `query` over the queue file at `path`: `items`, `limit`, and `nextCursor` when full.

    A full page gets a `nextCursor` even when nothing follows (the next page is then empty and has none).
    """
    items = await anyio.to_thread.run_sync(_read, path, query)
    data: dict[str, Any] = {"items": items, "limit": query.limit}
    if len(items) == query.limit:
        data["nextCursor"] = encode_cursor(items[-1]["id"])
    return data
