"""The fetcher: locks requests from the head, only as many as there is room for, and hands them to workers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog

from runner.backoff import Backoff
from runner.errors import InvalidInputError, NotFoundError, QueueError, UnauthorizedError
from runner.finish import RecentAdds, unconfirmed_adds
from runner.handoff import Handoff
from runner.leases import Lease, Leases
from runner.models import LockedHead
from runner.queue.protocol import RequestQueue
from runner.stats import RunStats

__all__ = ["fetch"]

log = structlog.get_logger("headlock.fetcher")

BUSY_POLL = 5.0
"""Seconds between head polls while this process holds work and the head is empty."""
_BACKOFF_SLACK = 0.05
"""Seconds after a retry backoff's end before looking for its request (the queue dates the lock a bit later)."""


async def fetch(
    queue: RequestQueue,
    send: Handoff[Lease],
    leases: Leases,
    stats: RunStats,
    *,
    client_key: str,
    capacity: int,
    batch: int,
    lock_secs: float,
    keep_alive: bool = False,
    max_requests: int | None = None,
    idle: Backoff | None = None,
    backoff_until: Callable[[], float] = lambda: 0.0,
    next_backoff_end: Callable[[], float | None] = lambda: None,
    recent: RecentAdds | None = None,
) -> None:
    """Lock up to `min(batch, free room)` requests per call and hand them to `send`; end it when the queue is done.

    Room is `capacity` (workers + prefetch) minus the leases held; while prefetched work waits, it locks only when a
    whole batch fits. While the head is empty it waits for a local
    change (a finished request may have enqueued work) or a jittered, growing delay, never a busy loop. It returns
    when nothing is held here, the head is empty, no client holds a lock and every request added here lately
    (`recent`) reads back handled (unless `keep_alive`), or when `max_requests` are finished or held.

    A lock call whose answer was lost may have locked requests we never saw ("orphans": held by our client key,
    untracked). They would hold up the end of the run for a whole lock time, so once nothing is held here, the
    head is empty and every retry backoff given here (`backoff_until()`, those locks are ours on purpose) is over,
    "unlock requests" frees them.

    Raises:
        UnauthorizedError, InvalidInputError, NotFoundError: the queue refuses us or does not exist; retrying
            cannot help.
    """
    # 0.05 s doubling to 5 s: a burst of quick looks right after the head empties (new work usually follows soon),
    # then one call every 5 s at most while idle.
    idle = idle or Backoff(initial=0.05, maximum=5.0)
    errors = Backoff(initial=0.5, maximum=30.0)

    room = _Room(leases, stats, capacity=capacity, batch=batch, max_requests=max_requests)
    orphans = False
    try:
        while True:
            if room.exhausted():
                log.info("fetch.max_requests_reached", max_requests=max_requests)
                return
            if not room.may_lock():
                await leases.wait_changed(until=room.may_lock_or_exhausted)
                continue
            started = anyio.current_time()
            try:
                head = await queue.lock_head(limit=min(batch, room.free()), lock_secs=lock_secs, client_key=client_key)
            except (UnauthorizedError, InvalidInputError, NotFoundError):
                raise
            except QueueError as exc:
                orphans = orphans or exc.maybe_applied
                delay = errors.next()
                log.warning("fetch.failed", error=str(exc), retry_in=round(delay, 2))
                await anyio.sleep(delay)
                continue
            errors.reset()
            orphans = orphans or head.may_have_orphans
            stats.quarantined += head.quarantined
            if _hand_out(head, send, leases, started=started, lock_secs=lock_secs):
                idle.reset()
                continue
            if orphans and not leases and head.queue_has_locked_requests and anyio.current_time() >= backoff_until():
                orphans = False
                if await _free_orphans(queue, client_key):
                    continue
            if not leases and not head.queue_has_locked_requests and not keep_alive:
                if await _finished(queue, leases, recent):
                    return
                continue
            # While we hold work, the head may be empty only because we hold it: a finishing lease (which may
            # have enqueued more) is what to wait for; other clients' expiring locks are looked at less often.
            wait = BUSY_POLL if leases else idle.next()
            if (comes_back := next_backoff_end()) is not None:
                # A request given back here for a retry is due: look then, not after the idle delay.
                wait = min(wait, max(comes_back - anyio.current_time(), 0) + _BACKOFF_SLACK)
            with anyio.move_on_after(wait):
                await leases.wait_changed()
    finally:
        send.end()


def _hand_out(head: LockedHead, send: Handoff[Lease], leases: Leases, *, started: float, lock_secs: float) -> int:
    """Register and buffer the locked requests; return how many."""
    # Dated from the attempt that took the locks (after any retries), not from before the first one.
    expires_at = (head.locked_at if head.locked_at is not None else started) + lock_secs
    for request in head.items:
        # No checkpoint between registering and buffering: a lease is always either buffered or in flight.
        send.put(leases.add(request, expires_at))
    return len(head.items)


async def _finished(queue: RequestQueue, leases: Leases, recent: RecentAdds | None) -> bool:
    """True when the queue is done; else wait a little (the head lags behind our own latest adds, runner.finish)."""
    behind = 0.0 if recent is None else await unconfirmed_adds(queue, recent)
    if not behind:
        log.info("fetch.queue_finished")
        return True
    with anyio.move_on_after(behind):
        await leases.wait_changed()
    return False


async def _free_orphans(queue: RequestQueue, client_key: str) -> int:
    """Unlock what our key holds untracked (see `fetch`); a failure leaves them to expire."""
    try:
        freed = await queue.unlock_requests(client_key=client_key)
    except QueueError as exc:
        log.warning("fetch.unlock_orphans_failed", error=str(exc))
        return 0
    log.info("fetch.orphans_unlocked", count=freed)
    return freed


@dataclass(frozen=True, slots=True)
class _Room:
    """How much the fetcher may lock: `capacity` (workers + prefetch) minus what is held, within `max_requests`."""

    leases: Leases
    stats: RunStats
    capacity: int
    batch: int
    max_requests: int | None

    def free(self) -> int:
        """Requests that may be locked now (zero or less: none)."""
        return self._free(len(self.leases))

    def _free(self, held: int) -> int:
        free = self.capacity - held
        if self.max_requests is not None:
            free = min(free, self.max_requests - self.stats.finished - held)
        return free

    def exhausted(self) -> bool:
        """`max_requests` are finished, and nothing is held any more."""
        return self.max_requests is not None and self.free() <= 0 and not self.leases

    def may_lock(self) -> bool:
        """Room for a whole batch, or for any request while workers have nothing buffered: each call locks up to 25.

        Tested at every lease removal while the fetcher waits: one call to the leases for both counts."""
        held, prefetched = self.leases.counts()
        free = self._free(held)
        return free >= self.batch or (free > 0 and not prefetched)

    def may_lock_or_exhausted(self) -> bool:
        """What the fetcher waits for while it may not lock: a reason to lock, or to return."""
        return self.may_lock() or self.exhausted()
