"""The shutdown path, in its fixed order.

1. stop fetching (cancel the fetcher, which closes the work stream);
2. give back prefetched requests at once (their locks deleted, forefront, so they keep their place);
3. let in-flight handlers finish within the grace period while the heartbeat keeps their locks alive;
4. cancel what is left;
5. release every lock still held, shielded from cancellation, and finally "unlock requests" for the client key.

Steps 1-4 run in `drain_on_stop` when a stop is requested; step 5 (`release_all`) runs on every exit of the run.
A second stop request (a second signal) cuts step 3 short; step 5 still runs.

The whole path is bounded: from the stop request it takes at most `grace + STOP_MARGIN` seconds (give-backs and
commits are cut short, the release ends at that deadline), so a platform that waits `grace + 10` s before SIGKILL
never kills it half-way.
"""

from __future__ import annotations

import math

import anyio
import structlog

from runner.commit import Committer
from runner.errors import LockLostError, QueueError
from runner.handoff import Handoff
from runner.leases import Lease

__all__ = ["Stopper", "drain_on_stop", "release_all"]

log = structlog.get_logger("headlock.shutdown")

RELEASE_TIMEOUT = 30.0
"""Upper bound on releasing locks at exit; whatever is left then expires on its own."""
GIVE_BACK_TIMEOUT = 5.0
"""Upper bound on giving back prefetched requests (step 2); the final unlock covers what is left."""
COMMIT_GRACE = 4.0
"""How long commits under way may go on once handlers are cancelled (step 4)."""
STOP_MARGIN = 9.0
"""The whole shutdown ends within `grace + STOP_MARGIN` s of the stop request (the documented stop timeout is
grace + 10 s)."""


class Stopper:
    """Requests a graceful stop, then a forced one. The CLI's signal task calls `stop`; library users may too."""

    def __init__(self) -> None:
        self.graceful = anyio.Event()
        self.forced = anyio.Event()
        self.reason: str | None = None
        self.requested_at: float | None = None
        """`anyio.current_time()` of the first stop request."""

    def stop(self, reason: str = "stop requested") -> None:
        """First call: stop gracefully. Later calls: skip the rest of the grace period."""
        if self.graceful.is_set():
            self.forced.set()
            log.warning("shutdown.forced", reason=reason)
            return
        self.reason = reason
        self.requested_at = anyio.current_time()
        self.graceful.set()
        log.info("shutdown.requested", reason=reason)

    def stop_now(self, reason: str) -> None:
        """Stop without the grace period: every request, prefetched or in flight, is given back at once.

        For a process about to be moved (the platform's `migrating`): handlers are cancelled, their requests go back
        to the head (forefront) without counting as an attempt, and every lock is released.
        """
        if not self.graceful.is_set():
            self.stop(reason)
        self.forced.set()
        log.warning("shutdown.immediate", reason=reason)


async def drain_on_stop(
    stopper: Stopper,
    *,
    fetch_scope: anyio.CancelScope,
    buffered: Handoff[Lease],
    crawl_scope: anyio.CancelScope,
    crawl_done: anyio.Event,
    committer: Committer,
    grace: float,
) -> None:
    """Wait for a stop request, then run steps 1-4 of the shutdown path."""
    await stopper.graceful.wait()
    stopped = stopper.requested_at or anyio.current_time()
    leases = committer.leases
    committer.stop_deadline = stopped + grace + COMMIT_GRACE  # handlers finishing late still get to commit
    fetch_scope.cancel()  # 1.
    prefetched = buffered.take_all()  # 2. taken synchronously, so no worker can start one of them meanwhile
    with anyio.move_on_after(GIVE_BACK_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for lease in prefetched:
                tg.start_soon(_give_back, committer, lease)
    in_flight = leases.statistics().in_flight
    log.info("shutdown.draining", given_back=len(prefetched), in_flight=in_flight, grace=grace)
    with anyio.CancelScope(deadline=stopped + grace):  # 3.
        async with anyio.create_task_group() as tg:

            async def cut_short() -> None:
                await stopper.forced.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(cut_short)
            await crawl_done.wait()
            tg.cancel_scope.cancel()
    if not crawl_done.is_set():
        log.warning("shutdown.cancelling", in_flight=leases.statistics().in_flight)
        cut = anyio.current_time() + COMMIT_GRACE
        committer.stop_deadline = min(committer.stop_deadline, cut)
        for lease in leases:
            if lease.commit_scope is not None:
                lease.commit_scope.deadline = min(lease.commit_scope.deadline, cut)
        crawl_scope.cancel()  # 4.


async def _give_back(committer: Committer, lease: Lease) -> None:
    leases, request_id = committer.leases, lease.request.id
    if lease.lost or leases.get(request_id) is not lease:
        return  # not ours to release any more (a later lease on the same request may be)
    # Forget it first, so the final release does not try it twice; if the call fails, unlock_requests covers it.
    leases.remove(lease)
    committer.stats.given_back += 1
    try:
        await committer.queue.delete_lock(request_id, client_key=committer.client_key, forefront=True)
    except LockLostError:
        pass  # already released (e.g. by the final unlock_requests racing this call)
    except QueueError as exc:
        log.warning("shutdown.give_back_failed", request_id=request_id, error=str(exc))


async def release_all(committer: Committer, *, deadline: float | None = None) -> int:
    """Step 5: delete every lock still held, then unlock all of the client key's locks; return how many.

    Shielded from cancellation and bounded in time (`RELEASE_TIMEOUT`, or `deadline` if sooner); never raises for
    a failed call (the locks then expire).
    """
    released = 0
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = min(anyio.current_time() + RELEASE_TIMEOUT, deadline if deadline is not None else math.inf)
        left = list(committer.leases)
        async with anyio.create_task_group() as tg:
            for lease in left:
                tg.start_soon(_give_back, committer, lease)
        released += len(left)
        try:
            # The last step also frees locks we hold but no longer track (retry backoffs, abandoned commits).
            released += await committer.queue.unlock_requests(client_key=committer.client_key)
        except QueueError as exc:
            log.error("shutdown.unlock_failed", error=str(exc))
    if scope.cancelled_caught:
        log.error("shutdown.release_timed_out", timeout=round(scope.deadline - anyio.current_time(), 1))
    log.info("shutdown.released", released=released)
    return released
