"""The queue seam: the one Protocol every backend implements and the runtime depends on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import ClassVar, Literal, Protocol, TypeAlias, runtime_checkable

from runner.models import BatchAddResult, LockedHead, QueueInfo, Request, RequestDraft, RequestRegistration
from runner.queue.completion import Completion

__all__ = [
    "MAX_BATCH",
    "MAX_CLIENT_KEY",
    "MAX_LOCK_LIMIT",
    "ConsistentHead",
    "HandledMark",
    "PreparedLinks",
    "RequestQueue",
]

MAX_LOCK_LIMIT = 25
"""Most requests one "get head and lock" call may lock."""
MAX_BATCH = 25
"""Most requests one batch add may carry."""
MAX_CLIENT_KEY = 32
"""Longest client key the API accepts (the shortest is 1)."""
PreparedLinks: TypeAlias = Sequence[object]
"""Links as one queue's `HandledMark.prepare_links` made them, for that queue's `mark_handled` alone."""


@runtime_checkable
class ConsistentHead(Protocol):
    """A queue whose head shows every committed add at once (the embedded and postgres stores, one database each):
    an empty head with no locks means finished, with no recent add to read back (`runner.finish`)."""

    head_is_consistent: ClassVar[Literal[True]]


@runtime_checkable
class HandledMark(Protocol):
    """A queue that marks a leased request handled from its id alone (the embedded store: it patches the stored
    JSON), instead of the whole request written back with `update_request`, and adds the links its handler found in
    the same write; the committer uses it when it can."""

    def prepare_links(self, links: Mapping[bool, Sequence[RequestDraft]]) -> PreparedLinks:
        """Check and serialize `links` (drafts by `forefront`) for `mark_handled`, before anything is written.

        Raises:
            InvalidInputError: a link is not a valid request, or has no JSON form.
        """
        ...

    async def mark_handled(self, request_id: str, *, client_key: str, links: PreparedLinks = ()) -> Completion:
        """Add `links` and mark the request handled now, in one write, fenced as `update_request(...,
        lock_required=True)` is: applied only while `client_key` holds its lock (an expired lock nobody retook
        counts), else nothing of it is. Its stored fields are kept as they are. Returns what the links were.

        Raises:
            AlreadyHandledError: it is handled already (nothing was written).
            LockLostError: unlocked, or locked by another client (nothing was written).
            NotFoundError: there is no such request.
        """
        ...


@runtime_checkable
class RequestQueue(Protocol):
    """A request queue with client-keyed locks (Apify API v2 semantics).

    Every method raises a `runner.errors.QueueError` subclass on failure. Lock operations on a request this client
    does not hold raise `LockLostError`.
    """

    async def lock_head(self, *, limit: int, lock_secs: float, client_key: str) -> LockedHead:
        """Lock up to `limit` (≤ 25) requests from the head and return them complete (with `userData`)."""
        ...

    async def prolong_lock(
        self, request_id: str, *, lock_secs: float, client_key: str, forefront: bool = False
    ) -> datetime:
        """Extend this client's lock to now + `lock_secs`; return the new expiry."""
        ...

    async def delete_lock(self, request_id: str, *, client_key: str, forefront: bool = False) -> None:
        """Release this client's lock; the request goes back to the head (`forefront`) or the end."""
        ...

    async def unlock_requests(self, *, client_key: str) -> int:
        """Release every lock `client_key` holds; return how many."""
        ...

    async def update_request(
        self, request: Request, *, client_key: str, forefront: bool = False, lock_required: bool = False
    ) -> RequestRegistration:
        """Replace the stored request. With `handled_at` it leaves the head and its lock is released; without it,
        it is pending again and a lock it has stays (release it with `delete_lock`).

        `lock_required` fences the write: it is applied only if `client_key` still holds the request's lock (an
        expired lock nobody retook counts), else `LockLostError`. A backend that cannot check it in the same
        operation (the HTTP API) ignores it: the runtime checks its lease before every call as well."""
        ...

    async def batch_add(
        self, requests: Sequence[RequestDraft], *, client_key: str, forefront: bool = False
    ) -> BatchAddResult:
        """Add up to 25 requests, deduplicated by `uniqueKey`. Items in `unprocessed_requests` may be resent."""
        ...

    async def get_request(self, request_id: str) -> Request | None:
        """Return the stored request, or None when there is none with that id."""
        ...

    async def get_info(self) -> QueueInfo:
        """Return the queue's metadata and counters."""
        ...

    async def aclose(self) -> None:
        """Release connections and files. Idempotent."""
        ...
