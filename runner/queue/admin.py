"""The queue by hand: what `headlock status`, `requests`, `requeue` and `purge` need beyond the runtime's Protocol.

The runtime knows only `RequestQueue` (narrow on purpose); these operations are for a person at a terminal, on
both backends: `SqliteQueue` and `ApiQueue` implement `QueueAdmin` too. Failed requests are those `runner.models`
describes (handled, with the failed marker in `userData`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from runner.models import QueueCounts, Request

__all__ = [
    "MAX_LIST_LIMIT",
    "MAX_REQUEUE_BATCH",
    "QueueAdmin",
    "RequestPage",
    "RequeueResult",
    "can_requeue",
]

MAX_LIST_LIMIT = 10_000
"""Most requests one `list_requests` call returns (the platform's maximum page)."""
MAX_REQUEUE_BATCH = 1000
"""Most requests one `requeue` call takes."""


@dataclass(frozen=True, slots=True)
class RequestPage:
    """One page of requests, in id order, as the API's JSON objects (unknown fields kept).

    `next_after` continues the listing (pass it as `after`); None when this page was the last. A page filtered on
    the client side (`ApiQueue` listing `failed` or `handled`) may hold fewer items than asked, or none, and still
    have a `next_after`. A stored request that cannot be read shows what can be read of it, its text in
    `unreadableData`.
    """

    items: list[dict[str, Any]]
    next_after: str | None


@dataclass(frozen=True, slots=True)
class RequeueResult:
    """What `requeue` did with each id it was given (ids, in the order given)."""

    requeued: list[str] = field(default_factory=list)
    """Handled (failed or not): now pending, retry count 0, no failed marker, errors kept."""
    not_handled: list[str] = field(default_factory=list)
    """Pending or locked already: left as they are (so requeueing twice changes nothing the second time)."""
    missing: list[str] = field(default_factory=list)
    """Not in the queue."""
    unreadable: list[str] = field(default_factory=list)
    """Stored requests that cannot be read as requests (quarantined damage): left as they are, to fix by hand."""


def can_requeue(request: Request) -> bool:
    """Whether a handled request can go back to pending: not a quarantined one (its fields are what could be
    salvaged of damaged data, its `unreadableData` the original)."""
    return "unreadableData" not in (request.model_extra or {})


@runtime_checkable
class QueueAdmin(Protocol):
    """Counting, listing, requeueing and deleting a queue. Every method raises a `runner.errors.QueueError`."""

    async def counts(self) -> QueueCounts:
        """How many requests are handled, failed, pending and locked (see `QueueCounts`)."""
        ...

    async def list_requests(
        self,
        *,
        after: str | None = None,
        limit: int,
        locked: bool = False,
        pending: bool = False,
        failed: bool = False,
        handled: bool = False,
    ) -> RequestPage:
        """Up to `limit` (≤ `MAX_LIST_LIMIT`) requests after `after` in id order, of the states asked.

        The states are a union: `locked` (held), `pending` (unhandled, not held), `failed`, `handled` (ended well);
        none asked lists every request.

        Raises:
            InvalidInputError: a bad `limit`, or a union the backend cannot list (see `ApiQueue.list_requests`).
        """
        ...

    async def requeue(self, request_ids: Sequence[str], *, client_key: str) -> RequeueResult:
        """Return the handled requests among `request_ids` (≤ `MAX_REQUEUE_BATCH`) to pending, at the end of the
        queue, with a fresh retry budget (`Request.requeued`). Idempotent.

        Raises:
            InvalidInputError: more than `MAX_REQUEUE_BATCH` ids.
        """
        ...

    async def drop(self) -> None:
        """Delete the queue with every request in it, and close this handle. Cannot be undone.

        Raises:
            NotFoundError: the queue does not exist (any more).
        """
        ...

    async def aclose(self) -> None:
        """Release connections and files. Idempotent."""
        ...
