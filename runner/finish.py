"""Deciding that the queue is finished, on a queue whose head is eventually consistent.

The platform's head can miss a request added a moment ago, while a read by id sees it. So an empty head with no
locks anywhere is not enough: the requests this process added in the last `CONSISTENCY_WINDOW` seconds are read
back by id first, and the run goes on while any of them is not handled. Requests other clients added are theirs to
confirm (each worker runs this check before it exits, so the last one alive cannot miss its own links). It costs
nothing until the head looks empty, and then one read per recent request. A queue whose head is consistent (the
embedded and postgres stores: `runner.queue.protocol.ConsistentHead`) skips it: there, an empty head is the truth.
"""

from __future__ import annotations

from collections import deque

import anyio
import structlog

from runner.errors import QueueError
from runner.queue.protocol import RequestQueue

__all__ = ["CONSISTENCY_WINDOW", "RecentAdds", "unconfirmed_adds"]

log = structlog.get_logger("headlock.fetcher")

CONSISTENCY_WINDOW = 10.0
"""Seconds a new request may stay out of the head (the official SDKs' `API_PROCESSED_REQUESTS_DELAY`: 10 s)."""
_MAX_RECENT = 10_000
"""Most recent adds remembered; beyond that, the oldest are checked by waiting out the window instead."""
_READS = 16
"""Reads by id at once."""


class RecentAdds:
    """The ids of requests this process added to the queue in the last `window` seconds, oldest first."""

    def __init__(self, window: float = CONSISTENCY_WINDOW) -> None:
        self.window = window
        self._adds: deque[tuple[float, str]] = deque()
        self._overflow_until = -1.0

    def add(self, request_id: str) -> None:
        """Remember that `request_id` was just added."""
        now = anyio.current_time()
        self._adds.append((now, request_id))
        if len(self._adds) > _MAX_RECENT:
            self._adds.popleft()
            self._overflow_until = now + self.window

    def pending(self) -> tuple[list[str], float]:
        """The ids still inside the window, and how long until a forgotten one leaves it (0: none forgotten)."""
        now = anyio.current_time()
        while self._adds and self._adds[0][0] <= now - self.window:
            self._adds.popleft()
        return [request_id for _, request_id in self._adds], max(0.0, self._overflow_until - now)

    def confirmed(self, request_ids: set[str]) -> None:
        """Forget `request_ids` (read back handled: they cannot come back to the head)."""
        self._adds = deque(item for item in self._adds if item[1] not in request_ids)


async def unconfirmed_adds(queue: RequestQueue, recent: RecentAdds) -> float:
    """0 when every recent add reads back handled; else seconds to wait before looking at the head again.

    A read that fails counts as unconfirmed: the run goes on rather than risk ending with a request in the queue.
    """
    request_ids, forgotten = recent.pending()
    if not request_ids:
        return forgotten
    handled: set[str] = set()
    unhandled: list[str] = []
    limiter = anyio.CapacityLimiter(_READS)

    async def read(request_id: str) -> None:
        async with limiter:
            try:
                request = await queue.get_request(request_id)
            except QueueError as exc:
                log.warning("fetch.confirm_failed", request_id=request_id, error=str(exc))
                unhandled.append(request_id)
                return
        if request is not None and request.handled_at is not None:
            handled.add(request_id)
        else:
            unhandled.append(request_id)

    async with anyio.create_task_group() as tg:
        for request_id in request_ids:
            tg.start_soon(read, request_id)
    recent.confirmed(handled)
    if unhandled:
        log.info("fetch.head_behind", unconfirmed=len(unhandled), example=unhandled[0])
        return 0.5
    return forgotten
