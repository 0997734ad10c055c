"""Handler workers: run the user's handler on each leased request, then hand the outcome to the committer."""

from __future__ import annotations

import os
import traceback
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextvars import Token
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import httpx
import structlog

from runner.commit import Committer
from runner.context import Context, SharedHttp
from runner.deadline import Deadline
from runner.errors import NoRetry, QueueError
from runner.leases import Lease
from runner.loopwatch import LoopMonitor
from runner.models import Request
from runner.politeness import Hosts
from runner.router import Handler
from runner.stats import ErrorTally
from runner.uniquekey import UniqueKeyFunction, normalize_parts

__all__ = ["Worker", "user_traceback"]


def _logger() -> structlog.typing.FilteringBoundLogger:
    """The worker's logger, built once per run: the lazy proxy `get_logger` returns rebuilds one at every call
    (unless the application enabled structlog's `cache_logger_on_first_use`), and handlers log through it too."""
    bound: structlog.typing.FilteringBoundLogger = structlog.get_logger("headlock.worker").bind()
    return bound


_Tokens = tuple[Token[Any], Token[Any], Token[Any]]


class _LogContext:
    """structlog's context variables of `request_id`, `url` and `attempt` (those `bind_contextvars` sets): the worker
    sets and resets them itself, at a quarter of `bind_contextvars` and `reset_contextvars`'s cost."""

    __slots__ = ("_attempt", "_request_id", "_url")

    def __init__(self) -> None:
        tokens = structlog.contextvars.bind_contextvars(request_id=None, url=None, attempt=None)
        structlog.contextvars.reset_contextvars(**tokens)
        self._request_id, self._url, self._attempt = (tokens[key].var for key in ("request_id", "url", "attempt"))

    def bind(self, request: Request) -> _Tokens:
        """Name `request` and its attempt's number in what is logged until `reset`."""
        return (
            self._request_id.set(request.id),
            self._url.set(request.url),
            self._attempt.set(request.retry_count + 1),
        )

    def reset(self, tokens: _Tokens) -> None:
        """Undo the `bind` that gave `tokens`."""
        self._attempt.reset(tokens[2])
        self._url.reset(tokens[1])
        self._request_id.reset(tokens[0])


COMMIT_TIMEOUT = 120.0
"""Upper bound on one request's bookkeeping calls, which shutdown does not interrupt (it may shorten it)."""
RECLAIM_TIMEOUT = 5.0
"""Upper bound on the call that re-proves a lock which ran out, to record its attempt."""


