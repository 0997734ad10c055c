"""The heartbeat: prolongs, well before expiry, every lock this process holds (in flight and prefetched).

It also beats for liveness: it touches the health file at least every `LIVENESS_EVERY` seconds, whatever the lock
duration and whether or not anything is due for a prolong (`headlock health` checks the file's age).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskStatus

from runner.errors import LockLostError, NotFoundError, QueueError
from runner.health import liveness_interval, touch
from runner.leases import Lease, Leases
from runner.queue.protocol import RequestQueue
from runner.stats import RunStats

__all__ = ["keep_alive"]

log = structlog.get_logger("headlock.heartbeat")


async def keep_alive(
    queue: RequestQueue,
    leases: Leases,
    stats: RunStats,
    *,
    client_key: str,
    lock_secs: float,
    parallel: int = 25,
    health_file: Path | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Every `lock_secs / 4`, prolong each lease with less than half its lock time left.

    Fast handlers finish before that and cost no prolong call. A prolong refused because the lock is gone ("lease
    lost") cancels that request's handler. A failing prolong is retried on the next beats; if the lock expires
    meanwhile, the lease is treated as lost, so no handler ever runs on a lock we might not hold.

    With `health_file`, a liveness beat touches it now and then every `min(lock_secs / 4, LIVENESS_EVERY)` s, on
    its own cadence so that slow prolong calls (bounded by the lock's expiry) never delay it.
    """
    every = lock_secs / 4
    limiter = anyio.CapacityLimiter(parallel)
    prolong = partial(_prolong, queue, leases=leases, stats=stats, client_key=client_key, lock_secs=lock_secs)
    async with anyio.create_task_group() as beats:
        if health_file is not None:
            await beats.start(_beat_liveness, health_file, liveness_interval(lock_secs))
        task_status.started()
        while True:
            await anyio.sleep(every)
            # Each prolong runs on its own: one stalled call must not hold back the next beat, where another lease
            # may be due. A lease has at most one prolong in flight.
            for lease in leases.due(anyio.current_time() + lock_secs / 2):
                if lease.prolonging is None and not lease.closing:
                    lease.prolonging = anyio.Event()
                    beats.start_soon(partial(prolong, lease=lease, limiter=limiter))


async def _beat_liveness(
    path: Path, every: float, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Touch `path` now, report started, then touch it every `every` seconds; a failing write is logged, not fatal.

    The first touch runs in a thread (it may create the file and its directory); later ones are one `utime`.
    """
    failing = await anyio.to_thread.run_sync(partial(_touch_health, path, failing=False))
    task_status.started()
    while True:
        await anyio.sleep(every)
        failing = _touch_health(path, failing=failing)


def _touch_health(path: Path, *, failing: bool) -> bool:
    """Touch the health file; log when writing it starts or stops failing. True while it fails."""
    try:
        touch(path)  # one utime call: cheaper than a thread hop
    except OSError as exc:
        if not failing:
            log.warning("health.write_failed", path=str(path), error=str(exc))
        return True
    if failing:
        log.info("health.write_recovered", path=str(path))
    return False


async def _prolong(
    queue: RequestQueue,
    *,
    leases: Leases,
    stats: RunStats,
    lease: Lease,
    client_key: str,
    lock_secs: float,
    limiter: anyio.CapacityLimiter,
) -> None:
    try:
        async with limiter:
            if lease.lost or lease.closing or leases.get(lease.request.id) is not lease:
                return
            started = anyio.current_time()
            try:
                # A call still retrying when the lock runs out could only succeed too late: someone else may hold it.
                with anyio.fail_after(max(lease.expires_at - started, 0)):
                    await queue.prolong_lock(lease.request.id, lock_secs=lock_secs, client_key=client_key)
            except TimeoutError:
                _lose(leases, stats, lease, "lock expired before a prolong succeeded", expired=True)
                return
            except (LockLostError, NotFoundError) as exc:
                _lose(leases, stats, lease, str(exc))
                return
            except QueueError as exc:
                # Tried again at the next beats; once the lock has run out, the bound above loses the lease.
                log.warning("lease.prolong_failed", request_id=lease.request.id, error=str(exc))
                return
            # Dated from when the call was sent: the lock runs `lock_secs` from some moment after that.
            leases.renew(lease, started + lock_secs)
            stats.prolonged += 1
    finally:
        done, lease.prolonging = lease.prolonging, None
        if done is not None:
            done.set()


def _lose(leases: Leases, stats: RunStats, lease: Lease, reason: str, *, expired: bool = False) -> None:
    if lease.lost or leases.get(lease.request.id) is not lease:
        return
    log.warning("lease.lost", request_id=lease.request.id, url=lease.request.url, reason=reason)
    if not lease.started:
        stats.lost += 1  # a started one is counted by its worker
    leases.lose(lease, reason, expired=expired)
