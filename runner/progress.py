"""A progress event every few seconds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio
import structlog

from runner.errors import QueueError
from runner.leases import Leases
from runner.metrics import Metrics
from runner.queue.protocol import RequestQueue
from runner.stats import RunStats

__all__ = ["report_progress"]

log = structlog.get_logger("headlock.progress")


async def report_progress(
    queue: RequestQueue,
    leases: Leases,
    stats: RunStats,
    *,
    every: float,
    metrics: Metrics | None = None,
    hook: Callable[[Mapping[str, Any]], None] | None = None,
) -> None:
    """Log `run.progress` every `every` seconds: counters, rate, what is held here and what the queue has pending.

    The pending count also goes to `metrics`. It is read from the queue (one call) only when this process finished
    something since the last report: an idle or slow worker spends no queue calls on progress. `hook` gets the same
    fields (e.g. the Actor's status message); it must not block.
    """
    metrics = metrics or Metrics()
    pending: int | None = None
    seen = -1
    while True:
        await anyio.sleep(every)
        held = leases.statistics()
        if stats.finished + stats.retried != seen:
            seen = stats.finished + stats.retried
            try:
                pending = (await queue.get_info()).pending_request_count
            except QueueError:
                pending = None
            metrics.queue_pending(pending)
        fields = {
            "handled": stats.handled,
            "failed": stats.failed,
            "retried": stats.retried,
            "rate": round(stats.rate(), 1),
            "in_flight": held.in_flight,
            "prefetched": held.prefetched,
            "pending": pending,
        }
        log.info("run.progress", **fields)
        if hook is not None:
            hook(fields)