@dataclass(slots=True)
class _Current:
    """The attempt running in a worker's cancel scope: what its end needs when the scope's cancellation cut it (then
    it ends after the scope, `Worker._end_cut`)."""

    lease: Lease | None = None
    started: float = 0.0
    ctx: Context | None = None
    committing: bool = False
    now: float = 0.0
    """When its commit began (`committing`)."""
    error: str | None = None
    permanent: bool = False
    caught: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Worker:
    """What every handler attempt needs; `run` is one worker task, and the runtime starts `concurrency` of them.

    The committer owns the lease registry and the run's counters, so the worker reaches them through it.
    `unique_key` gives the default `uniqueKey` of the URLs handlers enqueue (the run's convention); `errors` counts
    the errors of the requests that failed for good.
    """

    handler: Handler
    committer: Committer
    http: httpx.AsyncClient | SharedHttp
    options: Mapping[str, Any]
    handler_timeout: float
    lock_secs: float = 60.0
    monitor: LoopMonitor | None = None
    log: structlog.typing.FilteringBoundLogger = field(default_factory=_logger)
    unique_key: UniqueKeyFunction = field(default=normalize_parts, kw_only=True)
    errors: ErrorTally = field(default_factory=ErrorTally, kw_only=True)
    hosts: Hosts | None = field(default=None, kw_only=True)
    """The shared client's hosts: a request whose host would hold this worker long is given back (`_defer`)."""

    async def run(self, receive: AsyncIterable[Lease]) -> None:
        """Handle leases from `receive` (the fetcher's `Handoff`, or any stream of leases) until it ends.

        A lease lost while its handler runs cancels the handler; the request is dropped, not marked. Cancellation of
        the worker itself (shutdown after the grace period) leaves the lease in `leases` for shutdown to release.
        """
        deadline = Deadline()
        log_context = _LogContext()
        current = _Current()
        leases = receive.__aiter__()
        try:
            while True:
                # One cancel scope for the worker's attempts, not one each: an attempt's timeout or lost lease cancels
                # it, and that attempt then ends outside it (`_end_cut`) before a new scope takes the next ones.
                with deadline.scope() as scope:
                    if await self._handle(leases, scope, deadline, current, log_context):
                        return
                await self._end_cut(scope, current, log_context)
        finally:
            deadline.close()

    async def _handle(
        self,
        leases: AsyncIterator[Lease],
        scope: anyio.CancelScope,
        deadline: Deadline,
        current: _Current,
        log_context: _LogContext,
    ) -> bool:
        """Attempt leases in `scope` until the stream ends (True) or an attempt leaves the scope unfit (False)."""
        hosts = self.hosts
        # Each lease's `bind` replaces the one before; the first one's tokens undo them all when the loop ends (the
        # worker logs nothing between two leases): three context variable resets a request fewer.
        first: _Tokens | None = None
        try:
            async for lease in leases:
                request = lease.request
                bound = log_context.bind(request)
                if first is None:
                    first = bound
                claimed, defer_s = hosts.admit(request.url) if hosts is not None else (None, 0.0)
                try:
                    if defer_s:
                        await self._defer(lease, defer_s)
                    elif await self._attempt(lease, deadline, scope, current):
                        return False
                finally:
                    if claimed is not None:
                        Hosts.leave(claimed)
        finally:
            if first is not None:
                log_context.reset(first)
        return True

    async def _defer(self, lease: Lease, delay: float) -> None:
        """Give `lease` back unstarted for `delay` s: its host is busy, and other requests must not wait for it.

        The lock is the timer, as for a retry's backoff: prolonged by `delay` and left to lapse. No attempt is
        counted. A failed prolong leaves the lock to lapse at its time; cancelled, the lease stays for shutdown.
        """
        committer, leases = self.committer, self.committer.leases
        if not lease.valid(anyio.current_time()):
            self._drop_unstarted(lease)
            return
        lease.closing = True  # no new prolong from the heartbeat; one in flight lands first
        if lease.prolonging is not None:
            await lease.prolonging.wait()
        if leases.get(lease.request.id) is not lease or not lease.valid(anyio.current_time()):
            leases.remove(lease)  # lost meanwhile (then gone already), or run out: it lapses by itself
            return
        self.log.debug("request.deferred", defer_s=round(delay, 3))
        try:
            await committer.queue.prolong_lock(lease.request.id, lock_secs=delay, client_key=committer.client_key)
        except QueueError as exc:
            self.log.info("request.defer_failed", error=str(exc))
        leases.remove(lease)  # the fetcher knows when it is due back (`Hosts.next_deferral_end`)

    def _drop_unstarted(self, lease: Lease) -> None:
        """Buffered past its lock (e.g. the loop was blocked): not provably ours, so neither run nor committed."""
        self.committer.stats.lost += 1
        self.log.warning("lease.dropped", reason=lease.lost_reason or "lock ran out before the handler started")
        self.committer.leases.lose(lease, "lock ran out before the handler started", expired=True)

    async def _attempt(self, lease: Lease, deadline: Deadline, scope: anyio.CancelScope, current: _Current) -> bool:
        """One attempt in the worker's `scope`; True if it must end outside it (see `_end_cut`): the scope was
        cancelled. A cancellation of the scope that reaches the handler leaves the attempt in `current`."""
        committer, leases = self.committer, self.committer.leases
        clock, known = committer.clock, committer.known
        started = clock()
        if not lease.valid(started):
            self._drop_unstarted(lease)
            return False
        unrecorded = committer.take_expired(lease.request.id) if committer.expired else None
        if unrecorded is not None:
            # An earlier attempt here ran out of lock before it was recorded: it counts, so record it under this
            # lock (and retry after the backoff, or fail for good) instead of running the handler again.
            if leases.start(lease, anyio.CancelScope()):
                await self._commit(lease, unrecorded, permanent=False, ctx=None)
            return False
        ctx = Context(
            lease.request,
            http=self.http,
            log=self.log,
            options=self.options,
            known=known,
            key_memo=committer.key_memo,
            unique_key=self.unique_key,
        )
        # The worker's scope is cancelled by the handler's deadline (a timeout) and by `Leases.lose` (a lost lock);
        # the worker's `Deadline` times it (no timer armed and cancelled per attempt).
        if not leases.start(lease, scope):
            return False  # lost while waiting in the buffer
        current.lease, current.started, current.ctx, current.committing = lease, started, ctx, False
        error: str | None = None
        permanent = False
        caught: BaseException | None = None
        deadline.watch(scope, started + self.handler_timeout)
        try:
            returned: object = await self.handler(ctx)  # type: ignore[func-returns-value]
            if returned is not None:
                self.log.warning("handler.returned_value", type=type(returned).__name__)
        except Exception as exc:  # noqa: BLE001 - any handler error is recorded on the request and retried
            (error, permanent), caught = _describe(exc), exc
        else:
            now = clock()
            if not scope.cancel_called and not _outlived(lease, now):
                # The usual end: the scope, shielded now, bounds the commit (no scope of its own).
                # A lock lost from here on is for the committer's fences to notice, as in `_commit`.
                current.committing, current.now = True, now
                lease.scope, lease.commit_scope = None, scope
                scope.shield = True
                deadline.watch(scope, min(now + COMMIT_TIMEOUT, committer.stop_deadline))
                if await committer.succeed(lease, ctx.pending_enqueues(), ctx.pending_items()):
                    self.log.debug("request.handled")
                scope.shield = False
                current.lease = None
                # Cancelled as it ended: the next attempt needs a fresh scope. (A deadline shutdown gave it for the
                # commit, see `lease.commit_scope`, is followed by the crawl's cancellation: no next attempt.)
                return scope.cancel_called
        finally:
            deadline.clear()
            lease.scope = None  # a loss from now on must not cancel the scope the next attempt runs in
        if scope.cancel_called:  # its timer fired or its lease was lost, but no cancellation reached it
            current.error, current.permanent, current.caught = error, permanent, caught
            return True
        current.lease = None
        await self._conclude(lease, started, ctx, error, permanent=permanent, caught=caught, timed_out=False)
        return False

    async def _end_cut(
        self,
        scope: anyio.CancelScope,
        current: _Current,
        log_context: _LogContext,
    ) -> None:
        """The end of the attempt that left the worker's (now exited) `scope`: a commit its timeout cut, or a
        handler the scope cancelled (a timeout, a lost lease) or that ended as it was cancelled."""
        lease, ctx = current.lease, current.ctx
        error, permanent, caught = current.error, current.permanent, current.caught
        current.lease = current.ctx = current.error = current.caught = None
        current.permanent = False
        if lease is None or ctx is None:
            return  # the attempt was over (committed), only the scope was not fit for the next one
        bound = log_context.bind(lease.request)
        try:
            if current.committing:
                if scope.cancelled_caught:
                    self.log.error("request.commit_timed_out", after_s=round(self.committer.clock() - current.now, 1))
                return
            await self._conclude(
                lease, current.started, ctx, error, permanent=permanent, caught=caught, timed_out=scope.cancelled_caught
            )
        finally:
            log_context.reset(bound)

    async def _conclude(
        self,
        lease: Lease,
        started: float,
        ctx: Context,
        error: str | None,
        *,
        permanent: bool,
        caught: BaseException | None,
        timed_out: bool,
    ) -> None:
        """The end of an attempt that did not commit in its handler's scope: a lost lease or a lock that ran out
        (nothing committed), a failure (recorded), or a success whose timer had already fired."""
        if lease.lost and not lease.expired:
            self.committer.stats.lost += 1
            self.log.warning("lease.dropped", reason=lease.lost_reason or "lock lost while the handler ran")
            return
        now = self.committer.clock()
        if _outlived(lease, now):
            # Nothing is committed after the lock ran out: another worker may hold the request now.
            await self._record_expired(lease, started)
            return
        if timed_out:
            error = f"handler timed out after {self.handler_timeout:g} s"
        elif caught is not None:
            self._log_traceback(caught, error or "", lease, no_retry=permanent)
        await self._commit(lease, error, permanent=permanent, ctx=ctx, now=now)

    async def _commit(
        self, lease: Lease, error: str | None, *, permanent: bool, ctx: Context | None, now: float | None = None
    ) -> None:
        """Apply an attempt's outcome, shielded: a half-done commit cut by shutdown would redo the request."""
        now = self.committer.clock() if now is None else now
        with anyio.CancelScope(shield=True, deadline=min(now + COMMIT_TIMEOUT, self.committer.stop_deadline)) as cs:
            lease.commit_scope = cs
            if error is None and ctx is not None:
                if await self.committer.succeed(lease, ctx.pending_enqueues(), ctx.pending_items()):
                    self.log.debug("request.handled")
            else:
                error = error or "attempt failed"
                stats = self.committer.stats
                failed = stats.failed
                await self.committer.fail(lease, error, permanent=permanent)
                # `fail` says nothing back: when it was the last attempt, a rise of the counter while the lease was
                # not lost means it was recorded (wrong only if this record was abandoned on a queue error while
                # another request's failure landed: rare, and that request is then attempted and counted again).
                if stats.failed > failed and not lease.lost and self._final(lease, no_retry=permanent):
                    self.errors.add(error)
        if cs.cancelled_caught:
            # The committer has let go of the lease: its lock lapses (or shutdown's unlock frees it) and the
            # request is attempted again.
            self.log.error("request.commit_timed_out", after_s=round(anyio.current_time() - now, 1))

    def _log_traceback(self, exc: BaseException, error: str, lease: Lease, *, no_retry: bool) -> None:
        """Log the handler's traceback as `handler.error`, just before its failure is recorded: a warning when the
        request fails for good, at debug level before a retry and for a NoRetry (the handler's own verdict, not a
        crash). Formatted on failures only, whatever the level: they are not the hot path."""
        final = self._final(lease, no_retry=no_retry)
        if final and not no_retry:
            self.log.warning("handler.error", error=error, final=True, traceback=user_traceback(exc))
        else:
            self.log.debug("handler.error", error=error, final=final, traceback=user_traceback(exc))

    def _final(self, lease: Lease, *, no_retry: bool) -> bool:
        """Whether a failure of this attempt ends the request as failed (the committer's policy decides)."""
        request = lease.request
        return no_retry or self.committer.policy.gives_up(request.retry_count + 1, no_retry=bool(request.no_retry))

    async def _record_expired(self, lease: Lease, started: float) -> None:
        """The lock ran out under this attempt: re-prove it and record the attempt, or leave that to its next holder.

        So `max_retries` applies to a handler that keeps outliving its lock (e.g. one blocking the event loop).
        """
        committer, leases, stats = self.committer, self.committer.leases, self.committer.stats
        request = lease.request
        reason = self.monitor.explain_expiry(started) if self.monitor else "lock expired: no prolong was confirmed"
        stats.lost += 1
        self.log.warning("lease.dropped", reason=reason)
        leases.lose(lease, reason, expired=True)
        committer.note_expired(request.id, reason)  # whoever holds it here next records it
        if leases.get(request.id) is not None:
            return  # the fetcher has locked it again already: that lease's worker records it
        # Registered before the call: if the fetcher locks the request meanwhile, its lease replaces this one.
        reclaimed = leases.add(request, anyio.current_time() + self.lock_secs)
        leases.start(reclaimed, anyio.CancelScope())
        try:
            with anyio.fail_after(RECLAIM_TIMEOUT):
                await committer.queue.prolong_lock(
                    request.id, lock_secs=self.lock_secs, client_key=committer.client_key
                )
        except (QueueError, TimeoutError) as exc:
            leases.remove(reclaimed)  # someone else holds it (or the queue is away): the note waits for it
            self.log.info("lease.reclaim_failed", error=str(exc) or type(exc).__name__)
            return
        if leases.get(request.id) is not reclaimed or committer.take_expired(request.id) is None:
            leases.remove(reclaimed)
            return
        await self._commit(reclaimed, reason, permanent=False, ctx=None)


