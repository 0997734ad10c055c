"""The one object that owns the locks this process holds.

Transitions have one owner each: the fetcher `add`s, workers `start` and `remove` what they finish, the heartbeat
`renew`s and `lose`s, shutdown releases what is left.

A lease is only as good as its proof: `expires_at` comes from the call that took or prolonged the lock (dated from
when it was sent, so it errs early), and `valid()` is checked before every write made under it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import anyio

from runner.models import Request

__all__ = ["Lease", "LeaseStatistics", "Leases"]


@dataclass(eq=False, slots=True)
class Lease:
    """A lock held on one request. `expires_at` is on the `anyio.current_time()` clock, conservatively early."""

    request: Request
    expires_at: float
    scope: anyio.CancelScope | None = None
    lost: bool = False
    started: bool = field(default=False)
    lost_reason: str | None = None
    """Why it was lost; set with `lost`."""
    expired: bool = False
    """Lost because the lock ran out (not because the queue refused it): the attempt still counts."""
    prolonging: anyio.Event | None = None
    """Set while a prolong call is in flight; the event fires when it ends."""
    closing: bool = False
    """Its outcome is being committed with a lock change (a give-back): the heartbeat must not prolong it any more."""
    commit_scope: anyio.CancelScope | None = None
    """The shielded scope of its commit, whose deadline shutdown may shorten."""

    def valid(self, now: float) -> bool:
        """Not lost, and its lock not run out by our (early) reckoning: a write under it is still fenced."""
        return not self.lost and now < self.expires_at


class LeaseStatistics(NamedTuple):
    """A snapshot of held leases."""

    held: int
    in_flight: int
    prefetched: int


class Leases:
    """Registry of held leases, by request id."""

    def __init__(self) -> None:
        self._held: dict[str, Lease] = {}
        self._in_flight = 0
        self._waiters: list[tuple[anyio.Event, Callable[[], bool] | None]] = []

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._held

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._held.values()))

    def add(self, request: Request, expires_at: float) -> Lease:
        """Register a freshly locked request.

        If a lease on the same request is still registered, the queue handed the request out again, so that lease's
        lock ran out (e.g. the wall clock stepped): it is lost (its handler cancelled), never silently replaced.
        """
        stale = self._held.get(request.id)
        if stale is not None:
            self.lose(stale, "the queue handed the request out again: its lock ran out", expired=True)
        lease = Lease(request, expires_at)
        self._held[request.id] = lease
        return lease

    def get(self, request_id: str) -> Lease | None:
        """The registered lease on `request_id`, if any."""
        return self._held.get(request_id)

    def holds(self, lease: Lease, now: float) -> bool:
        """`lease` is the registered one on its request and `valid(now)`: a write under it is still fenced (one call
        where the fences would make two)."""
        return self._held.get(lease.request.id) is lease and not lease.lost and now < lease.expires_at

    def start(self, lease: Lease, scope: anyio.CancelScope) -> bool:
        """Mark `lease` in flight under `scope` (cancelled if the lease is lost); False if it is already lost."""
        if lease.lost:
            return False
        lease.scope = scope
        lease.started = True
        self._in_flight += 1
        return True

    def remove(self, lease: Lease) -> None:
        """Forget `lease` (finished or given back) and wake whoever waits for room."""
        if self._held.get(lease.request.id) is lease:
            del self._held[lease.request.id]
            self._in_flight -= lease.started
            self._notify()

    def renew(self, lease: Lease, expires_at: float) -> None:
        """Record a successful prolong."""
        lease.expires_at = max(lease.expires_at, expires_at)

    def lose(self, lease: Lease, reason: str, *, expired: bool = False) -> None:
        """Drop a lease whose lock is gone and cancel its handler, if one runs.

        `expired`: the lock ran out rather than being refused, so the request may still be ours to record.
        """
        if not lease.lost:
            lease.lost = True
            lease.lost_reason = reason
            lease.expired = expired
        if lease.scope is not None:
            lease.scope.cancel()
        self.remove(lease)

    def due(self, before: float) -> list[Lease]:
        """Leases expiring before `before`, soonest first."""
        return sorted((lease for lease in self._held.values() if lease.expires_at < before), key=_expiry)

    async def wait_changed(self, until: Callable[[], bool] | None = None) -> None:
        """Wait until a lease is removed (room freed, or a handler finished and may have enqueued work).

        With `until`, wait for the first removal after which `until()` is true: checked at each removal, it spares
        the waiter a wake-up per finished request.
        """
        waiter = (anyio.Event(), until)
        self._waiters.append(waiter)
        try:
            await waiter[0].wait()
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _notify(self) -> None:
        waiters = self._waiters
        if not waiters:
            return
        if len(waiters) == 1:  # the usual: the fetcher, waiting for room
            event, until = waiters[0]
            if until is None or until():
                waiters.clear()
                event.set()
            return
        woken = [waiter for waiter in waiters if waiter[1] is None or waiter[1]()]
        for waiter in woken:
            self._waiters.remove(waiter)
            waiter[0].set()

    def counts(self) -> tuple[int, int]:
        """`(held, prefetched)` in one call (the fetcher's room, tested at every removal while it waits)."""
        held = len(self._held)
        return held, held - self._in_flight

    def statistics(self) -> LeaseStatistics:
        """Counts of held, in-flight and prefetched (locked, not started) leases."""
        return LeaseStatistics(len(self._held), self._in_flight, len(self._held) - self._in_flight)

    @property
    def in_flight(self) -> int:
        """Leases whose handler has started (a plain int: safe to read from another thread)."""
        return self._in_flight


def _expiry(lease: Lease) -> float:
    return lease.expires_at
