"""A worker's deadline: one loop timer for all its attempts, instead of the two a `CancelScope(deadline=...)` per
attempt arms and cancels (one at the handler's start, one when the commit moves it)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import anyio

__all__ = ["Deadline"]


class Deadline:
    """Cancels the scope it watches once the loop's clock reaches its time.

    One task's attempts follow each other, and each deadline is usually later than the one before: the timer armed
    for an earlier attempt stays armed, and when it fires early it moves to the current deadline (once per handler
    timeout, not twice per request). A deadline earlier than the armed timer re-arms it. Make it in the loop it
    serves (it reads that loop's clock); not for concurrent scopes (one at a time).
    """

    __slots__ = ("_at", "_loop", "_scope", "_timer", "_timer_at", "scope")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._scope: anyio.CancelScope | None = None
        self._at = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        """When the armed timer fires (its `when()`, a Python call, kept here)."""
        self.scope: Callable[[], anyio.CancelScope] = type(anyio.CancelScope())
        """Makes a plain `anyio.CancelScope` of the running backend's class directly: `anyio.CancelScope()` looks the
        backend up at every call (a third of an empty scope's cost)."""

    def watch(self, scope: anyio.CancelScope, at: float) -> None:
        """Cancel `scope` at `at` (on the loop's clock), unless `clear` comes first; replaces any earlier watch."""
        self._scope, self._at = scope, at
        timer = self._timer
        if timer is None or self._timer_at > at:
            if timer is not None:
                timer.cancel()
            self._timer, self._timer_at = self._loop.call_at(at, self._fire), at

    def clear(self) -> None:
        """Stop watching (the attempt ended); the timer stays armed for the next one."""
        self._scope, self._at = None, math.inf

    def close(self) -> None:
        """Stop watching and disarm the timer (the worker ends)."""
        self.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        scope = self._scope
        if scope is None:
            return  # nothing watched: the next `watch` arms a timer again
        if self._loop.time() >= self._at:
            self._scope = None
            scope.cancel()
        else:
            self._timer, self._timer_at = self._loop.call_at(self._at, self._fire), self._at