_OWN_CODE = os.path.dirname(os.path.abspath(__file__)) + os.sep
"""The runtime's own modules: frames of them before the handler's first frame are left out of its traceback."""


def user_traceback(exc: BaseException) -> str:
    """`exc`'s traceback, formatted, starting at the first frame outside headlock's runtime (the handler's).

    The worker's and the router's frames above the handler say nothing to its author; frames of the runtime called
    from the handler (e.g. `ctx.enqueue`) stay. All of it when every frame is the runtime's.
    """
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_OWN_CODE):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb if tb is not None else exc.__traceback__))


def _outlived(lease: Lease, now: float) -> bool:
    """Whether an attempt's lease was lost or its lock ran out by `now`: then nothing of it may be committed."""
    return lease.lost or now >= lease.expires_at


def _describe(exc: Exception) -> tuple[str, bool]:
    """The error message a handler's exception records on the request (one line), and whether it is a NoRetry."""
    if isinstance(exc, NoRetry):
        return f"NoRetry: {exc}", True
    # A NoRetry raised inside the handler's own task group arrives wrapped in an exception group.
    if isinstance(exc, ExceptionGroup) and (no_retry := exc.subgroup(NoRetry)) is not None:
        return f"NoRetry: {_first(no_retry)}", True
    return f"{type(exc).__name__}: {exc}", False


def _first(group: BaseExceptionGroup[NoRetry]) -> NoRetry:
    """The first NoRetry in a (nested) group."""
    first = group.exceptions[0]
    return first if isinstance(first, NoRetry) else _first(first)
