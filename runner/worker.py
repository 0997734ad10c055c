"""Handler workers: run the user's handler on each leased request, then hand the outcome to the committer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import structlog
from anyio.abc import ObjectReceiveStream

from runner.commit import Committer
from runner.context import Context
from runner.errors import NoRetry
from runner.leases import Lease
from runner.router import Handler

__all__ = ["Worker"]


def _logger() -> structlog.typing.FilteringBoundLogger:
    """The worker's logger, built once per run: the lazy proxy `get_logger` returns rebuilds one at every call
    (unless the application enabled structlog's `cache_logger_on_first_use`), and handlers log through it too."""
    bound: structlog.typing.FilteringBoundLogger = structlog.get_logger("headlock.worker").bind()
    return bound


COMMIT_TIMEOUT = 120.0
"""Upper bound on one request's bookkeeping calls, which shutdown does not interrupt."""


@dataclass(frozen=True, slots=True)
class Worker:
    """What every handler attempt needs; `run` is one worker task, and the runtime starts `concurrency` of them.

    The committer owns the lease registry and the run's counters, so the worker reaches them through it.
    """

    handler: Handler
    committer: Committer
    http: httpx.AsyncClient
    options: Mapping[str, Any]
    handler_timeout: float
    log: structlog.typing.FilteringBoundLogger = field(default_factory=_logger)

    async def run(self, receive: ObjectReceiveStream[Lease]) -> None:
        """Handle leases from `receive` until it is closed and empty.

        A lease lost while its handler runs cancels the handler; the request is dropped, not marked. Cancellation of
        the worker itself (shutdown after the grace period) leaves the lease in `leases` for shutdown to release.
        """
        async with receive:
            async for lease in receive:
                request = lease.request
                # bind/reset rather than `bound_contextvars`: half the cost without the generator context manager.
                tokens = structlog.contextvars.bind_contextvars(
                    request_id=request.id, url=request.url, attempt=request.retry_count + 1
                )
                try:
                    await self._attempt(lease)
                finally:
                    structlog.contextvars.reset_contextvars(**tokens)

    async def _attempt(self, lease: Lease) -> None:
        committer, leases, stats = self.committer, self.committer.leases, self.committer.stats
        ctx = Context(lease.request, http=self.http, log=self.log, options=self.options, known=committer.seen)
        error: str | None = None
        permanent = False
        # One scope for both ends of a handler: its deadline (a timeout) and `Leases.lose` (a lost lock) cancel it.
        with anyio.CancelScope(deadline=anyio.current_time() + self.handler_timeout) as scope:
            if not leases.start(lease, scope):
                return  # lost while waiting in the buffer
            try:
                returned: object = await self.handler(ctx)  # type: ignore[func-returns-value]
                if returned is not None:
                    self.log.warning("handler.returned_value", type=type(returned).__name__)
            except NoRetry as exc:
                error, permanent = f"NoRetry: {exc}", True
            except Exception as exc:  # noqa: BLE001 - any handler error is recorded on the request and retried
                error = f"{type(exc).__name__}: {exc}"
        if lease.lost:
            stats.lost += 1
            self.log.warning("lease.dropped", reason="lock lost while the handler ran")
            return
        if scope.cancelled_caught:
            error = f"handler timed out after {self.handler_timeout:g} s"
        now = anyio.current_time()
        if now >= lease.expires_at:
            # The heartbeat could not confirm the lock in time: another worker may hold it now, so commit nothing.
            leases.lose(lease)
            stats.lost += 1
            self.log.warning("lease.dropped", reason="lock expired before the handler finished")
            return
        # Bookkeeping must not be cut in half by shutdown's cancellation: a half-done commit would redo the request.
        with anyio.CancelScope(shield=True, deadline=now + COMMIT_TIMEOUT):
            if error is None:
                if await committer.succeed(lease, ctx.pending_enqueues(), ctx.pending_items()):
                    self.log.debug("request.handled")
            else:
                await committer.fail(lease, error, permanent=permanent)
