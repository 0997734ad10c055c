"""The event-loop lag monitor: tells the user when something (usually a handler) blocked the loop.

A blocked loop stops everything at once: no prolong is sent, so locks run out while their handlers still "run".
The monitor ticks every `every` seconds; a tick that comes late by `threshold` or more logs `loop.blocked` with the
blocked time, and the worker puts that time into the error it records when a lock ran out.
"""

from __future__ import annotations

from collections import deque

import anyio
import structlog
from anyio.abc import TaskStatus

__all__ = ["LoopMonitor"]

log = structlog.get_logger("headlock.loop")


class LoopMonitor:
    """Measures how long the event loop was blocked. One per run; `watch` is its task."""

    def __init__(self, *, every: float = 0.25, threshold: float = 0.5, keep: int = 64) -> None:
        self.every = every
        self.threshold = threshold
        self._last_tick = anyio.current_time()
        self._blocks: deque[tuple[float, float]] = deque(maxlen=keep)  # (ended_at, blocked seconds)

    async def watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Tick until cancelled, logging each block of `threshold` seconds or more."""
        self._last_tick = anyio.current_time()
        task_status.started()
        while True:
            await anyio.sleep(self.every)
            now = anyio.current_time()
            blocked = now - self._last_tick - self.every
            self._last_tick = now
            if blocked >= self.threshold:
                self._blocks.append((now, blocked))
                log.warning("loop.blocked", blocked_s=round(blocked, 3))

    def blocked_since(self, since: float) -> float:
        """The longest block that ended after `since`, or the one going on now (its caller runs first after it)."""
        now = anyio.current_time()
        ongoing = now - self._last_tick - self.every
        longest = max((blocked for ended, blocked in self._blocks if ended >= since), default=0.0)
        return max(longest, ongoing if ongoing >= self.threshold else 0.0)

    def explain_expiry(self, since: float) -> str:
        """The error recorded for an attempt (started at `since`) whose lock ran out."""
        blocked = self.blocked_since(since)
        if blocked > 0:
            return f"lock expired: the event loop was blocked for {blocked:.1f} s"
        return "lock expired: no prolong was confirmed in time"
