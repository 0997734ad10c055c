"""The shutdown path, in its fixed order.

1. stop fetching (cancel the fetcher, which closes the work stream);
2. give back prefetched requests at once (their locks deleted, forefront, so they keep their place);
3. let in-flight handlers finish within the grace period while the heartbeat keeps their locks alive;
4. cancel what is left;
5. release every lock still held, shielded from cancellation, and finally "unlock requests" for the client key.

Steps 1-4 run in `drain_on_stop` when a stop is requested; step 5 (`release_all`) runs on every exit of the run.
A second stop request (a second signal) cuts step 3 short; step 5 still runs.
"""

from __future__ import annotations

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from runner.errors import LockLostError, QueueError
from runner.leases import Lease, Leases
from runner.queue.protocol import RequestQueue
from runner.stats import RunStats

__all__ = ["Stopper", "drain_on_stop", "release_all"]

log = structlog.get_logger("headlock.shutdown")

RELEASE_TIMEOUT = 30.0
"""Upper bound on releasing locks at exit; whatever is left then expires on its own."""


class Stopper:
    """Requests a graceful stop, then a forced one. The CLI's signal task calls `stop`; library users may too."""

    def __init__(self) -> None:
        self.graceful = anyio.Event()
        self.forced = anyio.Event()
        self.reason: str | None = None

    def stop(self, reason: str = "stop requested") -> None:
        """First call: stop gracefully. Later calls: skip the rest of the grace period."""
        if self.graceful.is_set():
            self.forced.set()
            log.warning("shutdown.forced", reason=reason)
            return
        self.reason = reason
        self.graceful.set()
        log.info("shutdown.requested", reason=reason)


async def drain_on_stop(
    stopper: Stopper,
    *,
    fetch_scope: anyio.CancelScope,
    buffered: MemoryObjectReceiveStream[Lease],
    crawl_scope: anyio.CancelScope,
    crawl_done: anyio.Event,
    queue: RequestQueue,
    leases: Leases,
    stats: RunStats,
    client_key: str,
    grace: float,
) -> None:
    """Wait for a stop request, then run steps 1-4 of the shutdown path."""
    await stopper.graceful.wait()
    fetch_scope.cancel()  # 1.
    prefetched = []  # 2. taken synchronously, so no worker can start one of them meanwhile
    while True:
        try:
            prefetched.append(buffered.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            break
    buffered.close()
    async with anyio.create_task_group() as tg:
        for lease in prefetched:
            tg.start_soon(_give_back, queue, leases, stats, lease, client_key)
    in_flight = leases.statistics().in_flight
    log.info("shutdown.draining", given_back=len(prefetched), in_flight=in_flight, grace=grace)
    with anyio.move_on_after(grace):  # 3.
        async with anyio.create_task_group() as tg:

            async def cut_short() -> None:
                await stopper.forced.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(cut_short)
            await crawl_done.wait()
            tg.cancel_scope.cancel()
    if not crawl_done.is_set():
        log.warning("shutdown.cancelling", in_flight=leases.statistics().in_flight)
        crawl_scope.cancel()  # 4.


async def _give_back(queue: RequestQueue, leases: Leases, stats: RunStats, lease: Lease, client_key: str) -> None:
    if lease.lost:
        return
    # Forget it first, so the final release does not try it twice; if the call fails, unlock_requests covers it.
    leases.remove(lease)
    stats.given_back += 1
    try:
        await queue.delete_lock(lease.request.id, client_key=client_key, forefront=True)
    except LockLostError:
        pass  # already released (e.g. by the final unlock_requests racing this call)
    except QueueError as exc:
        log.warning("shutdown.give_back_failed", request_id=lease.request.id, error=str(exc))


async def release_all(queue: RequestQueue, leases: Leases, stats: RunStats, *, client_key: str) -> int:
    """Step 5: delete every lock still held, then unlock all of `client_key`'s locks; return how many.

    Shielded from cancellation and bounded in time; never raises for a failed call (the locks then expire).
    """
    released = 0
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + RELEASE_TIMEOUT
        left = list(leases)
        async with anyio.create_task_group() as tg:
            for lease in left:
                tg.start_soon(_give_back, queue, leases, stats, lease, client_key)
        released += len(left)
        try:
            # The last step also frees locks we hold but no longer track (retry backoffs, abandoned commits).
            released += await queue.unlock_requests(client_key=client_key)
        except QueueError as exc:
            log.error("shutdown.unlock_failed", error=str(exc))
    if scope.cancelled_caught:
        log.error("shutdown.release_timed_out", timeout=RELEASE_TIMEOUT)
    log.info("shutdown.released", released=released)
    return released
