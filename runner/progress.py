"""A progress event every few seconds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio
import structlog

from runner.errors import QueueError
from runner.leases import Leases
from runner.metrics import Metrics
from runner.politeness import Hosts
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
    hosts: Hosts | None = None,
) -> None:
    """Log `run.progress` every `every` seconds: counters, rates, what is held here and what the queue has pending.

    Fields: `handled`, `failed`, `retried`, `items`, `in_flight`, `prefetched`; `rate` (finished per second since
    the start) and `pages_per_min` (handled per minute over the last interval); from the queue's counts, `pending`,
    `total`, `percent` (handled or failed, of all) and `eta_s` (pending over this process's finishing rate in the
    last interval), each None while unknown. The counts are read from the queue (one call) only when this process
    finished something since the last report: an idle or slow worker spends no queue calls on progress. They also
    go to `metrics`. `hook` gets the same fields (e.g. the Actor's status message); it must not block.
    With the shared client's `hosts`: `hosts_throttled` (hosts in a 429/503 backoff now) and `deferred` (requests
    given back unstarted for a busy host, since the start).
    """
    metrics = metrics or Metrics()
    if hosts is not None:
        metrics.track_hosts(hosts)
    pending: int | None = None
    total: int | None = None
    handled_in_queue: int | None = None
    seen = -1
    # Counters of an earlier life of the run (a resumed Actor run) are not part of the first interval's rate.
    last_at, last_handled, last_finished = anyio.current_time(), stats.handled, stats.finished
    while True:
        await anyio.sleep(every)
        now = anyio.current_time()
        held = leases.statistics()
        if stats.finished + stats.retried != seen:
            seen = stats.finished + stats.retried
            try:
                info = await queue.get_info()
            except QueueError:
                pending = total = handled_in_queue = None
            else:
                pending, total = info.pending_request_count, info.total_request_count
                handled_in_queue = info.handled_request_count
            metrics.queue_pending(pending)
        interval = now - last_at
        finishing = (stats.finished - last_finished) / interval if interval > 0 else 0.0
        pages_per_min = (stats.handled - last_handled) * 60 / interval if interval > 0 else 0.0
        last_at, last_handled, last_finished = now, stats.handled, stats.finished
        fields = {
            "handled": stats.handled,
            "failed": stats.failed,
            "retried": stats.retried,
            "rate": round(stats.rate(), 1),
            "in_flight": held.in_flight,
            "prefetched": held.prefetched,
            "pending": pending,
            "items": stats.items,
            "pages_per_min": round(pages_per_min, 1),
            "total": total,
            "percent": round(100 * handled_in_queue / total, 1) if total and handled_in_queue is not None else None,
            "eta_s": round(pending / finishing) if pending is not None and finishing > 0 else None,
        }
        if hosts is not None:
            polite = hosts.statistics()
            fields["hosts_throttled"] = polite.throttled
            fields["deferred"] = polite.deferred
        log.info("run.progress", **fields)
        if hook is not None:
            hook(fields)
